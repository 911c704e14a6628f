"""The decoder's incremental state: per-layer keys and values, and the rows that read them.

Shape letters as in translator.model: N sources, R decoder rows (R = N * group), H heads,
S source length, Dh head dim. A search sees the cache through translator.seq2seq.Cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from translator.hypotheses import padded


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


def gathered(buffer: Tensor, table: Tensor, first: int) -> Tensor:
    """A buffer like `buffer` (capacity, R', H, Dh) with the rows of table (n, R): its slot j holds,
    for each row i, buffer's slot first + j of row table[j, i]; slots from n on are left unset."""
    n, R = table.shape
    out = buffer.new_empty((buffer.size(0), R) + tuple(buffer.shape[2:]))
    if not n:
        return out
    slots = torch.arange(first, first + n, device=table.device)[:, None]  # (n, 1)
    if buffer.is_contiguous():
        # One row gather over (slot, row) pairs: advanced indexing on two dimensions copies element-wise.
        flat = (slots * buffer.size(1) + table).flatten()  # (n*R,)
        torch.index_select(buffer.flatten(0, 1), 0, flat, out=out[:n].view(n * R, *buffer.shape[2:]))
    else:
        out[:n] = buffer[slots, table]
    return out


def filling_order(keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The order that keeps the entries flagged in keep (n,) bool by moving the last kept ones
    into the places of those that go: (order (k,), holes, movers); new entry i is old entry
    order[i], and only the movers move (onto the holes), each from past the first k."""
    kept = int(keep.sum())
    holes = (~keep[:kept]).nonzero().squeeze(1)  # entries that go among the first `kept`
    movers = keep[kept:].nonzero().squeeze(1) + kept  # kept entries after them, as many
    order = torch.arange(kept, device=keep.device)
    order[holes] = movers
    return order, holes, movers


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
        table = self.slot_rows_until(self.length)  # later slots: each row's own
        for lc in self.layers:
            lc.self_k, lc.self_v = gathered(lc.self_k, table, 0), gathered(lc.self_v, table, 0)
        self.slot_rows = None

    def extend(self, new: DecoderCache) -> None:
        """Append the sources of `new` (a fresh cache of other sources, one row each) with `group`
        rows each, which start at the next slot: a joining sentence takes as many rows as every
        other (its beams). Source lengths are padded to the longer of the two (masked)."""
        if new.group != 1 or new.length:
            raise ValueError("a cache extends only by a one-row-per-source cache that has not decoded yet")
        n = new.src_mask.size(0)
        R, added = self.src_mask.size(0) * self.group, n * self.group
        if not R:  # no row left: every slot goes, and the new rows start at slot 0
            self.settle()  # of no rows: the buffers keep none
            self.length, self.start = 0, None
        if self.slot_rows is not None:
            # Beams reordered in the slot table stay there (settling would copy every key and value
            # at every join). The new rows read none of the slots so far: the table points them at
            # the buffer rows with_rows adds, zero there (masked keys must not be NaN garbage); from
            # the next slot on they write and read their own rows, which no table entry points at.
            first_new = self.layers[0].self_k.size(1)
            new_rows = torch.arange(first_new, first_new + added, device=self.slot_rows.device)
            self.slot_rows = torch.cat([self.slot_rows_until(self.length), new_rows.expand(self.length, added)], 1)
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
        order, holes, movers = filling_order(keep)
        kept = order.numel()
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
        self.move_rows(rows, holes, movers)
        for lc in self.layers:
            lc.cross_k, lc.cross_v = lc.cross_k[:kept], lc.cross_v[:kept]
            if lc.self_k is not None:
                lc.self_k, lc.self_v = lc.self_k[first:, :kept], lc.self_v[first:, :kept]
        self.src_mask = self.src_mask[order]
        self.length -= first
        self.narrow_sources()
        return order

    def narrow_sources(self) -> None:
        """Cut the source positions past the longest source still held (views, no copy): a long
        sentence that has left a running batch no longer widens every later step's
        cross-attention, nor the buffers that sentences joining later are given. The positions
        cut are masked for every row left, so no result changes."""
        S = self.src_mask.size(-1)
        longest = int(self.src_mask.sum(-1).max()) if self.src_mask.size(0) else S  # sources are right-padded
        if longest >= S:
            return
        self.src_mask = self.src_mask[..., :longest]
        for lc in self.layers:
            lc.cross_k, lc.cross_v = lc.cross_k[:, :, :longest], lc.cross_v[:, :, :longest]

    def move_rows(self, tensors: list[tuple[Tensor, int]], holes: Tensor, movers: Tensor) -> None:
        """In each tensor, rows `movers` copied onto rows `holes` along its dimension (0 or 1)."""
        for x, dim in tensors:
            x.index_copy_(dim, holes, x.index_select(dim, movers))

    def select(self, index: Tensor, group: int | None = None) -> None:
        """Keep or reorder decoder rows: new row i is old row index[i]; `group` rows per source after.

        Each run of `group` new rows must come from one source (beams reordered within their
        sentence, finished sentences dropped); sources no row reads are dropped. Slots before
        the earliest start of the rows kept are dropped too. Self-attention keys/values stay
        where they are, the new order composed into `slot_rows`, unless rows outnumber the
        buffers' rows or the buffers hold more than twice the rows kept: then they are copied
        into the new order.
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
        # beam search (rows with their own starts) it would be every step's. But the buffers keep
        # the rows of every sentence that has left (joins append rows after them): once they hold
        # more than twice the rows kept, the kept rows are copied into buffers of their own, so that
        # a long-running search's memory and copies follow the rows it runs, not all it has taken.
        buffers = self.layers[0].self_k
        in_table = buffers is not None and index.numel() <= buffers.size(1) <= 2 * index.numel()
        # Where a table is kept, the kept rows' entries, (length - first, R'): the new table, or what
        # the buffers of their own are gathered through, in one copy.
        table = None if self.slot_rows is None and not in_table else self.slot_rows_until(self.length)[first:, index]
        self.slot_rows = table if in_table else None
        if not same_sources:
            # Sources that leave with their places filled by the last ones (filling_order): only
            # those move, in place; any other order is gathered.
            holes = (sources != torch.arange(sources.numel(), device=sources.device)).nonzero().squeeze(1)
            if bool((sources[holes] >= sources.numel()).all()):
                self.move_rows([(getattr(lc, name), 0) for lc in self.layers for name in ("cross_k", "cross_v")],
                               holes, sources[holes])
                moved = slice(0, sources.numel())
            else:
                moved = sources
        for lc in self.layers:
            if not same_sources:
                lc.cross_k, lc.cross_v = lc.cross_k[moved], lc.cross_v[moved]
            if lc.self_k is None:
                continue
            if in_table:  # dropped slots go as a view
                lc.self_k, lc.self_v = lc.self_k[first:], lc.self_v[first:]
            elif table is not None:
                lc.self_k, lc.self_v = gathered(lc.self_k, table, first), gathered(lc.self_v, table, first)
            else:
                lc.self_k = take_rows(lc.self_k, index, first, self.length)
                lc.self_v = take_rows(lc.self_v, index, first, self.length)
        self.length -= first
        if not same_sources:
            self.src_mask = self.src_mask[sources]
            self.narrow_sources()
