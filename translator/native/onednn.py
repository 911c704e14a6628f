"""The output projection's products through oneDNN's sgemm where it is installed.

The output projection multiplies through oneDNN's JIT sgemm (what CTranslate2 multiplies with
on non-Intel CPUs) over a row-major (D, V) copy of its weight, and past PACKED_ROWS rows through
torch's own oneDNN primitive over a packed weight (`matmul`, `pack`, `packed_linear`;
benchmarks/generator.py): both measured faster there than the native panels.
The `onednn-cpu-gomp` wheel comes with the `onednn` extra (and `serve`, which pulls it in) on
x86-64 Linux; without it, or with `NMT_ONEDNN=0`, the projection runs through MKL.

The wheel's library links `libgomp.so.1`; torch's CPU wheels load their own copy under that
name first, so both share one OpenMP thread pool and `torch.set_num_threads` governs both.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from translator.native import kernels

ENV = "NMT_ONEDNN"  # "0" turns the oneDNN path off
DISTRIBUTION = "onednn-cpu-gomp"
LIBRARY = "libdnnl.so.3"


def library_path() -> Path | None:
    """Where the installed oneDNN wheel put its shared library, if it is installed."""
    try:
        files = metadata.distribution(DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == LIBRARY:
            return Path(f.locate()).resolve()
    return None


@functools.cache
def sgemm() -> Callable | None:
    """oneDNN's `dnnl_sgemm`, checked once against torch on a small product; None when unavailable."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return None
    path = library_path()
    if path is None:
        return None
    try:
        fn = ctypes.CDLL(str(path)).dnnl_sgemm
    except (OSError, AttributeError):
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64]
    fn.restype = ctypes.c_int
    x, w = torch.arange(15.0).view(3, 5).cos(), torch.arange(20.0).view(4, 5).sin()  # not the global RNG
    out = torch.empty(3, 4)
    status = fn(b"N", b"T", 3, 4, 5, 1.0, x.data_ptr(), 5, w.data_ptr(), 5, 0.0, out.data_ptr(), 4)
    if status != 0 or not torch.allclose(out, x @ w.t(), atol=1e-5):
        return None
    return fn


_thread = threading.local()


def thread_ready() -> None:
    """Set this thread's OpenMP thread count to torch's before its first product: a thread that
    has not run a parallel torch op yet still has OpenMP's default (every core)."""
    if not getattr(_thread, "ready", False):
        torch.get_num_threads()  # torch sets the calling thread's OpenMP count on first use
        _thread.ready = True


def enabled() -> bool:
    """Whether oneDNN's sgemm is loaded in this process (`matmul` takes it)."""
    return sgemm() is not None


plain = kernels.plain_f32


def matmul(x: Tensor, columns: Tensor) -> Tensor:
    """x (..., K) @ columns (K, N), columns row-major: the output projection's fastest form
    through oneDNN at every row count decoding sees (benchmarks/generator.py)."""
    K, N = columns.shape
    M = x.numel() // K if K else 0
    if (
        M == 0
        or torch.is_grad_enabled()
        or not (plain(x) and plain(columns) and columns.is_contiguous())
        or torch.compiler.is_compiling()
        or sgemm() is None
    ):
        return x @ columns
    out = torch.empty(*x.shape[:-1], N)
    a = x if x.is_contiguous() else x.contiguous()
    thread_ready()
    sgemm()(b"N", b"N", M, N, K, 1.0, a.data_ptr(), K, columns.data_ptr(), N, 0.0, out.data_ptr(), N)
    return out


# oneDNN 2023.2's sgemm slows down per row between ~280 and ~400 rows of the 8,000-wide output
# projection, where beam 5 over 64 sentences runs (320 rows); torch's own oneDNN matmul
# primitive over a weight packed in advance keeps its rate there and matches the sgemm above
# (benchmarks/generator.py, docs/HISTORY.md round 5). `packed_linear` takes it past PACKED_ROWS rows.
PACKED_ROWS = 256


@functools.cache
def packing() -> bool:
    """Whether torch's oneDNN linear over packed weights works here (checked once, on a small product)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.arange(15.0).view(3, 5).cos(), torch.arange(20.0).view(4, 5).sin()
        out = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None), None, "none", [], "")
    except (AttributeError, RuntimeError, TypeError):  # not built in, or another signature in this torch
        return False
    return torch.allclose(out, x @ w.t(), atol=1e-5)


def pack(weight: Tensor) -> Tensor | None:
    """weight (N, K) in the layout `packed_linear` reads; None where packing is unavailable."""
    if not (plain(weight) and weight.is_contiguous() and packing()):
        return None
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: Tensor, packed: Tensor) -> Tensor:
    """x (..., K) @ weight.T -> (..., N) for a weight `pack` returned, outside autograd."""
    a = x.reshape(-1, x.size(-1))
    return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "").view(*x.shape[:-1], -1)


Copies = dict[str, tuple[tuple[int, int], Tensor | None]]  # name: (weight's (storage, version), copy)


def weight_copy(copies: Copies, name: str, weight: Tensor, make: Callable[[Tensor], Tensor | None]) -> Tensor | None:
    """make(weight), kept in `copies` under name and made again whenever the weight has changed
    (training, loading): a packed or transposed copy for inference."""
    source = (weight.data_ptr(), weight._version)
    kept = copies.get(name)
    if kept is None or kept[0] != source:
        kept = copies[name] = (source, make(weight.detach()))
    return kept[1]
