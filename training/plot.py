"""Training and validation curves from a run's metrics.jsonl, as a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) from a metrics.jsonl file."""
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    train, valid = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n} is not valid JSON") from None
        if "valid_bleu" in rec:
            valid.append(rec)
        elif "train_nll" in rec:  # not the run's other records (its precision at the start)
            train.append(rec)
    if not train and not valid:
        raise ValueError(f"{path} holds no records")
    return train, valid


def plot_run(run: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, valid = read_metrics(run / "metrics.jsonl")
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["train_nll"] for r in train], label="train NLL")
    ax_loss.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid NLL")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("nats / target token")
    ax_loss.legend()
    ax_bleu.plot([r["step"] for r in valid], [r["valid_bleu"] for r in valid], "o-", color="tab:green")
    ax_bleu.set_xlabel("step")
    ax_bleu.set_ylabel("validation BLEU")
    fig.suptitle(run.name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
