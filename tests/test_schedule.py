"""Learning-rate schedules and the step budget a wall-clock limit leaves."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest

from training.config import TrainConfig
from training.schedule import StepBudget, in_decay, inverse_sqrt_lr, learning_rate, wsd_lr
from translator.config import ConfigError


def test_inverse_sqrt_schedule_peaks_at_warmup():
    assert inverse_sqrt_lr(1, 1e-3, 100) == pytest.approx(1e-5)
    assert inverse_sqrt_lr(100, 1e-3, 100) == pytest.approx(1e-3)
    assert inverse_sqrt_lr(400, 1e-3, 100) == pytest.approx(5e-4)


def test_wsd_warms_up_holds_the_peak_then_decays_linearly_to_zero_at_the_end():
    lr = [wsd_lr(s, 1.0, warmup=10, total=100, decay_fraction=0.2) for s in range(1, 101)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0  # warmup: step / warmup
    assert all(x == 1.0 for x in lr[9:80])  # steps 10..80 at the peak
    assert lr[89] == pytest.approx(0.5)  # halfway through the decay (steps 80..100)
    assert lr[99] == 0.0
    assert all(a >= b for a, b in pairwise(lr[80:]))
    assert wsd_lr(150, 1.0, 10, 100, 0.2) == 0.0  # past the estimated end


def test_wsd_cosine_decay_is_half_way_at_the_middle_of_the_decay():
    assert wsd_lr(90, 1.0, 10, 100, 0.2, "cosine") == pytest.approx(0.5)
    assert wsd_lr(85, 1.0, 10, 100, 0.2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_wsd_without_a_known_end_stays_at_the_peak():
    assert wsd_lr(10_000, 1.0, 10, math.inf, 0.2) == 1.0


def test_wsd_decay_never_starts_inside_the_warmup():
    assert wsd_lr(20, 1.0, warmup=30, total=40, decay_fraction=0.9) == pytest.approx(20 / 30)
    assert wsd_lr(35, 1.0, warmup=30, total=40, decay_fraction=0.9) == pytest.approx(0.5)


def test_learning_rate_follows_the_configured_schedule():
    wsd = TrainConfig(schedule="wsd", max_steps=100, warmup_steps=10, decay_fraction=0.5, lr=2.0)
    assert learning_rate(75, wsd, 100) == pytest.approx(1.0)
    assert in_decay(51, wsd, 100) and not in_decay(50, wsd, 100)
    inv = TrainConfig(warmup_steps=10, lr=2.0)
    assert learning_rate(40, inv, 100) == pytest.approx(1.0) and not in_decay(99, inv, 100)


def test_wsd_needs_a_budget():
    with pytest.raises(ConfigError, match="train.schedule=wsd needs train.max_steps, train.max_minutes"):
        TrainConfig(schedule="wsd")


def test_step_budget_estimates_the_run_from_the_measured_pace():
    budget = StepBudget(budget_s=100.0, settle=2)
    budget.start(now=0.0)
    budget.tick(1, now=30.0)  # a slow first step (compilation) is left out of the pace
    assert budget.total(1, now=30.0) == math.inf  # no pace measured yet
    budget.tick(2, now=31.0)
    budget.tick(3, now=32.0)
    budget.tick(4, now=33.0)
    assert budget.seconds_per_step == pytest.approx(1.0)
    assert budget.total(4, now=33.0) == pytest.approx(4 + 67)


def test_step_budget_counts_the_time_spent_before_a_resume_and_caps_at_max_steps():
    budget = StepBudget(max_steps=50, budget_s=100.0, spent_s=90.0, seconds_per_step=0.5)
    budget.start(now=1000.0)
    assert budget.elapsed(now=1004.0) == pytest.approx(94.0)
    assert budget.total(40, now=1004.0) == pytest.approx(50)  # 40 + 6 s / 0.5 s = 52 > max_steps
    assert budget.total(45, now=1004.0) == pytest.approx(50)
    assert StepBudget(max_steps=50).total(10) == 50


def test_step_budget_estimates_a_token_budget_from_the_tokens_per_step_so_far():
    budget = StepBudget(max_tokens=10_000)
    assert budget.total(0) == math.inf  # nothing trained on yet: no pace
    assert budget.total(10, tokens=2_000) == pytest.approx(50)  # 200 a step: 8,000 left in 40 steps
    assert budget.total(60, tokens=12_000) == pytest.approx(60)  # spent: the run ends here
    assert StepBudget(max_steps=30, max_tokens=10_000).total(10, tokens=2_000) == 30
