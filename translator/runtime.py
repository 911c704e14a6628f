"""Process-wide settings that decoding speed depends on."""

from __future__ import annotations

import ctypes
import sys

# glibc mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MIB = 1 << 20


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep and reuse freed large blocks instead of handing them back.

    Every decoding step allocates and frees the same few large tensors (logits, keys/values,
    activations). By default glibc serves blocks past its mmap threshold with fresh mappings and
    trims the heap top on free, so each step pays page faults and page zeroing for them again;
    greedy decoding runs a few percent faster with them kept (docs/RESULTS.md). The cost: memory freed
    stays with the process (up to the trim threshold) for its next use. Returns whether the
    settings took; False where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((M_MMAP_THRESHOLD, 32 * MIB), (M_TRIM_THRESHOLD, 512 * MIB), (M_TOP_PAD, 64 * MIB))
    return all(mallopt(param, value) == 1 for param, value in settings)
