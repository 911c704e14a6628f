"""A run's checkpoint folder: the last K step checkpoints and the best one, written atomically."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from training.config import ExperimentConfig
from translator.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from translator.config import to_dict

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
# The temp files of translator.checkpoint.atomic_write (".NAME.RANDOM.tmp") for the files a run
# writes: left behind only by a process killed in the middle of a write.
PARTIAL_WRITE = re.compile(r"^\.(step_\d+\.pt|best\.pt|metrics\.jsonl)\.\w+\.tmp$")


class CheckpointDir:
    """`out_dir/checkpoints/step_NNNNNNN.pt` (the last `keep_last`) and `out_dir/best.pt`."""

    def __init__(self, out_dir: Path, keep_last: int) -> None:
        self.dir = out_dir / "checkpoints"
        self.best = out_dir / "best.pt"
        self.keep_last = keep_last

    def steps(self) -> list[Path]:
        """Complete step checkpoints, oldest first (temp files of unfinished writes never match)."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def remove_partial_writes(self) -> list[Path]:
        """Delete the temp files of writes killed midway, in the run folder and its checkpoints."""
        removed = []
        for folder in (self.best.parent, self.dir):
            if folder.is_dir():
                for p in folder.iterdir():
                    if PARTIAL_WRITE.match(p.name):
                        p.unlink(missing_ok=True)
                        removed.append(p)
        return removed

    def save(self, *, step: int, is_best: bool, **payload) -> Path:
        path = self.dir / f"step_{step:07d}.pt"
        save_checkpoint(path, **payload)
        if is_best:
            save_checkpoint(self.best, **{**payload, "train_state": None})
        for old in self.steps()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def resumable(self, cfg: ExperimentConfig, log: Callable[[str], None],
                  set_aside: bool = True) -> tuple[Path, Checkpoint] | None:
        """The newest step checkpoint that reads whole, to resume from (None: there are none).

        One that is unreadable or fails its digests is passed over, with a line in the log, for
        the one before it: the steps between are trained again. With set_aside (the process that
        writes the folder) its file is renamed `step_NNNNNNN.pt.unreadable`, kept for a look and never
        read again (nor averaged). None of them readable: a CheckpointError naming the newest."""
        steps = self.steps()
        for path in reversed(steps):
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as e:
                aside = path.with_name(path.name + ".unreadable")
                if set_aside:
                    path.replace(aside)
                log(f"cannot resume from {path.name}: {e}; set aside as {aside.name}, trying the step checkpoint "
                    "before it")
                continue
            return path, self.check_resumable(path, ckpt, cfg)
        if steps:
            raise CheckpointError(f"none of the {len(steps)} step checkpoints under {self.dir} can be read (each set "
                                  "aside as .unreadable): run again to start from step 0, or restore them")
        return None

    @staticmethod
    def check_resumable(path: Path, ckpt: Checkpoint, cfg: ExperimentConfig) -> Checkpoint:
        """ckpt, read from path, if it holds a training state and its model and data sections match cfg's."""
        if ckpt.train_state is None:
            raise CheckpointError(f"checkpoint {path} holds no training state to resume from")
        new, defaults = to_dict(cfg), to_dict(ExperimentConfig())
        for section in ("model", "data"):
            # Keys added to the config since the checkpoint was written hold their defaults there.
            old = {**defaults[section], **ckpt.config.get(section, {})}
            if old != new[section]:
                changed = sorted(k for k in set(new[section]) | set(old) if new[section].get(k) != old.get(k))
                raise CheckpointError(
                    f"cannot resume from {path}: {section}.{changed[0]} differs from the checkpoint's "
                    "(start a new output folder to change it)"
                )
        return ckpt
