"""Average the weights of a run's last N checkpoints into one checkpoint (no training state)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from training.checkpoints import CheckpointDir
from translator.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from translator.provenance import Provenance, utc_now


def average_checkpoints(paths: list[Path], out: Path) -> None:
    """Mean of every floating-point tensor; configs and tokenizers must agree."""
    if not paths:
        raise ValueError("no checkpoints to average")
    first = load_checkpoint(paths[0])
    sources = [(paths[0], first.provenance, first.weights_sha256)]  # not the weights: memory
    sums = {k: v.double().clone() if v.is_floating_point() else v for k, v in first.model_state.items()}
    for path in paths[1:]:
        ckpt = load_checkpoint(path)
        sources.append((path, ckpt.provenance, ckpt.weights_sha256))
        if ckpt.config["model"] != first.config["model"] or ckpt.tokenizer.sha256 != first.tokenizer.sha256:
            raise CheckpointError(f"{path} has another model config or tokenizer than {paths[0]}")
        for k, v in ckpt.model_state.items():
            if v.is_floating_point():
                sums[k] += v.double()
    state = {
        k: (v / len(paths)).to(first.model_state[k].dtype) if v.is_floating_point() else v
        for k, v in sums.items()
    }
    metrics = {"averaged": [p.name for p in paths]}
    save_checkpoint(out, config=first.config, tokenizer=first.tokenizer, model=state, metrics=metrics,
                    provenance=averaged_provenance(first.provenance, sources))


def averaged_provenance(first: Provenance, sources: list[tuple[Path, Provenance, str]]) -> Provenance:
    """The run's record (code, versions, corpus) with the newest step, today's date and the averaged
    files; no scores: the average was never validated or tested."""
    steps = [prov.step for _, prov, _ in sources if prov.step is not None]
    return replace(first, step=max(steps) if steps else None, created=utc_now(), valid_bleu=None, test_scores=(),
                   averaged_from=tuple(f"{p.name}@{prov.step}:{digest}" for p, prov, digest in sources))


def average_run(run: Path, last: int, out: Path) -> list[Path]:
    """Average the last `last` step checkpoints of a run folder; of a run trained with a wsd
    schedule, only those written in its decay phase (the stable phase's weights, at the peak
    learning rate, would undo the annealing)."""
    if last < 1:
        raise ValueError(f"--last must be >= 1, got {last}")
    paths = CheckpointDir(run, keep_last=last).steps()
    if not paths:
        raise CheckpointError(f"no step checkpoints under {run / 'checkpoints'}")
    decay = [p for p in paths if load_checkpoint(p).metrics.get("decay")]
    paths = (decay or paths)[-last:]
    average_checkpoints(paths, out)
    return paths
