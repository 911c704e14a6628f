"""The Transformer of "Attention Is All You Need", composed as in the paper.

Shape letters, used in every comment of the package:
    B batch, S source length, T target length, D d_model, H heads, Dh head dim (D // H),
    F d_ff, V vocabulary, K beam; in incremental decoding, N sources and R decoder rows
    (R = N * group, e.g. B * K for beam search).

Masks are boolean with True = may attend, the convention of
`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translator import gemm, kernels
from translator.config import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters with the paper's names; one object rebuilds the model."""

    vocab_size: int = 8000
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0  # on the feed-forward's hidden units, in training
    max_positions: int = 256
    norm_first: bool = False
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_positions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"model.{name} must be a token id below vocab_size")


# Outside autograd, up to FEW_QUERIES queries per sentence and head (a decoding step: one, or a
# sentence's beams over its source; the encoder over a source of up to 40 tokens) take the native
# kernel (translator.kernels) where it is built: torch's fused kernel, made for long runs of
# queries, spends most of its time per (sentence, head) item when each has only a few queries,
# while the native kernel keeps an item's scores and sums in registers; with many queries the
# fused kernel's blocking wins, and the bound sits below the measured crossover (docs/HISTORY.md,
# round 7).
FEW_QUERIES = 40


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """Scaled dot-product attention. q (B, H, T, Dh), k/v (B, H, S, Dh), mask broadcast to (B, H, T, S)."""
    if q.size(-2) <= FEW_QUERIES and not dropout_p and not torch.is_grad_enabled():
        out = kernels.attention(q, k, v, mask)
        if out is not None:
            return out
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """The softmax weights `attention` uses, (B, H, T, S)."""
    scores = (q @ k.transpose(-2, -1)).mul_(1 / math.sqrt(q.size(-1)))  # (B, H, T, S)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores.softmax(dim=-1)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query and key/value inputs."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = gemm.Linear(d_model, d_model)
        self.kv_proj = gemm.Linear(d_model, 2 * d_model)
        self.out_proj = gemm.Linear(d_model, d_model)

    def split_heads(self, x: Tensor) -> Tensor:
        B, L, D = x.size()
        return x.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, L, Dh)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Project x (B, L, D) to keys and values, each (B, H, L, Dh)."""
        k, v = self.kv_proj(x).chunk(2, dim=-1)  # (B, L, D) each
        return self.split_heads(k), self.split_heads(v)

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Queries from x (B, T, D) over k/v (B, H, S, Dh) -> (B, T, D)."""
        B, T, D = x.size()
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, p)  # (B, H, T, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))

    def weights(self, x: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        """Attention weights of queries from x over keys k, averaged over heads: (B, T, S)."""
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        return attention_weights(q, k, mask).mean(dim=1)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None) -> Tensor:
        k, v = self.keys_values(memory)
        return self.attend(x, k, v, mask)


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear(D, F) -> ReLU -> Linear(F, D), as in the paper.

    The paper drops only sublayer outputs and embeddings; `dropout` on the hidden units
    (activation dropout, as small-data recipes use) is off by default: on CPU the (B*T, F) mask
    costs about a tenth of a training step.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w_1 = gemm.Linear(d_model, d_ff)
        self.w_2 = gemm.Linear(d_ff, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.dropout:
            return self.w_2(F.dropout(F.relu(self.w_1(x)), self.dropout))  # (B, T, F) hidden dropped
        if isinstance(self.w_1, gemm.Linear):  # the ReLU in the product's native call
            return self.w_2(self.w_1(x, relu=True))
        return self.w_2(F.relu(self.w_1(x)))  # a swapped layer (a quantized copy)


class Residual(nn.Module):
    """x + dropout(sublayer(norm(x))) when norm_first, else norm(x + dropout(sublayer(x)))."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm = kernels.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.norm_first:
            return add_residual(x, self.drop(sublayer(self.norm(x))))
        return self.norm(add_residual(x, self.drop(sublayer(x))))

    def drop(self, y: Tensor) -> Tensor:
        # Skipped outright in eval mode: a decoding step calls it 18 times for nothing.
        return self.dropout(y) if self.training else y


def add_residual(x: Tensor, y: Tensor) -> Tensor:
    """x + y; outside autograd into y, a sublayer's output that nothing else holds (the model's
    sublayers end in a linear layer), saving a decoding step 18 allocations. Where y's dtype or
    shape differs (autocast's half-precision outputs), out of place: the sum takes x's."""
    if torch.is_grad_enabled() or y is x or y.dtype != x.dtype or y.shape != x.shape:
        return x + y
    return y.add_(x)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.feed_forward = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout)
        self.sublayers = nn.ModuleList(
            [Residual(cfg.d_model, cfg.dropout, cfg.norm_first) for _ in range(2)]
        )

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        """x (B, S, D), src_mask (B, 1, 1, S) -> (B, S, D)."""
        x = self.sublayers[0](x, lambda y: self.self_attn(y, y, src_mask))
        return self.sublayers[1](x, self.feed_forward)


@dataclass
class LayerCache:
    """Keys/values one decoder layer has seen: self-attention grows by a step, cross is fixed.

    Cross-attention keys/values have one row per source; the decoder rows reading a source
    (its beams) sit next to each other, `group` of them, and share it. Self-attention keys and
    values are stored position-major in a buffer with room to grow, so that a step appends in
    place; a beam reorder moves nothing, it is kept in DecoderCache.slot_rows.
    """

    cross_k: Tensor  # (N, H, S, Dh)
    cross_v: Tensor  # (N, H, S, Dh)
    self_k: Tensor | None = None  # (capacity, R, H, Dh)
    self_v: Tensor | None = None  # (capacity, R, H, Dh)

    def reserve(self, like: Tensor, past: int, end: int, capacity: int) -> None:
        """Room for `end` positions, the first `past` kept; like (R, H, t, Dh): the keys to come."""
        if self.self_k is None or end > self.self_k.size(0):
            room = max(end, capacity, 2 * self.self_k.size(0) if self.self_k is not None else 0)
            self.self_k = grown(self.self_k, like, past, room)
            self.self_v = grown(self.self_v, like, past, room)

    def append(self, k: Tensor, v: Tensor, past: int, capacity: int) -> tuple[Tensor, Tensor]:
        """Store new keys/values k, v (R, H, t, Dh) after `past` positions -> all of them, (R, H, past + t, Dh)."""
        end = past + k.size(2)
        self.reserve(k, past, end, capacity)
        self.self_k[past:end] = k.permute(2, 0, 1, 3)
        self.self_v[past:end] = v.permute(2, 0, 1, 3)
        return self.self_k[:end].permute(1, 2, 0, 3), self.self_v[:end].permute(1, 2, 0, 3)


def grown(buffer: Tensor | None, like: Tensor, filled: int, room: int) -> Tensor:
    """A (room, R, H, Dh) buffer holding the first `filled` positions of `buffer` (or none); R:
    the buffer's rows (more than like's when rows left with their keys in the slot table)."""
    R, H, _, Dh = like.shape
    out = like.new_empty((room, R if buffer is None else buffer.size(1), H, Dh))
    if buffer is not None and filled:
        out[:filled] = buffer[:filled]
    return out


def take_rows(buffer: Tensor, index: Tensor, first: int, filled: int) -> Tensor:
    """Rows `index` of a (capacity, R, H, Dh) buffer; its positions first..filled-1 move to the front."""
    out = buffer.new_empty((buffer.size(0), index.numel()) + tuple(buffer.shape[2:]))
    torch.index_select(buffer[first:filled], 1, index, out=out[: filled - first])
    return out


def room_view(x: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """A view of x's buffer with x's strides and the larger `shape`, if the buffer holds it without
    its dimensions overlapping (x a leading slice of a larger buffer); None otherwise."""
    for i in range(1, x.dim()):
        if shape[i] * x.stride(i) > x.stride(i - 1):
            return None
    end = x.storage_offset() + sum((n - 1) * st for n, st in zip(shape, x.stride())) + 1
    if end > x.untyped_storage().nbytes() // x.element_size():
        return None
    return x.as_strided(shape, x.stride(), x.storage_offset())


def with_sources(x: Tensor, new: Tensor) -> Tensor:
    """Cross-attention keys or values x (N, H, S, Dh) followed by new (n, H, S', Dh), padded with
    zeros to the longer source: in x's buffer when it has room, else in one with room to spare,
    so that sentences joining a running batch do not copy every other sentence's keys each time."""
    N, H, S, Dh = x.shape
    n, S2 = new.size(0), new.size(2)
    shape = (N + n, H, max(S, S2), Dh)
    out = room_view(x, shape)
    if out is None:
        out = x.new_empty((2 * shape[0], H, shape[2] + 16, Dh))[: shape[0], :, : shape[2]]
        out[:N, :, :S] = x
    out[:N, :, S:] = 0  # padding: masked, but must not be NaN garbage (0 * NaN is NaN)
    out[N:, :, :S2] = new
    out[N:, :, S2:] = 0
    return out


def with_rows(buffer: Tensor, added: int, filled: int) -> Tensor:
    """A self-attention buffer (capacity, R, H, Dh) with `added` more rows, zero in the `filled`
    slots they never attend to; in place when the buffer has room, else in one with room to spare."""
    P, R, H, Dh = buffer.shape
    out = room_view(buffer, (P, R + added, H, Dh))
    if out is None:
        out = buffer.new_empty((P, 2 * (R + added), H, Dh))[:, : R + added]
        out[:filled, :R] = buffer[:filled]
    out[:filled, R:] = 0
    return out


def padded(x: Tensor, dim: int, size: int, value: float | bool = 0) -> Tensor:
    """x with dimension `dim` padded at the end to `size` with `value`."""
    if x.size(dim) >= size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.size(dim)
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


@dataclass
class DecoderCache:
    """Incremental decoding state: per-layer keys/values, the source mask and the step count.

    Rows: the decoder runs R = N * group rows; rows g*group ... g*group + group - 1 translate
    source g (a sentence's beams), and read its cross-attention keys/values without copies.

    Self-attention keys/values sit in `length` slots, one per step run. Rows that joined a
    running batch (`extend`) start at a later slot: `start` (R,) holds each row's first slot,
    so a row's position is `length - start`, and it attends only to slots from its own start.
    """

    layers: list[LayerCache]
    src_mask: Tensor  # (N, 1, 1, S)
    group: int = 1
    capacity: int = 64  # self-attention positions to allocate at first
    length: int = 0
    alignments: list[Tensor] = field(default_factory=list)  # per step (R, S) when recorded
    start: Tensor | None = None  # (R,) first slot of each row; None: every row starts at slot 0
    # (n, R): the buffer row holding row r's keys/values at slot j < n (beams reordered by
    # `select` without moving them); later slots, and every slot when None: buffer row r.
    slot_rows: Tensor | None = None
    native: kernels.DecoderWeights | bool | None = None  # the native step's weights (False: none), made at its first step

    def positions(self, t: int) -> int | Tensor:
        """Positions of the next t tokens: an offset shared by all rows, or per row (R, t)."""
        if self.start is None:
            return self.length
        return self.length - self.start[:, None] + torch.arange(t, device=self.start.device)  # (R, t)

    def self_attention_mask(self, t: int) -> Tensor | None:
        """Which of the length + t slots each of t new positions may attend to: None (all of
        them, t == 1), (t, length + t) causal, or (R, 1, t, length + t) with rows' own starts."""
        total = self.length + t
        causal = None
        if t > 1:  # new positions see all past slots and, among themselves, only earlier ones
            causal = torch.ones(t, total, dtype=torch.bool, device=self.src_mask.device).tril(total - t)
        if self.start is None:
            return causal
        slots = torch.arange(total, device=self.start.device)
        own = (slots >= self.start[:, None])[:, None, None, :]  # (R, 1, 1, total)
        return own if causal is None else own & causal

    def slot_rows_until(self, n: int) -> Tensor:
        """`slot_rows` for slots 0..n-1, (n, R), later slots written out as their own rows."""
        R = self.src_mask.size(0) * self.group
        have = 0 if self.slot_rows is None else self.slot_rows.size(0)
        own = torch.arange(R, device=self.src_mask.device).expand(n - have, R)
        return own.contiguous() if self.slot_rows is None else torch.cat([self.slot_rows, own])

    def settle(self) -> None:
        """Move the self-attention keys/values `slot_rows` points at into each row's own buffer row."""
        if self.slot_rows is None:
            return
        n, R = self.slot_rows.shape
        slots = torch.arange(n, device=self.slot_rows.device)[:, None]  # (n, 1)
        for lc in self.layers:
            for name in ("self_k", "self_v"):
                buffer = getattr(lc, name)  # (capacity, R', H, Dh)
                out = buffer.new_empty((buffer.size(0), R) + tuple(buffer.shape[2:]))
                if buffer.is_contiguous():
                    # One row gather over (slot, row) pairs: advanced indexing on two dimensions
                    # copies element-wise, and this is the cost of every join into a running beam search.
                    flat = (slots * buffer.size(1) + self.slot_rows).flatten()  # (n*R,)
                    torch.index_select(buffer.flatten(0, 1), 0, flat, out=out[:n].view(n * R, *buffer.shape[2:]))
                else:
                    out[:n] = buffer[slots, self.slot_rows]
                setattr(lc, name, out)
        self.slot_rows = None

    def extend(self, new: DecoderCache) -> None:
        """Append the sources of `new` (a fresh cache of other sources, one row each) with `group`
        rows each, which start at the next slot: a joining sentence takes as many rows as every
        other (its beams). Source lengths are padded to the longer of the two (masked)."""
        if new.group != 1 or new.length:
            raise ValueError("a cache extends only by a one-row-per-source cache that has not decoded yet")
        self.settle()
        n = new.src_mask.size(0)
        R, added = self.src_mask.size(0) * self.group, n * self.group
        if not R:  # no row left: every slot goes, and the new rows start at slot 0
            self.length, self.start = 0, None
        S = max(self.src_mask.size(-1), new.src_mask.size(-1))
        self.src_mask = torch.cat([padded(self.src_mask, 3, S, False), padded(new.src_mask, 3, S, False)])
        for lc, lnew in zip(self.layers, new.layers):
            lc.cross_k = with_sources(lc.cross_k, lnew.cross_k)  # (N + n, H, S, Dh)
            lc.cross_v = with_sources(lc.cross_v, lnew.cross_v)
            if lc.self_k is not None:
                lc.self_k = with_rows(lc.self_k, added, self.length)  # (capacity, R + added, H, Dh)
                lc.self_v = with_rows(lc.self_v, added, self.length)
        if self.length:
            start = self.start if self.start is not None else self.src_mask.new_zeros(R, dtype=torch.long)
            self.start = torch.cat([start, start.new_full((added,), self.length)])
        elif self.start is not None:
            self.start = torch.cat([self.start, self.start.new_zeros(added)])

    def drop(self, keep: Tensor) -> Tensor:
        """Drop the rows not flagged in keep (R,) bool, one row per source, in place: the last kept
        rows move into the holes, so only they are copied, not every row that stays; slots before
        the earliest start of the rows kept are dropped too (a view, not a copy).

        Returns the new order (k,): new row i is old row order[i]; per-row state follows it.
        """
        if self.group != 1:
            raise ValueError("drop() keeps one row per source; reorder beams with select()")
        self.settle()
        kept = int(keep.sum())
        holes = (~keep[:kept]).nonzero().squeeze(1)  # dropped rows among the first `kept`
        movers = keep[kept:].nonzero().squeeze(1) + kept  # kept rows after them, as many
        order = torch.arange(kept, device=keep.device)
        order[holes] = movers
        first = 0 if kept else self.length  # no row left: every slot goes
        if self.start is not None:
            start = self.start[order]
            first = int(start.min()) if kept else first
            start = start - first
            self.start = start if bool(start.any()) else None
        # Cross keys/values have rows along dimension 0, self-attention buffers along 1.
        rows = [(getattr(lc, name), 0) for lc in self.layers for name in ("cross_k", "cross_v")]
        rows += [(getattr(lc, name)[: self.length], 1) for lc in self.layers if lc.self_k is not None
                 for name in ("self_k", "self_v")]
        if not kernels.move_rows(rows, holes, movers):  # two torch ops a tensor: a millisecond a drop
            for x, dim in rows:
                x.index_copy_(dim, holes, x.index_select(dim, movers))
        for lc in self.layers:
            lc.cross_k, lc.cross_v = lc.cross_k[:kept], lc.cross_v[:kept]
            if lc.self_k is not None:
                lc.self_k, lc.self_v = lc.self_k[first:, :kept], lc.self_v[first:, :kept]
        self.src_mask = self.src_mask[order]
        self.length -= first
        return order

    def select(self, index: Tensor, group: int | None = None) -> None:
        """Keep or reorder decoder rows: new row i is old row index[i]; `group` rows per source after.

        Each run of `group` new rows must come from one source (beams reordered within their
        sentence, finished sentences dropped); sources no row reads are dropped. Slots before
        the earliest start of the rows kept are dropped too. Self-attention keys/values stay
        where they are, the new order composed into `slot_rows`, unless rows outnumber the
        buffers' rows: then they are copied into the new order.
        """
        group = group or self.group
        if index.numel() % group:
            raise ValueError(f"{index.numel()} rows do not split into groups of {group}")
        sources = index[::group] // self.group  # (N',)
        self.group = group
        same_sources = sources.numel() == self.src_mask.size(0) and bool(
            (sources == torch.arange(sources.numel(), device=sources.device)).all()
        )
        first = 0
        if self.start is not None:
            start = self.start[index]
            first = int(start.min()) if start.numel() else 0
            start = start - first
            self.start = start if bool(start.any()) else None
        # Rows that fit the buffers are reordered in the slot table alone: copying every key and
        # value of every layer is bound by memory bandwidth, and with sentences joining a running
        # beam search (rows with their own starts) it would be every step's.
        buffers = self.layers[0].self_k
        in_table = buffers is not None and index.numel() <= buffers.size(1)
        if in_table:
            self.slot_rows = self.slot_rows_until(self.length)[first:, index]  # (length - first, R')
        else:
            self.settle()
        for lc in self.layers:
            if not same_sources:
                lc.cross_k, lc.cross_v = lc.cross_k[sources], lc.cross_v[sources]
            if lc.self_k is None:
                continue
            if in_table:  # dropped slots go as a view
                lc.self_k, lc.self_v = lc.self_k[first:], lc.self_v[first:]
            else:
                lc.self_k = take_rows(lc.self_k, index, first, self.length)
                lc.self_v = take_rows(lc.self_v, index, first, self.length)
        self.length -= first
        if not same_sources:
            self.src_mask = self.src_mask[sources]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.feed_forward = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout)
        self.sublayers = nn.ModuleList(
            [Residual(cfg.d_model, cfg.dropout, cfg.norm_first) for _ in range(3)]
        )

    def forward(
        self, x: Tensor, memory: Tensor, src_mask: Tensor, tgt_mask: Tensor | None
    ) -> Tensor:
        """Full-sequence (teacher-forced) pass. x (B, T, D), memory (B, S, D) -> (B, T, D)."""
        x = self.sublayers[0](x, lambda y: self.self_attn(y, y, tgt_mask))
        x = self.sublayers[1](x, lambda y: self.cross_attn(y, memory, src_mask))
        return self.sublayers[2](x, self.feed_forward)

    def native_weights(self) -> list[Tensor | None]:
        """The parameters in the order the native step reads them (kernels.LAYER_WEIGHTS), the
        linear layers' weights packed (gemm.Linear.panels); None for a swapped linear layer."""
        norms = [s.norm for s in self.sublayers]
        sa, ca, ff = self.self_attn, self.cross_attn, self.feed_forward

        def packed(layer: nn.Module) -> list[Tensor | None]:
            if not isinstance(layer, gemm.Linear):  # a quantized copy's: torch's layers run it
                return [None, None]
            return [layer.panels(), layer.bias]

        return [*(n.weight for n in norms), *(n.bias for n in norms),
                *packed(sa.q_proj), *packed(sa.kv_proj), *packed(sa.out_proj),
                *packed(ca.q_proj), *packed(ca.out_proj), *packed(ff.w_1), *packed(ff.w_2)]

    def step(
        self, x: Tensor, cache: DecoderCache, layer: int, self_mask: Tensor | None, record: list | None
    ) -> Tensor:
        """Incremental pass over new positions x (R, t, D), attending to the cached ones self_mask allows."""
        lc = cache.layers[layer]

        def self_block(y: Tensor) -> Tensor:
            k, v = self.self_attn.keys_values(y)  # (R, H, t, Dh)
            k, v = lc.append(k, v, cache.length, cache.capacity)  # (R, H, past + t, Dh)
            return self.self_attn.attend(y, k, v, self_mask)

        def cross_block(y: Tensor) -> Tensor:
            R, t, D = y.size()
            per_source = y.reshape(R // cache.group, cache.group * t, D)  # (N, group * t, D)
            if record is not None:
                record.append(self.cross_attn.weights(per_source, lc.cross_k, cache.src_mask).view(R, t, -1))
            return self.cross_attn.attend(per_source, lc.cross_k, lc.cross_v, cache.src_mask).view(R, t, D)

        x = self.sublayers[0](x, self_block)
        x = self.sublayers[1](x, cross_block)
        return self.sublayers[2](x, self.feed_forward)


class Embeddings(nn.Module):
    """Token embedding scaled by sqrt(D) plus sinusoidal positions, then dropout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.register_buffer("positions", sinusoids(cfg.max_positions, cfg.d_model), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, offset: int | Tensor = 0) -> Tensor:
        """ids (B, L) -> (B, L, D); offset is the position of ids[:, 0], or each token's position (B, L)."""
        L = ids.size(1)
        last = offset + L if isinstance(offset, int) else int(offset.max()) + 1
        if last > self.positions.size(0):
            raise ValueError(f"sequence of {last} tokens exceeds max_positions {self.positions.size(0)}")
        x = self.tokens(ids) * math.sqrt(self.d_model)
        positions = self.positions[offset : offset + L] if isinstance(offset, int) else self.positions[offset]
        return self.dropout(x + positions)


def sinusoids(n_positions: int, d_model: int) -> Tensor:
    """The paper's fixed positional encodings, (n_positions, D)."""
    position = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)  # (P, 1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = kernels.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, src_mask)
        return self.norm(x)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = kernels.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()

    def forward(self, x: Tensor, memory: Tensor, src_mask: Tensor, tgt_mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, memory, src_mask, tgt_mask)
        return self.norm(x)

    def step(self, x: Tensor, cache: DecoderCache, record: bool) -> Tensor:
        if not record and x.size(1) == 1 and self.native_step(x, cache):
            return self.norm(x)
        cache.settle()  # torch's layers read each row's keys from its own buffer row
        rows: list[Tensor] | None = [] if record else None
        self_mask = cache.self_attention_mask(x.size(1))
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cache, i, self_mask, rows)
        if rows:
            # Alignment of the last new position, averaged over layers: (B, S).
            cache.alignments.append(torch.stack(rows).mean(dim=0)[:, -1])
        return self.norm(x)

    def native_step(self, x: Tensor, cache: DecoderCache) -> bool:
        """Every layer's step on one new position per row, x (R, 1, D), in place, natively
        (kernels.decoder_steps: the same arithmetic without a torch op between the products);
        False, nothing done, where it does not apply (autograd, dropout, no native kernels)."""
        if self.training or torch.is_grad_enabled() or not x.is_contiguous():
            return False
        if cache.native is None:  # once per search: the weights as the modules hold them now
            cache.native = kernels.DecoderWeights.of([layer.native_weights() for layer in self.layers]) or False
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
        return kernels.decoder_steps(cache.native, caches, x.view(R, D), cache.length, cache.src_mask,
                                     cache.self_attention_mask(1), rows, H, first.sublayers[0].norm_first,
                                     first.sublayers[0].norm.eps)


FEW_ROWS = 64  # up to this many rows the generator takes its decoding-step forms


class Generator(nn.Module):
    """Output projection tied to the shared embedding: (B, T, D) -> logits (B, T, V).

    Decoding steps (no autograd) take faster forms of the same product, measured by
    benchmarks/generator.py: through oneDNN (translator.gemm), a (D, V) row-major copy of the
    weight up to gemm.PACKED_ROWS rows and the weight packed for torch's oneDNN primitive past
    them (the native kernel's packed panels, `kernels.panel_linear`, are slower than both for
    this one wide product, so they are not taken: docs/HISTORY.md, round 7); without oneDNN, through
    MKL: for one row the (D, V) copy, for 2 to FEW_ROWS rows the logits computed transposed.
    Copies are kept until the weight changes (V x D floats each).
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding
        self._copies: gemm.Copies = {}

    def forward(self, x: Tensor) -> Tensor:
        weight = self.embedding.weight  # (V, D)
        if torch.is_grad_enabled():
            return F.linear(x, weight)
        rows = x.numel() // x.size(-1)
        if gemm.enabled():
            packed = self.copy("packed", gemm.pack) if rows > gemm.PACKED_ROWS else None
            if packed is not None:
                return gemm.packed_linear(x, packed)
            return gemm.matmul(x, self.columns())  # (..., D) @ (D, V)
        if rows > FEW_ROWS:
            return F.linear(x, weight)
        if rows == 1:
            return x @ self.columns()
        logits = weight @ x.reshape(rows, -1).t()  # (V, rows)
        return logits.t().contiguous().view(*x.shape[:-1], -1)

    def columns(self) -> Tensor:
        """The weight as (D, V)."""
        return self.copy("columns", lambda w: w.t().contiguous())

    def copy(self, name: str, make: Callable[[Tensor], Tensor | None]) -> Tensor | None:
        """make(weight), made again whenever the weight has changed (training, loading)."""
        return gemm.weight_copy(self._copies, name, self.embedding.weight, make)


class EncoderDecoder(nn.Module):
    """Encoder, decoder, shared source/target embeddings and a tied generator."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.embed = Embeddings(cfg)  # one table for source, target and output
        self.generator = Generator(self.embed.tokens)

    def src_mask(self, src: Tensor) -> Tensor:
        """(B, S) ids -> (B, 1, 1, S), True where a real token."""
        return (src != self.cfg.pad_id)[:, None, None, :]

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, D) and its mask (B, 1, 1, S)."""
        src_mask = self.src_mask(src)
        return self.encoder(self.embed(src), src_mask), src_mask

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Teacher-forced decoder over tgt_in (B, T) -> logits (B, T, V). Causal: position t sees <= t.

        Target padding sits after every real token, so the causal mask alone keeps real
        positions from seeing it; outputs at padded positions are ignored by the loss.
        """
        T = tgt_in.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_in.device).tril()  # (T, T)
        x = self.decoder(self.embed(tgt_in), memory, src_mask, causal)
        return self.generator(x)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S), tgt_in (B, T) -> logits (B, T, V)."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)

    def init_cache(self, memory: Tensor, src_mask: Tensor, capacity: int = 64) -> DecoderCache:
        """Cross-attention keys/values computed once per source, empty self-attention cache.

        capacity: target positions to make room for at first (the cache grows past it if needed).
        """
        layers = []
        for layer in self.decoder.layers:
            k, v = layer.cross_attn.keys_values(memory)  # (B, H, S, Dh) each, views into one (B, S, 2D)
            # Copied out once: as views, every step's attention products would copy them again.
            layers.append(LayerCache(cross_k=k.contiguous(), cross_v=v.contiguous()))
        return DecoderCache(layers=layers, src_mask=src_mask, capacity=capacity)

    def decode_step(self, tgt_new: Tensor, cache: DecoderCache, record_alignment: bool = False) -> Tensor:
        """Incremental decode: new tokens (B, t) after cache.length earlier ones -> logits (B, t, V)."""
        x = self.embed(tgt_new, offset=cache.positions(tgt_new.size(1)))  # (B, t, D)
        x = self.decoder.step(x, cache, record_alignment)
        cache.length += tgt_new.size(1)
        return self.generator(x)


def build_model(cfg: ModelConfig) -> EncoderDecoder:
    """The one factory: a freshly initialised model for cfg."""
    model = EncoderDecoder(cfg)
    for name, p in model.named_parameters():
        if p.dim() > 1 and "tokens" not in name:
            nn.init.xavier_uniform_(p)
    # Tied embedding/output: N(0, D^-1/2) so that scaled embeddings have unit variance.
    nn.init.normal_(model.embed.tokens.weight, mean=0.0, std=cfg.d_model**-0.5)
    with torch.no_grad():
        model.embed.tokens.weight[cfg.pad_id].zero_()
    return model
