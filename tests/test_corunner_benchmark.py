"""benchmarks/corunner.py's co-runner: it spins and sleeps at the policy asked, counts its bursts,
and stops when told. The decoding side is Translator.translate, tested elsewhere."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import sys
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "corunner_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "corunner.py")
corunner = sys.modules["corunner_benchmark"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corunner)


@pytest.mark.parametrize("policy", corunner.POLICIES)
def test_the_corunner_bursts_at_its_policy_until_stopped(policy):
    stop, bursts = mp.Event(), mp.Value("l", 0, lock=False)
    proc = mp.Process(target=corunner.corunner, args=(stop, bursts, 0.001, 0.002, policy))
    proc.start()
    deadline = time.monotonic() + 10
    while bursts.value < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    proc.join(timeout=10)
    assert bursts.value >= 5
    assert proc.exitcode == 0
