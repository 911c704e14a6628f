"""Learning-rate schedules as pure functions of the step, and the step budget a wall-clock or
target-token limit leaves.

`inverse_sqrt`: linear warmup, then peak * sqrt(warmup / step), never reaching zero (the paper's).
`wsd` (warmup-stable-decay): linear warmup, the peak held, then a decay to zero over the last
`decay_fraction` of the run's steps, so that a run given a budget ends annealed (budgeted
training, Li et al. ICLR 2020). Under a wall-clock or token budget the run's length in steps is not
known in advance: `StepBudget` estimates it from the measured time, and tokens, per step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from training.config import TrainConfig


def inverse_sqrt_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak` over `warmup` steps, then peak * sqrt(warmup / step)."""
    step = max(step, 1)
    if warmup == 0:
        return peak / math.sqrt(step)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def decay_start(total: float, warmup: int, decay_fraction: float) -> float:
    """The step after which a wsd schedule of `total` steps decays (never inside the warmup)."""
    return max(float(warmup), total * (1.0 - decay_fraction))


def wsd_lr(step: int, peak: float, warmup: int, total: float, decay_fraction: float, shape: str = "linear") -> float:
    """Warmup to `peak` over `warmup` steps, hold it, then decay to 0 at step `total` over the
    last `decay_fraction` of the steps, linearly or along a half cosine; 0 past `total`.
    `total` may be math.inf (no end known yet): warmup, then the peak."""
    step = max(step, 1)
    if warmup and step < warmup:
        return peak * step / warmup
    start = decay_start(total, warmup, decay_fraction)
    if step <= start:
        return peak
    progress = min((step - start) / max(total - start, 1e-9), 1.0)
    if shape == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress)


@dataclass
class StepBudget:
    """How many steps a run will make in all: `max_steps`; under a wall-clock budget the steps
    done plus the seconds left over the measured seconds per step; under a target-token budget
    the steps done plus the tokens left over the mean tokens per step so far; whichever is fewest.

    Time per step is measured from the `settle`-th step after this process started on (the
    first steps carry torch.compile's compilation and cold caches) and includes everything the
    loop does between steps (validation, checkpoints), so the estimate tracks the real pace.
    Before that the estimate is the one carried over from the last run of the same training
    (`seconds_per_step`, 0 when none), else unknown (math.inf).
    """

    max_steps: int = 0  # 0 = no step limit
    budget_s: float = 0.0  # 0 = no time limit
    spent_s: float = 0.0  # seconds of the budget spent before this process started
    seconds_per_step: float = 0.0  # the last estimate; carried across resumes
    max_tokens: int = 0  # target tokens to train on; 0 = no token limit
    settle: int = 10
    _start: float = 0.0
    _mark: tuple[float, int] | None = None
    _steps_here: int = 0

    def start(self, now: float | None = None) -> None:
        self._start = time.monotonic() if now is None else now

    def elapsed(self, now: float | None = None) -> float:
        """Seconds of the budget spent, this process's and those before it."""
        return self.spent_s + ((time.monotonic() if now is None else now) - self._start)

    def tick(self, step: int, now: float | None = None) -> None:
        """Record that `step` has just ended."""
        now = time.monotonic() if now is None else now
        self._steps_here += 1
        if self._mark is None:
            if self._steps_here >= self.settle:
                self._mark = (now, step)
        elif step > self._mark[1]:
            self.seconds_per_step = (now - self._mark[0]) / (step - self._mark[1])

    def total(self, step: int, now: float | None = None, tokens: int = 0) -> float:
        """The estimated number of steps of the whole run (math.inf when unbounded or unknown),
        `tokens` target tokens having been trained on in `step` steps."""
        total = float(self.max_steps) if self.max_steps else math.inf
        if self.max_tokens and step and tokens:
            total = min(total, step + max(self.max_tokens - tokens, 0) * step / tokens)
        if self.budget_s and self.seconds_per_step > 0:
            left = max(self.budget_s - self.elapsed(now), 0.0)
            total = min(total, step + left / self.seconds_per_step)
        return total


def learning_rate(step: int, t: TrainConfig, total: float) -> float:
    """The learning rate of `step` under `t.schedule`, for a run of `total` steps (wsd only)."""
    if t.schedule == "wsd":
        return wsd_lr(step, t.lr, t.warmup_steps, total, t.decay_fraction, t.decay_shape)
    return inverse_sqrt_lr(step, t.lr, t.warmup_steps)


def in_decay(step: int, t: TrainConfig, total: float) -> bool:
    """Whether `step` is in the decay phase of a wsd schedule of `total` steps."""
    return t.schedule == "wsd" and step > decay_start(total, t.warmup_steps, t.decay_fraction)
