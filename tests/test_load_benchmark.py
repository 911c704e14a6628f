"""The pure helpers of benchmarks/load.py: request sizes, Poisson schedules, percentiles, the
max-rate search and CPU time from /proc. No server is started."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

# benchmarks/ holds scripts, not a package: load the file under a name of its own.
_spec = importlib.util.spec_from_file_location(
    "load_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "load.py")
load = sys.modules["load_benchmark"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)


def test_requests_cover_the_corpus_once_in_order():
    sentences = [f"s{i}" for i in range(100)]
    requests = load.make_requests(sentences, 1, 16, random.Random(0))
    assert [s for r in requests for s in r] == sentences
    assert all(1 <= len(r) <= 16 for r in requests[:-1])
    assert len({len(r) for r in requests}) > 4


def test_single_sentence_requests():
    assert load.make_requests(["a", "b", "c"], 1, 1, random.Random(0)) == [["a"], ["b"], ["c"]]


def test_same_seed_same_schedule():
    a = load.poisson_arrivals(50.0, 10.0, 0, random.Random("0:50.0"))
    b = load.poisson_arrivals(50.0, 10.0, 0, random.Random("0:50.0"))
    assert a == b


def test_poisson_arrivals_have_the_rate_and_the_bounds():
    arrivals = load.poisson_arrivals(200.0, 20.0, 0, random.Random(1))
    assert arrivals == sorted(arrivals) and arrivals[-1] < 20.0
    assert len(arrivals) == pytest.approx(4000, rel=0.05)
    assert len(load.poisson_arrivals(200.0, 20.0, 100, random.Random(1))) == 100


def test_percentile_nearest_rank():
    values = [float(v) for v in range(101)]
    assert load.percentile(values, 50) == 50.0
    assert load.percentile(values, 99) == 99.0
    assert load.percentile(values, 100) == 100.0
    assert load.percentile([], 99) != load.percentile([], 99)  # nan


def test_find_max_rate_doubles_then_bisects():
    probed = []

    def passes(rate: float) -> bool:
        probed.append(rate)
        return rate <= 137

    assert load.find_max_rate(passes, 10.0, budget_s=1e9, steps=4) == 135.0
    assert probed == [10, 20, 40, 80, 160, 120, 140, 130, 135]


def test_find_max_rate_halves_when_the_start_fails():
    assert load.find_max_rate(lambda r: r <= 30, 100.0, budget_s=1e9, steps=0) == 25.0


def test_find_max_rate_stays_in_its_budget():
    now = [0.0]

    def passes(rate: float) -> bool:
        now[0] += 10.0  # each probe takes 10 s
        return True

    load.find_max_rate(passes, 1.0, budget_s=35.0, clock=lambda: now[0])
    assert now[0] <= 35.0


def test_cpu_seconds_from_stat_with_a_strange_command_name():
    fields = ["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 30
    stat = "1234 (a) (b c) " + " ".join(fields)
    assert load.cpu_seconds_from_stat(stat, 100) == 3.0


def test_process_cpu_seconds_of_this_process():
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        assert load.process_cpu_seconds(os.getpid()) is None
        return
    assert load.process_cpu_seconds(os.getpid()) > 0
    assert load.process_cpu_seconds(None) is None


def test_peak_rss_of_a_process_tree_counts_its_children():
    if not Path(f"/proc/{os.getpid()}/status").exists():
        assert load.process_peak_rss_mb(os.getpid()) is None
        return
    alone = load.process_peak_rss_mb(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while load.process_peak_rss_mb(os.getpid()) <= alone and time.monotonic() < deadline:
            time.sleep(0.05)
        assert load.process_peak_rss_mb(os.getpid()) > alone  # the child's memory is counted
    finally:
        child.communicate(b"")
    assert load.process_peak_rss_mb(None) is None
