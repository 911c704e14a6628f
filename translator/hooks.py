"""Hooks a server passes to a search: cancellation, polled once per step, and streaming of final tokens.

    cancelled() -> Sequence[bool]
        One flag per sentence of the batch, read once before every decoding step. A sentence
        flagged True leaves the batch at that step (no further compute is spent on it) and comes
        back with no hypotheses and Hypotheses.cancelled[i] True.
    on_step(prefixes: list[list[int]]) -> None
        Called after every decoding step with, per sentence, the tokens that are now final and
        will not change: for greedy search all tokens so far; for beam search the longest prefix
        shared by every hypothesis that can still become the best (the live beams and the best
        finished hypothesis). A finished sentence reports its whole best output, a cancelled one [].
        Prefixes only grow from one call to the next.
    on_done(i, nbest: list[Hypothesis]) -> None
        Called once for sentence i as soon as its n-best list is final, before the search returns
        (a server can answer it while longer sentences of the batch are still decoding); the
        same list the search returns for it. Cancelled sentences are not reported.
    admit(alive: int) -> Tensor | None
        Called before every step with the number of sentences still decoding; it may return
        more sources (b, S') (EOS-terminated, right-padded, any S') that join the running batch
        at that step as sentences B, B + 1, ... in the order given, each from its own first
        position (in beam search with all its beams), so that a server keeps one batch full
        while requests come and go. The other hooks then cover them too; their results (n-best
        lists and scores) are as if decoded alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from translator.hypotheses import Hypothesis

Cancelled = Callable[[], Sequence[bool]]
OnStep = Callable[[list[list[int]]], None]
OnDone = Callable[[int, list[Hypothesis]], None]
Admit = Callable[[int], Tensor | None]


class RunningSearch(Protocol):
    """A server's running batch as its search sees it (translator.batcher.RunningBatch): the hooks
    above as methods, with on_step wanted only when `streaming`, on_result as on_done, and admit
    giving the joining sources as EOS-terminated id lists (Translator.decode_steps pads them)."""

    streaming: bool

    def cancelled(self) -> Sequence[bool]: ...

    def on_step(self, prefixes: list[list[int]]) -> None: ...

    def on_result(self, i: int, nbest: list[Hypothesis]) -> None: ...

    def admit(self, alive: int) -> list[list[int]]: ...


class SearchHooks:
    """The hooks of one search over B sentences, and which sentences they cancelled."""

    def __init__(
        self, cancelled: Cancelled | None, on_step: OnStep | None, batch_size: int, on_done: OnDone | None = None
    ) -> None:
        self._cancelled = cancelled
        self._on_step = on_step
        self._on_done = on_done
        self.batch_size = batch_size
        self.flags = [False] * batch_size  # per sentence: cancelled

    def extend(self, n: int) -> None:
        """n more sentences joined the search."""
        self.batch_size += n
        self.flags.extend([False] * n)

    @property
    def streaming(self) -> bool:
        return self._on_step is not None

    def poll(self, alive: Tensor) -> Tensor | None:
        """Which of the `alive` sentences (B indices, (b,)) stay, as a (b,) mask; None if all stay."""
        if self._cancelled is None:
            return None
        flags = self._cancelled()
        if len(flags) != self.batch_size:
            raise ValueError(f"cancelled() gave {len(flags)} flags for {self.batch_size} sentences")
        if not any(flags):  # the usual step: nothing copied, no tensor made
            return None
        stop = torch.tensor([bool(f) for f in flags], dtype=torch.bool)[alive]  # (b,)
        if not stop.any():
            return None
        for i in alive[stop].tolist():
            self.flags[i] = True
        return ~stop

    def report(self, prefixes: list[list[int]]) -> None:
        if self._on_step is not None:
            self._on_step(prefixes)

    @property
    def wants_done(self) -> bool:
        return self._on_done is not None

    def done(self, i: int, nbest: list[Hypothesis]) -> None:
        if self._on_done is not None:
            self._on_done(i, nbest)
