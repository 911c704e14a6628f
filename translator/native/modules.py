"""The native backend's forms of translator.model's modules, and the one place they are applied.

Each form subclasses the module it replaces and adds no parameter or buffer, so the state dict,
checkpoints and results stay those of the reference; `apply` gives a model's modules these
classes in place (`module.__class__`), `remove` gives them back theirs. Forms differ from the
reference only outside autograd (training, tracing and export see torch's modules unchanged),
and each falls back to the reference where its kernel does not apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translator import handover
from translator.cache import DecoderCache, LayerCache
from translator.model import (
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderDecoder,
    FeedForward,
    Generator,
    MultiHeadAttention,
    Residual,
)
from translator.native import kernels, onednn

# Outside autograd, up to FEW_QUERIES queries per sentence and head (a decoding step: one, or a
# sentence's beams over its source; the encoder over a source of up to 40 tokens) take the native
# kernel: torch's fused kernel, made for long runs of queries, spends most of its time per
# (sentence, head) item when each has only a few queries, while the native kernel keeps an
# item's scores and sums in registers; with many queries the fused kernel's blocking wins, and
# the bound sits below the measured crossover (docs/HISTORY.md, round 7).
FEW_QUERIES = 40
FEW_ROWS = 64  # up to this many rows the generator takes its decoding-step forms
# A padded batch whose real tokens fill at most this share of it is encoded over its real tokens only.
PACK_BELOW = 0.9


class PackedLinear(nn.Linear):
    """`nn.Linear` whose inference runs over its weight packed once in panels
    (`kernels.panel_linear`, packed again when the weight changes), bias and an optional ReLU in
    the same call: oneDNN's sgemm packs the weight again at every call, a cost a decoding step's
    few rows cannot spread (benchmarks/gemm_backends.py)."""

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            packed = self.panels()
            out = None if packed is None else kernels.panel_linear(x, packed, self.bias, self.out_features, relu)
            if out is not None:
                return out
        y = F.linear(x, self.weight, self.bias)
        return F.relu(y) if relu else y

    def panels(self) -> Tensor | None:
        """The weight packed by `kernels.panels`; None where the kernels are not built."""
        return onednn.weight_copy(self.__dict__.setdefault("_copies", {}), "panels", self.weight, kernels.panels)


class NativeLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` whose inference is one native call: at a decoding step's few rows torch's
    op and its allocation cost far more than the arithmetic."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or self.weight is None or self.bias is None:
            return super().forward(x)
        out = kernels.layer_norm(x, self.weight, self.bias, self.eps) if self.normalized_shape == x.shape[-1:] else None
        return super().forward(x) if out is None else out


class NativeAttention(MultiHeadAttention):
    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if self.training or torch.is_grad_enabled() or x.size(1) > FEW_QUERIES:
            return super().attend(x, k, v, mask)
        B, T, D = x.size()
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        y = kernels.attention(q, k, v, mask)  # (B, H, T, Dh)
        if y is None:  # other dtypes, devices, head sizes: torch's
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class NativeEncoder(Encoder):
    """Outside autograd, a padded batch runs its position-wise products over its real tokens only
    (a sentence joining a running batch is encoded beside others of any length: ten random test
    sentences fill 60% of their padded batch). Self-attention alone sees the padded layout; the
    real positions' arithmetic is the reference's, padding positions come out zero."""

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        B, S, D = x.shape
        index = None if self.training else real_positions(x, src_mask)  # (T,)
        if index is None:
            return super().forward(x, src_mask)
        h = x.reshape(B * S, D).index_select(0, index)  # (T, D)
        for layer in self.layers:
            h = layer.around(h, lambda y, attn=layer.self_attn: packed_self_attention(attn, y, index, B, S, src_mask))
        return unpacked(self.norm(h), index, B, S)


def real_positions(x: Tensor, src_mask: Tensor) -> Tensor | None:
    """Positions of the real tokens of x (B, S, D) in its (B * S) rows, where computing over them
    alone pays: outside autograd, float32, real tokens at most PACK_BELOW of the rows; else None."""
    real = src_mask.reshape(-1)  # (B * S,)
    if torch.is_grad_enabled() or x.dtype != torch.float32 or int(real.sum()) > PACK_BELOW * real.numel():
        return None
    return real.nonzero().squeeze(1)


def packed_self_attention(
    attn: MultiHeadAttention, y: Tensor, index: Tensor, B: int, S: int, mask: Tensor
) -> Tensor:
    """Self-attention of the real tokens y (T, D) at `index` of a (B, S) batch -> (T, D): the
    projections over the T rows, the attention itself in the padded layout."""
    q = attn.split_heads(unpacked(attn.q_proj(y), index, B, S))  # (B, H, S, Dh)
    k, v = map(attn.split_heads, unpacked(attn.kv_proj(y), index, B, S).chunk(2, dim=-1))  # (B, H, S, Dh) each
    out = kernels.attention(q, k, v, mask) if S <= FEW_QUERIES else None
    if out is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, Dh)
    return attn.out_proj(out.transpose(1, 2).reshape(B * S, -1).index_select(0, index))


def unpacked(h: Tensor, index: Tensor, B: int, S: int) -> Tensor:
    """Rows h (T, X) at `index` of a (B, S) layout -> (B, S, X), zeros elsewhere."""
    out = h.new_zeros(B * S, h.size(-1))
    return out.index_copy_(0, index, h).view(B, S, -1)


class NativeFeedForward(FeedForward):
    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.w_1, PackedLinear) and not (self.training and self.dropout):
            return self.w_2(self.w_1(x, relu=True))  # the ReLU in the product's native call
        return super().forward(x)  # training, or a swapped layer (a quantized copy)


class NativeResidual(Residual):
    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.training or torch.is_grad_enabled():
            return super().forward(x, sublayer)
        # The sum into the sublayer's output, which nothing else holds (sublayers end in a
        # linear layer): a decoding step's allocations saved; no dropout call in eval mode.
        if self.norm_first:
            return add_into(sublayer(self.norm(x)), x)
        return self.norm(add_into(sublayer(x), x))


def add_into(y: Tensor, x: Tensor) -> Tensor:
    """y + x, into y where it matches x (autocast's half-precision outputs do not: out of place)."""
    if y is x or y.dtype != x.dtype or y.shape != x.shape:
        return x + y
    return y.add_(x)


@dataclass
class NativeDecoderCache(DecoderCache):
    native: kernels.DecoderWeights | bool | None = None  # the native step's weights (False: none), made at its first step

    def move_rows(self, tensors: list[tuple[Tensor, int]], holes: Tensor, movers: Tensor) -> None:
        if not kernels.move_rows(tensors, holes, movers):  # one call, not two torch ops a tensor
            super().move_rows(tensors, holes, movers)


def layer_weights(
    layer: DecoderLayer, pack: Callable[[nn.Linear], Tensor | None] | None = None
) -> dict[str, Tensor | list[Tensor] | None]:
    """A decoder layer's parameters by the names of abi.LayerStep (csrc/kernels.h's layer_t),
    the linear layers' weights packed by `pack` (default: a PackedLinear's own panels, None for
    a swapped layer such as a quantized copy's)."""
    norms = [s.norm for s in layer.sublayers]
    sa, ca, ff = layer.self_attn, layer.cross_attn, layer.feed_forward
    out: dict[str, Tensor | list[Tensor] | None] = {"norm_w": [n.weight for n in norms], "norm_b": [n.bias for n in norms]}
    for name, linear in (("self_q", sa.q_proj), ("self_kv", sa.kv_proj), ("self_out", sa.out_proj),
                         ("cross_q", ca.q_proj), ("cross_out", ca.out_proj), ("ff_in", ff.w_1), ("ff_out", ff.w_2)):
        packed = pack(linear) if pack is not None else linear.panels() if isinstance(linear, PackedLinear) else None
        out[f"{name}_w"], out[f"{name}_b"] = packed, linear.bias
    return out


class NativeDecoder(Decoder):
    def step(self, x: Tensor, cache: DecoderCache, record: bool) -> Tensor:
        if not record and x.size(1) == 1 and self.native_step(x, cache):
            return self.norm(x)
        return super().step(x, cache, record)

    def native_step(self, x: Tensor, cache: DecoderCache) -> bool:
        """Every layer's step on one new position per row, x (R, 1, D), in place, natively
        (kernels.decoder_steps: the same arithmetic without a torch op between the products);
        False, nothing done, where it does not apply (autograd, dropout, no native kernels)."""
        if self.training or torch.is_grad_enabled() or not x.is_contiguous() or not isinstance(cache, NativeDecoderCache):
            return False
        if cache.native is None:  # once per search: the weights as the modules hold them now
            cache.native = kernels.DecoderWeights.of([layer_weights(layer) for layer in self.layers]) or False
        if not cache.native:
            return False
        R, _, D = x.shape
        first = self.layers[0]
        H = first.self_attn.n_heads
        like = x.new_empty(()).expand(R, H, 1, D // H)  # the shape of one position's keys
        for lc in cache.layers:
            lc.reserve(like, cache.length, cache.length + 1, cache.capacity)
        caches = [(lc.self_k, lc.self_v, lc.cross_k, lc.cross_v) for lc in cache.layers]
        rows = cache.slot_rows_until(cache.length + 1) if cache.slot_rows is not None else None
        handover.release()  # the event loop's Python runs beside the step, which needs no GIL
        return kernels.decoder_steps(cache.native, caches, x.view(R, D), cache.length, cache.src_mask,
                                     cache.self_attention_mask(1), rows, H, first.sublayers[0].norm_first,
                                     first.sublayers[0].norm.eps)


class NativeGenerator(Generator):
    """The tied projection's faster forms of decoding steps (benchmarks/generator.py): through
    oneDNN where it is installed (translator.native.onednn), a (D, V) row-major copy of the
    weight up to onednn.PACKED_ROWS rows and the weight packed for torch's oneDNN primitive past
    them (the native panels are slower than both for this one wide product); without oneDNN,
    through MKL: for one row the (D, V) copy, for 2 to FEW_ROWS rows the logits computed
    transposed. Copies are kept until the weight changes (V x D floats each)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.embedding.weight  # (V, D)
        if torch.is_grad_enabled():
            return F.linear(x, weight)
        rows = x.numel() // x.size(-1)
        if onednn.enabled():
            packed = self.copy("packed", onednn.pack) if rows > onednn.PACKED_ROWS else None
            if packed is not None:
                return onednn.packed_linear(x, packed)
            return onednn.matmul(x, self.copy("columns", columns))  # (..., D) @ (D, V)
        if rows > FEW_ROWS:
            return F.linear(x, weight)
        if rows == 1:
            return x @ self.copy("columns", columns)
        logits = weight @ x.reshape(rows, -1).t()  # (V, rows)
        return logits.t().contiguous().view(*x.shape[:-1], -1)

    def copy(self, name: str, make) -> Tensor | None:
        """make(weight), made again whenever the weight has changed (training, loading)."""
        return onednn.weight_copy(self.__dict__.setdefault("_copies", {}), name, self.embedding.weight, make)


def columns(weight: Tensor) -> Tensor:
    """The weight (V, D) as (D, V), row-major."""
    return weight.t().contiguous()


class NativeEncoderDecoder(EncoderDecoder):
    def init_cache(self, memory: Tensor, src_mask: Tensor, capacity: int = 64) -> DecoderCache:
        return NativeDecoderCache(layers=self.packed_layer_caches(memory, src_mask), src_mask=src_mask,
                                  capacity=capacity)

    def packed_layer_caches(self, memory: Tensor, src_mask: Tensor) -> list[LayerCache]:
        """`layer_caches`, projecting only the real positions of a padded memory (B, S, D) where
        padding is worth skipping (keys and values of padding are zero; attention masks them)."""
        B, S, D = memory.shape
        index = real_positions(memory, src_mask)  # (T,)
        if index is None:
            return self.layer_caches(memory)
        h = memory.reshape(B * S, D).index_select(0, index)  # (T, D)
        layers = []
        for layer in self.decoder.layers:
            attn = layer.cross_attn
            k, v = map(attn.split_heads, unpacked(attn.kv_proj(h), index, B, S).chunk(2, dim=-1))
            layers.append(LayerCache(cross_k=k.contiguous(), cross_v=v.contiguous()))
        return layers

    def best_tokens(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        # One pass over each row, without writing the (n, V) log-softmax.
        native = kernels.argmax_log_prob(logits)
        return native if native is not None else super().best_tokens(logits)


FORMS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: PackedLinear,
    nn.LayerNorm: NativeLayerNorm,
    MultiHeadAttention: NativeAttention,
    FeedForward: NativeFeedForward,
    Residual: NativeResidual,
    Decoder: NativeDecoder,
    Encoder: NativeEncoder,
    Generator: NativeGenerator,
    EncoderDecoder: NativeEncoderDecoder,
}
REFERENCE = {form: reference for reference, form in FORMS.items()}

M = TypeVar("M", bound=nn.Module)


def apply(model: M) -> M:
    """The model with its modules in their native forms, in place (modules of other classes,
    such as a quantized copy's layers, stay as they are)."""
    for module in model.modules():
        form = FORMS.get(type(module))
        if form is not None:
            module.__class__ = form
    return model


def remove(model: M) -> M:
    """The model with its modules back in translator.model's classes, in place; packed copies dropped."""
    for module in model.modules():
        reference = REFERENCE.get(type(module))
        if reference is not None:
            module.__class__ = reference
            module.__dict__.pop("_copies", None)
    return model
