"""Process-wide settings for decoding."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocates and frees a 16 MB tensor; prints how much of it the process still holds afterwards.
HELD_AFTER_FREE = """
import sys, torch
from translator.runtime import keep_freed_memory
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.ones(1024).sum()  # torch's own first-use set-up, which holds memory of its own
before = rss_kb()
x = torch.ones(4 << 20)
del x
print(rss_kb() - before)
"""


def held_after_free_kb(mode: str) -> int:
    # In a subprocess: the setting is process-wide and would otherwise reach other tests.
    out = subprocess.run([sys.executable, "-c", HELD_AFTER_FREE, mode], check=True, capture_output=True,
                         text=True, timeout=120)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_keeps_a_freed_large_block_for_reuse():
    assert held_after_free_kb("default") < 4 << 10  # glibc unmaps it at once
    assert held_after_free_kb("keep") > 12 << 10  # kept for the next step's tensors
