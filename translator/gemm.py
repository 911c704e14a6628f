"""Linear layers of inference: over weights packed once (`Linear`, through
`kernels.panel_linear`), else through oneDNN's sgemm where it is installed.

`Linear` keeps its weight packed in panels for the native kernel and multiplies over them at
inference: oneDNN's sgemm packs the weight again at every call, a fifth to a half of the time of
a decoding step's products (docs/RESULTS.md, round 7). What follows is the path without the
native kernels, and the products that have no packed weight.

oneDNN's JIT sgemm (what CTranslate2 multiplies with on non-Intel CPUs) runs the products of a
decoding step, a few to a few hundred rows against 256- to 8,000-wide weights, faster than MKL,
torch's CPU BLAS: in the decoding loop the layers of a step 1.15-1.3x, the output projection
1.5-3x (benchmarks/gemm_backends.py, benchmarks/generator.py; docs/RESULTS.md). `linear` takes that
path for plain float32 CPU tensors outside autograd, through a native wrapper that writes the
bias and applies the ReLU in the same call (translator.kernels), and `F.linear` for everything
else: training, other dtypes and devices, tensor subclasses, tracing, or when the library is
missing (the `onednn-cpu-gomp` wheel, a dependency on x86-64 Linux), `NMT_ONEDNN=0` turns it off
or the native kernels are not built.

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
import torch.nn.functional as F
from torch import Tensor

from translator import kernels

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


@functools.cache
def sgemm_address() -> int:
    """Where `dnnl_sgemm` is, for the native kernels that call it."""
    return ctypes.cast(sgemm(), ctypes.c_void_p).value


_thread = threading.local()


def thread_ready() -> None:
    """Set this thread's OpenMP thread count to torch's before its first product: a thread that
    has not run a parallel torch op yet still has OpenMP's default (every core)."""
    if not getattr(_thread, "ready", False):
        torch.get_num_threads()  # torch sets the calling thread's OpenMP count on first use
        _thread.ready = True


def enabled() -> bool:
    """Whether `linear` can take the oneDNN path in this process."""
    return sgemm() is not None


# Below this many rows MKL is faster once the call's own overhead is counted (with the bias
# copied from Python, ~15 us): greedy batch 1 ran 123 tok/s with one-row layers on MKL,
# 112 with them on oneDNN (docs/RESULTS.md).
MIN_ROWS = 4

PLAIN, F32 = kernels.PLAIN, torch.float32
plain = kernels.plain_f32  # `linear`, called 42 times a decoding step, spells it out for x and the weight


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """x (..., K) @ weight (N, K).T + bias (N,) -> (..., N), as `F.linear`; then ReLU if relu."""
    N, K = weight.shape
    M = x.numel() // K if K else 0
    if (
        M < MIN_ROWS
        or torch.is_grad_enabled()
        or type(x) not in PLAIN or x.dtype is not F32 or not x.is_cpu
        or type(weight) not in PLAIN or weight.dtype is not F32 or not weight.is_contiguous()
        or not weight.is_cpu
        or (bias is not None and not (plain(bias) and bias.is_contiguous()))
        or torch.compiler.is_compiling()
        or sgemm() is None
        or kernels.library() is None
    ):
        y = F.linear(x, weight, bias)
        return F.relu(y) if relu else y
    # Each torch call from Python costs a few microseconds, as much as a small product's
    # arithmetic: one native call writes the bias, multiplies and applies the ReLU.
    out = torch.empty(*x.shape[:-1], N)
    a = x if x.is_contiguous() else x.contiguous()
    thread_ready()
    status = kernels.library().linear(sgemm_address(), a.data_ptr(), weight.data_ptr(),
                                      None if bias is None else bias.data_ptr(), out.data_ptr(), M, N, K, relu,
                                      torch.get_num_threads())
    if status:
        raise RuntimeError(f"dnnl_sgemm failed with status {status} on a ({M}, {K}) x ({K}, {N}) product")
    return out


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


# oneDNN 2023.2's sgemm runs 280 to ~400 rows against the 8,000-wide output projection 1.25x
# slower per row than 256 or 400 rows (beam 5 over 64 sentences is 320 rows); torch's own oneDNN
# matmul primitive over a weight packed in advance keeps its rate there and matches the sgemm
# above (benchmarks/generator.py). `packed_linear` takes it past PACKED_ROWS rows.
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


class Linear(torch.nn.Linear):
    """`nn.Linear` (same parameters, same state dict) whose inference runs over its weight
    packed once (`kernels.panel_linear`, kept until the weight changes), else through `linear`."""

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            packed = self.panels()
            out = None if packed is None else kernels.panel_linear(x, packed, self.bias, self.out_features, relu)
            if out is not None:
                return out
        return linear(x, self.weight, self.bias, relu)

    def panels(self) -> Tensor | None:
        """The weight packed by `kernels.panels`, packed again whenever the weight has changed
        (training, loading); None where the kernels are not built."""
        return weight_copy(self.__dict__.setdefault("_copies", {}), "panels", self.weight, kernels.panels)
