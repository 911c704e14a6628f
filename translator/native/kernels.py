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
- every decoder layer's step for one new position per row, in one call (`decoder_steps`): the
  same arithmetic as translator.model's layers, through the functions above, with no torch op and
  no Python between the products or the layers (so no other thread's Python holds the step up).
docs/RESULTS.md and docs/HISTORY.md have the figures. Each wrapper returns None (or False)
where its kernel does not apply or the library is not loaded (translator.native.loader), and
its caller falls back to torch: same results within float rounding, only slower. Each takes
the library to call as `lib` (the self-test passes the one it checks), else the process's.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from translator.native.abi import I64, PTR, PTRS3, STRIDES, DecoderStep, LayerStep
from translator.native.loader import Kernels, library

PLAIN = (Tensor, torch.nn.Parameter)  # not subclasses that override torch functions


def plain_f32(t: Tensor) -> bool:
    """A float32 CPU tensor or parameter: what the kernels and oneDNN's sgemm can read."""
    return type(t) in PLAIN and t.dtype is torch.float32 and t.is_cpu


def usable(t: Tensor) -> bool:
    return plain_f32(t) and t.dim() == 4 and t.stride(-1) == 1


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, lib: Kernels | None = None) -> Tensor | None:
    """softmax(q k^T / sqrt(Dh)) v, q (B, H, T, Dh), k/v (B, H, S, Dh), outside autograd, as a
    (B, H, T, Dh) view of a (B, T, H, Dh) tensor; None where the kernel does not apply (not
    built, other dtypes or devices, Dh not a multiple of 8 up to 256, non-boolean masks)."""
    lib = lib or library()
    if (
        lib is None or lib.few_query_attention is None
        or not (usable(q) and usable(k) and usable(v))
        or k.shape[:2] != q.shape[:2] or v.shape != k.shape
        or (mask is not None and (mask.dtype is not torch.bool or mask.dim() > 4 or not mask.is_cpu))
    ):
        return None
    return call_attention(lib, q, k, v, mask)


def call_attention(lib: Kernels, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor | None:
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


def panels(weight: Tensor, lib: Kernels | None = None) -> Tensor | None:
    """weight (N, K) packed for `panel_linear`: (ceil(N / PANEL) * K * PANEL,) floats; None where
    the kernels are not built or the weight is not a contiguous float32 CPU matrix."""
    lib = lib or library()
    if lib is None or lib.pack_panels is None or not (plain_f32(weight) and weight.dim() == 2 and weight.is_contiguous()):
        return None
    N, K = weight.shape
    packed = weight.new_empty(-(-N // PANEL) * K * PANEL)
    with torch.no_grad():
        lib.pack_panels(weight.data_ptr(), packed.data_ptr(), N, K)
    return packed


def panel_linear(
    x: Tensor, packed: Tensor, bias: Tensor | None, N: int, relu: bool = False, lib: Kernels | None = None
) -> Tensor | None:
    """x (..., K) @ weight.T + bias -> (..., N), then ReLU if relu, for the (N, K) weight `panels`
    packed, outside autograd; None where the kernel does not apply (x not float32 on the CPU)."""
    lib = lib or library()
    K = x.size(-1)
    if (
        lib is None or lib.panel_linear is None or not K or not plain_f32(x) or torch.is_grad_enabled()
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


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, lib: Kernels | None = None) -> Tensor | None:
    """LayerNorm of inference over the last dimension of x (..., D), its rows split over the
    threads from an encoder's size on; None where the kernel does not apply (not built, x not a
    contiguous float32 CPU tensor)."""
    lib = lib or library()
    if lib is None or lib.layer_norm is None or not (plain_f32(x) and x.is_contiguous() and x.numel()):
        return None
    out = torch.empty_like(x)
    D = x.size(-1)
    lib.layer_norm(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), x.numel() // D, D, eps,
                   torch.get_num_threads())
    return out


def argmax_log_prob(logits: Tensor, lib: Kernels | None = None) -> tuple[Tensor, Tensor] | None:
    """Each row's argmax of log_softmax(logits (n, V)) (n,) int64, the first where tied, and the
    log-probability there (n,), in one native pass over the row, without the (n, V) log-softmax;
    None where the kernel does not apply (not built, not a float32 CPU matrix of unit stride)."""
    lib = lib or library()
    if lib is None or lib.argmax_log_prob is None or not (plain_f32(logits) and logits.dim() == 2 and logits.stride(1) == 1 and logits.size(1)):
        return None
    n, V = logits.shape
    idx, lp = torch.empty(n, dtype=torch.int64), logits.new_empty(n)
    lib.argmax_log_prob(logits.data_ptr(), n, V, logits.stride(0), idx.data_ptr(), lp.data_ptr(),
                        torch.get_num_threads())
    return idx, lp


def move_rows(tensors: list[tuple[Tensor, int]], holes: Tensor, movers: Tensor, lib: Kernels | None = None) -> bool:
    """In each 4-D tensor, with its rows along dimension 0 or 1, copy rows `movers` onto rows
    `holes` in place (x[holes] = x[movers] along that dimension), in one native call; False,
    nothing moved, where a tensor's last two dimensions are not one contiguous run."""
    lib = lib or library()
    if lib is None or lib.move_rows is None:
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


NORMS = ("norm_w", "norm_b")  # LayerStep's arrays of a layer's three LayerNorm weights and biases


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
    def of(cls, layers: list[dict[str, Tensor | list[Tensor] | None]]) -> DecoderWeights | None:
        """From each layer's weights by LayerStep field name (norm_w, norm_b: three tensors each;
        the matrices packed by `panels`); None where one is not a contiguous float32 CPU tensor
        (a quantized or otherwise swapped layer)."""
        tensors = [t for ws in layers for w in ws.values() for t in (w if isinstance(w, list) else [w])]
        if not all(isinstance(t, Tensor) and plain_f32(t) and t.is_contiguous() for t in tensors):
            return None
        return cls([cls.template(ws) for ws in layers], layers[0]["ff_in_b"].numel(), tensors)

    @staticmethod
    def template(weights: dict[str, Tensor | list[Tensor]]) -> LayerStep:
        ptrs = {name: (PTRS3(*(t.data_ptr() for t in w)) if name in NORMS else w.data_ptr())
                for name, w in weights.items()}
        return LayerStep(**ptrs)


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
    lib: Kernels | None = None,
) -> bool:
    """Run the decoder layers natively over x (R, D) in place for one new position per row;
    False (nothing done) where the step does not apply. caches: per layer self_k, self_v
    (capacity, R' >= R, H, Dh) buffers with room for slot `past`, cross_k, cross_v (N, H, S, Dh);
    self_rows (past + 1, R) int64: the buffer row holding each row's keys at each slot, or None
    (its own); masks as DecoderCache gives them."""
    lib = lib or library()
    R, D = x.shape
    N, S = src_mask.size(0), src_mask.size(-1)
    if lib is None or lib.decoder_step is None or not (plain_f32(x) and x.is_contiguous()):
        return False
    if D % n_heads or (D // n_heads) % 8:
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
        step.self_mask, step.self_mask_strides = m.data_ptr(), STRIDES(*m.stride())
    m = src_mask.expand(N, n_heads, R // N, S)
    step.src_mask, step.src_mask_strides = m.data_ptr(), STRIDES(*m.stride())
    if self_rows is not None:
        step.self_rows = self_rows.data_ptr()
    scratch = x.new_empty(R * (6 * D + F) + step.threads * 4 * max(S, past + 1))
    layers = (LayerStep * len(caches))(*weights.layers)  # copies, filled with this step's caches
    for layer, (self_k, self_v, cross_k, cross_v) in zip(layers, caches):
        layer.self_k, layer.self_v = self_k.data_ptr(), self_v.data_ptr()
        layer.self_slot_stride, layer.self_row_stride = self_k.stride(0), self_k.stride(1)
        layer.cross_k, layer.cross_v = cross_k.data_ptr(), cross_v.data_ptr()
        layer.cross_k_strides, layer.cross_v_strides = STRIDES(*cross_k.stride()), STRIDES(*cross_v.stride())
    if lib.decoder_step(ctypes.byref(step), layers, len(caches), x.data_ptr(), scratch.data_ptr()):
        raise RuntimeError("native decoder step failed (attention's status)")
    return True
