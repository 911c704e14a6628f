"""Turns: the decoding steps of batches running at once, one step at a time, least-served first.

Batches with different decoding options cannot share a search, so a server runs them side by
side. On a machine with few cores, side by side in parallel would split the threads and let
one long request's batch (16 sentences, beam 16, hundreds of steps) crowd out the rest. Instead
every batch takes turns, one step per turn with every thread, and the next turn goes to the
waiting batch that has had the least compute time so far (the rule of Linux's completely fair
scheduler, by virtual runtime): a one-sentence greedy request's 3 ms steps keep coming while a
long request's 100 ms steps run, and a lone batch never waits for anyone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable


class Turns:
    """Who computes next among the batches decoding at once; thread-safe.

    A batch calls `enter` before its first computation, `pause` between steps (it keeps the turn
    when nobody waits) and `leave` once it is done.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._used: dict[Hashable, float] = {}  # compute seconds of each batch holding or awaiting a turn
        self._waiting: set[Hashable] = set()
        self._holder: Hashable | None = None
        self._since = 0.0  # when the holder's turn began

    def enter(self, who: Hashable) -> None:
        """Wait for a turn. A batch new to the turns starts level with the least-served one, so it
        goes soon but cannot claim all the time the others have used."""
        with self._cond:
            if who not in self._used:
                self._used[who] = min(self._used.values(), default=0.0)
            self._waiting.add(who)
            self._cond.wait_for(lambda: self._holder is None and who == self._next())
            self._waiting.discard(who)
            self._holder, self._since = who, time.perf_counter()

    def pause(self, who: Hashable) -> None:
        """Between two steps: hand the turn over if another batch is waiting, and wait for the next."""
        with self._cond:
            self._charge(who)
            if not self._waiting:
                return
        self._release(who, done=False)
        self.enter(who)

    def leave(self, who: Hashable) -> None:
        """The batch is done: its turn and its account go."""
        self._release(who, done=True)

    def _release(self, who: Hashable, done: bool) -> None:
        with self._cond:
            self._charge(who)
            if self._holder == who:
                self._holder = None
            if done:
                self._used.pop(who, None)
            self._cond.notify_all()

    def _charge(self, who: Hashable) -> None:
        if self._holder == who:
            now = time.perf_counter()
            self._used[who] += now - self._since
            self._since = now

    def _next(self) -> Hashable:
        return min(self._waiting, key=lambda w: self._used[w])
