"""Timing helper the microbenchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_us(fn: Callable[[], object], calls: int, repeats: int = 5, warmup: int = 10) -> float:
    """Median over `repeats` rounds of the mean microseconds per call of fn, `calls` calls a round."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)
