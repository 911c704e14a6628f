"""Native kernels for decoding steps, compiled on first use with the machine's C compiler.

A decoding step runs a few hundred small ops, and from Python each costs a few microseconds
beyond its arithmetic. `csrc/kernels.c` does these natively:
- attention of few queries: one query per sentence and head (a sentence's beams over its
  source: a few) over a short cache, each item's scores, softmax and weighted sum in registers,
  over the cache's own strides, in one OpenMP loop; torch's fused kernel, built for long runs of
  queries, spends most of its time per item there;
- a linear layer as one call (bias and ReLU included) over its weight packed once in panels
  (`panels`, `panel_linear`): oneDNN's sgemm packs it again at every call;
- LayerNorm of inference;
- greedy search's choice: each row's argmax and its log-probability from the logits, without
  writing the log-softmax;
- rows of the caches moved in place when sentences leave a running batch (`move_rows`: one
  call for every layer's keys and values instead of two torch ops per tensor);
- a decoder layer's whole step for one new position per row (`decoder_steps`): the same
  arithmetic as translator.model's layers, through the functions above, with no torch op and no
  Python between the products.
docs/RESULTS.md and docs/HISTORY.md have the figures. The library is compiled for this CPU (`-march=native`) into a
cache directory the first time a process asks for it, and reused from there. Without a C
compiler with OpenMP (`$CC`, else `cc`), or with `NMT_KERNELS=0`, each falls back to torch:
same results within float rounding, only slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("translator.kernels")

ENV = "NMT_KERNELS"  # "0": never build or load them
CACHE_ENV = "NMT_KERNEL_CACHE"  # where built libraries go (default ~/.cache/nmt-translator/kernels)
SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
BUILD_SECONDS = 120


class BuildError(RuntimeError):
    """The C compiler is missing or failed."""


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nmt-translator" / "kernels"


def compiler() -> str:
    return os.environ.get("CC") or "cc"


def cpu_identity() -> bytes:
    """What `-march=native` compiles for: the CPU's model and feature flags (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return b""
    first = text.split("\n\n", 1)[0]
    return "\n".join(line for line in first.splitlines() if line.startswith(("model name", "flags"))).encode()


def run_compiler(args: list[str]) -> str:
    """The compiler's standard output; BuildError with its messages when it is missing or fails."""
    try:
        done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=BUILD_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"{args[0]}: {e}") from e
    if done.returncode:
        raise BuildError(f"{' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def build(source: Path = SOURCE) -> Path:
    """The shared library for `source`, compiled unless the cache already holds it.

    Keyed by the source, the compiler's version, the flags and the CPU, so an edited source, a
    new compiler or a home directory shared with another CPU get their own build. Written under
    a temporary name and renamed into place: processes building at once, or one killed
    mid-build, never leave a partial library under the final name.
    """
    cc = compiler()
    version = run_compiler([cc, "--version"])
    key = hashlib.sha256(
        b"\0".join([source.read_bytes(), version.encode(), " ".join(FLAGS).encode(), cpu_identity()])
    ).hexdigest()[:20]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        run_compiler([cc, *FLAGS, "-o", str(partial), str(source)])
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


I64, PTR, F32, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
STRIDES = ctypes.c_int64 * 4
SIGNATURES = {  # name: (argument types, result type), as in csrc/kernels.c
    "few_query_attention": ([PTR] * 9 + [I64] * 5 + [F32, PTR, INT, PTR], INT),
    "layer_norm": ([PTR] * 4 + [I64] * 2 + [F32, INT], None),
    "decoder_layer_step": ([PTR] * 4, INT),
    "pack_panels": ([PTR, PTR, I64, I64], None),
    "panel_linear": ([PTR] * 4 + [I64] * 3 + [INT, INT], None),
    "move_rows": ([I64] + [PTR] * 7 + [I64], None),
    "argmax_log_prob": ([PTR, I64, I64, I64, PTR, PTR, INT], None),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, checked against torch on a small case; None (logged once) when unavailable."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        for name, (argtypes, restype) in SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = restype
    except (BuildError, OSError, AttributeError) as e:
        log.warning("native kernels unavailable, decoding uses torch alone: %s", e)
        return None
    g = torch.Generator().manual_seed(0)  # not the global RNG
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (2, 5, 5))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])[:, None, None, :]
    got = call_attention(lib, q, k, v, mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if got is None or not torch.allclose(got, expected, atol=1e-5):
        log.warning("native attention kernel disagrees with torch on its check, not used")
        return None
    return lib


PLAIN = (Tensor, torch.nn.Parameter)  # not subclasses that override torch functions


def plain_f32(t: Tensor) -> bool:
    """A float32 CPU tensor or parameter: what the kernels and oneDNN's sgemm can read."""
    return type(t) in PLAIN and t.dtype is torch.float32 and t.is_cpu


def usable(t: Tensor) -> bool:
    return plain_f32(t) and t.dim() == 4 and t.stride(-1) == 1


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor | None:
    """softmax(q k^T / sqrt(Dh)) v, q (B, H, T, Dh), k/v (B, H, S, Dh), outside autograd, as a
    (B, H, T, Dh) view of a (B, T, H, Dh) tensor; None where the kernel does not apply (not
    built, other dtypes or devices, Dh not a multiple of 8 up to 256, non-boolean masks)."""
    lib = library()
    if (
        lib is None
        or not (usable(q) and usable(k) and usable(v))
        or k.shape[:2] != q.shape[:2] or v.shape != k.shape
        or (mask is not None and (mask.dtype is not torch.bool or mask.dim() > 4 or not mask.is_cpu))
    ):
        return None
    return call_attention(lib, q, k, v, mask)


def call_attention(lib: ctypes.CDLL, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor | None:
    B, H, T, Dh = q.shape
    S = k.size(2)
    threads = torch.get_num_threads()
    out = q.new_empty(B, T, H, Dh)
    scratch = q.new_empty(threads * 4 * S)
    if mask is None:
        mask_ptr = mask_strides = None
    else:
        mask = mask.expand(B, H, T, S)  # broadcast dimensions get stride 0
        mask_ptr, mask_strides = mask.data_ptr(), STRIDES(*mask.stride())
    status = lib.few_query_attention(
        q.data_ptr(), STRIDES(*q.stride()), k.data_ptr(), STRIDES(*k.stride()), v.data_ptr(), STRIDES(*v.stride()),
        mask_ptr, mask_strides, out.data_ptr(), B, H, T, S, Dh, 1 / math.sqrt(Dh), scratch.data_ptr(), threads, None,
    )
    return None if status else out.transpose(1, 2)


PANEL = 16  # output columns per panel of a packed weight (csrc/kernels.c)


def panels(weight: Tensor) -> Tensor | None:
    """weight (N, K) packed for `panel_linear`: (ceil(N / PANEL) * K * PANEL,) floats; None where
    the kernels are not built or the weight is not a contiguous float32 CPU matrix."""
    lib = library()
    if lib is None or not (plain_f32(weight) and weight.dim() == 2 and weight.is_contiguous()):
        return None
    N, K = weight.shape
    packed = weight.new_empty(-(-N // PANEL) * K * PANEL)
    with torch.no_grad():
        lib.pack_panels(weight.data_ptr(), packed.data_ptr(), N, K)
    return packed


def panel_linear(x: Tensor, packed: Tensor, bias: Tensor | None, N: int, relu: bool = False) -> Tensor | None:
    """x (..., K) @ weight.T + bias -> (..., N), then ReLU if relu, for the (N, K) weight `panels`
    packed, outside autograd; None where the kernel does not apply (x not float32 on the CPU)."""
    lib = library()
    K = x.size(-1)
    if (
        lib is None or not K or not plain_f32(x) or torch.is_grad_enabled()
        or packed.numel() != -(-N // PANEL) * K * PANEL
    ):
        return None
    if bias is not None and not (plain_f32(bias) and bias.is_contiguous() and bias.numel() == N):
        return None
    a = x if x.is_contiguous() else x.contiguous()
    out = x.new_empty(*x.shape[:-1], N)
    lib.panel_linear(a.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
                     a.numel() // K, N, K, relu, torch.get_num_threads())
    return out


class LayerNorm(torch.nn.LayerNorm):
    """`nn.LayerNorm` (same parameters, same state dict) whose inference over the last dimension
    of a contiguous float32 CPU tensor is one native call, its rows split over the threads from
    an encoder's size on: at a decoding step's few rows torch's op and its allocation cost far
    more than the arithmetic (docs/HISTORY.md, rounds 6 and 7)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # training: torch's op, traceable
            return super().forward(x)
        lib = library()
        if (
            lib is None
            or not (plain_f32(x) and x.is_contiguous() and x.numel())
            or self.weight is None or self.bias is None
            or self.normalized_shape != (x.size(-1),)
        ):
            return super().forward(x)
        out = torch.empty_like(x)
        D = x.size(-1)
        lib.layer_norm(x.data_ptr(), self.weight.data_ptr(), self.bias.data_ptr(), out.data_ptr(), x.numel() // D, D,
                       self.eps, torch.get_num_threads())
        return out


def argmax_log_prob(logits: Tensor) -> tuple[Tensor, Tensor] | None:
    """Each row's argmax of log_softmax(logits (n, V)) (n,) int64, the first where tied, and the
    log-probability there (n,), in one native pass over the row, without the (n, V) log-softmax;
    None where the kernel does not apply (not built, not a float32 CPU matrix of unit stride)."""
    lib = library()
    if lib is None or not (plain_f32(logits) and logits.dim() == 2 and logits.stride(1) == 1 and logits.size(1)):
        return None
    n, V = logits.shape
    idx, lp = torch.empty(n, dtype=torch.int64), logits.new_empty(n)
    lib.argmax_log_prob(logits.data_ptr(), n, V, logits.stride(0), idx.data_ptr(), lp.data_ptr(),
                        torch.get_num_threads())
    return idx, lp


PTRS3 = PTR * 3
I64x4 = I64 * 4


def move_rows(tensors: list[tuple[Tensor, int]], holes: Tensor, movers: Tensor) -> bool:
    """In each 4-D tensor, with its rows along dimension 0 or 1, copy rows `movers` onto rows
    `holes` in place (x[holes] = x[movers] along that dimension), in one native call; False,
    nothing moved, where a tensor's last two dimensions are not one contiguous run."""
    lib = library()
    if lib is None:
        return False
    layout = []
    for t, dim in tensors:
        if not (plain_f32(t) and t.dim() == 4 and t.stride(3) == 1 and t.stride(2) == t.size(3)):
            return False
        other = 1 - dim
        layout.append((t.data_ptr(), t.stride(dim), t.size(other), t.stride(other), t.size(2) * t.size(3)))
    n, moves = len(layout), holes.numel()
    if not (n and moves):
        return True
    base, row_stride, blocks, block_stride, run = zip(*layout)
    holes, movers = holes.to(torch.int64).contiguous(), movers.to(torch.int64).contiguous()
    lib.move_rows(n, (PTR * n)(*base), (I64 * n)(*row_stride), (I64 * n)(*blocks), (I64 * n)(*block_stride),
                  (I64 * n)(*run), holes.data_ptr(), movers.data_ptr(), moves)
    return True


class LayerStep(ctypes.Structure):
    """`layer_t` of csrc/kernels.c: one decoder layer's weights and caches."""

    _fields_ = [("norm_w", PTRS3), ("norm_b", PTRS3)] + [
        (name, PTR) for name in (
            "self_q_w", "self_q_b", "self_kv_w", "self_kv_b", "self_out_w", "self_out_b",
            "cross_q_w", "cross_q_b", "cross_out_w", "cross_out_b", "ff_in_w", "ff_in_b", "ff_out_w", "ff_out_b",
            "self_k", "self_v",
        )
    ] + [("self_slot_stride", I64), ("self_row_stride", I64), ("cross_k", PTR), ("cross_v", PTR),
         ("cross_k_strides", I64x4), ("cross_v_strides", I64x4)]


class DecoderStep(ctypes.Structure):
    """`step_t` of csrc/kernels.c: the shapes and masks one step shares across layers."""

    _fields_ = [(name, I64) for name in ("R", "D", "H", "F", "N", "S", "past")] + [
        ("norm_first", INT), ("threads", INT), ("eps", F32),
        ("self_mask", PTR), ("self_mask_strides", I64x4), ("src_mask", PTR), ("src_mask_strides", I64x4),
        ("self_rows", PTR),
    ]


# The order DecoderLayer.native_weights lists a layer's parameters in.
LAYER_WEIGHTS = (
    "norm_w0", "norm_w1", "norm_w2", "norm_b0", "norm_b1", "norm_b2",
    "self_q_w", "self_q_b", "self_kv_w", "self_kv_b", "self_out_w", "self_out_b",
    "cross_q_w", "cross_q_b", "cross_out_w", "cross_out_b", "ff_in_w", "ff_in_b", "ff_out_w", "ff_out_b",
)


@dataclass(frozen=True)
class DecoderWeights:
    """A decoder's parameters for the native step: per layer a `LayerStep` with the weight
    pointers (the matrices' packed panels) filled in (each step fills a copy with its caches, so
    threads decoding with one model at once share nothing mutable), d_ff, and the tensors the
    pointers point into. Made at a search's first step and kept with its cache: reading 120
    parameters from the modules costs half a millisecond."""

    layers: list[LayerStep]
    d_ff: int
    tensors: list[Tensor]  # what the pointers point into: packed panels live as long as this does

    @classmethod
    def of(cls, layers: list[list[Tensor]]) -> DecoderWeights | None:
        """From each layer's parameters in LAYER_WEIGHTS order, its weight matrices (*_w but the
        norms') packed by `panels`; None where one is not a contiguous float32 CPU tensor (a
        quantized or otherwise swapped layer)."""
        if not all(isinstance(w, Tensor) and plain_f32(w) and w.is_contiguous() for ws in layers for w in ws):
            return None
        return cls([cls.template(ws) for ws in layers], layers[0][LAYER_WEIGHTS.index("ff_in_b")].numel(),
                   [w for ws in layers for w in ws])

    @staticmethod
    def template(weights: list[Tensor]) -> LayerStep:
        ptrs = dict(zip(LAYER_WEIGHTS, (w.data_ptr() for w in weights)))
        return LayerStep(
            norm_w=PTRS3(ptrs.pop("norm_w0"), ptrs.pop("norm_w1"), ptrs.pop("norm_w2")),
            norm_b=PTRS3(ptrs.pop("norm_b0"), ptrs.pop("norm_b1"), ptrs.pop("norm_b2")),
            **ptrs,
        )


def decoder_steps(
    weights: DecoderWeights,
    caches: list[tuple[Tensor, Tensor, Tensor, Tensor]],
    x: Tensor,
    past: int,
    src_mask: Tensor,
    self_mask: Tensor | None,
    self_rows: Tensor | None,
    n_heads: int,
    norm_first: bool,
    eps: float,
) -> bool:
    """Run the decoder layers natively over x (R, D) in place for one new position per row;
    False (nothing done) where the step does not apply. caches: per layer self_k, self_v
    (capacity, R' >= R, H, Dh) buffers with room for slot `past`, cross_k, cross_v (N, H, S, Dh);
    self_rows (past + 1, R) int64: the buffer row holding each row's keys at each slot, or None
    (its own); masks as DecoderCache gives them."""
    lib = library()
    R, D = x.shape
    N, S = src_mask.size(0), src_mask.size(-1)
    if lib is None or not (plain_f32(x) and x.is_contiguous()) or D % n_heads or (D // n_heads) % 8:
        return False
    Dh = D // n_heads
    for self_k, self_v, cross_k, cross_v in caches:
        if not (
            all(plain_f32(t) and t.stride(-1) == 1 for t in (self_k, self_v, cross_k, cross_v))
            and self_k.stride() == self_v.stride() and self_k.stride(2) == Dh
            and self_k.size(0) > past and self_k.size(1) >= R
        ):
            return False
    if self_rows is not None and not (
        self_rows.dtype is torch.int64 and self_rows.shape == (past + 1, R) and self_rows.is_contiguous()
    ):
        return False
    F = weights.d_ff
    step = DecoderStep(R=R, D=D, H=n_heads, F=F, N=N, S=S, past=past, norm_first=norm_first,
                       threads=torch.get_num_threads(), eps=eps)
    if self_mask is not None:
        m = self_mask.expand(R, n_heads, 1, past + 1)
        step.self_mask, step.self_mask_strides = m.data_ptr(), I64x4(*m.stride())
    m = src_mask.expand(N, n_heads, R // N, S)
    step.src_mask, step.src_mask_strides = m.data_ptr(), I64x4(*m.stride())
    if self_rows is not None:
        step.self_rows = self_rows.data_ptr()
    scratch = x.new_empty(R * (6 * D + F) + step.threads * 4 * max(S, past + 1))
    for template, (self_k, self_v, cross_k, cross_v) in zip(weights.layers, caches):
        layer = LayerStep.from_buffer_copy(template)
        layer.self_k, layer.self_v = self_k.data_ptr(), self_v.data_ptr()
        layer.self_slot_stride, layer.self_row_stride = self_k.stride(0), self_k.stride(1)
        layer.cross_k, layer.cross_v = cross_k.data_ptr(), cross_v.data_ptr()
        layer.cross_k_strides, layer.cross_v_strides = I64x4(*cross_k.stride()), I64x4(*cross_v.stride())
        if lib.decoder_layer_step(ctypes.byref(step), ctypes.byref(layer), x.data_ptr(),
                                  scratch.data_ptr()):
            raise RuntimeError("native decoder step failed (attention's status)")
    return True
