"""A run's metrics.jsonl, one JSON record a line, and its TensorBoard copy where installed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from translator.checkpoint import atomic_write


def truncate_after(path: Path, step: int) -> int:
    """Drop the records of `path` past `step` (logged after the checkpoint a run resumes from,
    they would be logged again) and any line cut short by a killed write; how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if (s := record_step(line)) is not None and s <= step]
    if len(kept) != len(lines):
        text = "".join(line + "\n" for line in kept).encode("utf-8")
        atomic_write(path, lambda f: f.write(text))
    return len(lines) - len(kept)


def record_step(line: str) -> int | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if isinstance(step, int) else None


class MetricsLog:
    """Appends records to `out_dir/metrics.jsonl`, from `step` on: later records of an earlier
    process are dropped first, so that a resumed run logs no step twice."""

    def __init__(self, out_dir: Path, step: int, log: Callable[[str], None] = print) -> None:
        self.path = out_dir / "metrics.jsonl"
        dropped = truncate_after(self.path, step)
        if dropped:
            log(f"dropped {dropped} records past step {step} from {self.path}")
        self.file = self.path.open("a", encoding="utf-8")
        self.board = make_board(out_dir / "tensorboard")
        self.log = log

    def record(self, rec: dict) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.board:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.board.add_scalar(k, v, rec["step"])
        if "valid_bleu" in rec:
            self.log(f"step {rec['step']}: valid loss {rec['valid_loss']:.3f}, valid BLEU {rec['valid_bleu']:.2f}")

    def close(self) -> None:
        self.file.close()
        if self.board:
            self.board.close()


class Window:
    """Summed loss, NLL and target tokens of the steps since the last training record."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.nll, self.tokens, self.start = 0.0, 0.0, 0, time.monotonic()

    def add(self, loss: float, nll: float, tokens: int) -> None:
        self.loss, self.nll, self.tokens = self.loss + loss, self.nll + nll, self.tokens + tokens

    def seconds(self) -> float:
        return time.monotonic() - self.start


def make_board(path: Path):
    """A TensorBoard writer, or None where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
