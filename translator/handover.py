"""When the decoding thread wakes the event loop: while it runs native code, not Python.

Handing a finished sentence to the event loop wakes the loop's thread, which takes the GIL to run
the answer's Python (the response, the request log, the next request) for about a millisecond.
Woken while the decoding thread runs Python between torch ops (a search's bookkeeping, a cache
drop), the loop takes the GIL at the decoding thread's next op, and the decoder waits for it to
finish; on two cores its OpenMP worker waits too. So the decoding thread holds its wake-ups back
(`deferring`) and makes them right before a call that runs a whole decoder step without the GIL
(`release`, from the native step), so that the loop's Python runs beside the step. A wake-up that
a whole step has held without such a call (the torch backend), or that is held when the thread is
about to encode joining sentences, finish a batch or wait for work, is made then (`step_done`,
`release`): an answer is never held longer than one step.

Threads that do not defer (an engine process's pipe reader, tests) wake the loop at once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

_local = threading.local()


class _Held:
    def __init__(self) -> None:
        self.wakes: list[Callable[[], None]] = []
        self.aged = 0  # how many of `wakes` were held through the last step_done


def wake(fn: Callable[[], None]) -> None:
    """fn() (which wakes an event loop) now, or at this thread's next release if it defers."""
    held: _Held | None = getattr(_local, "held", None)
    if held is None:
        fn()
    else:
        held.wakes.append(fn)


def release() -> None:
    """Make every wake-up this thread holds, in the order they were asked for."""
    held: _Held | None = getattr(_local, "held", None)
    if held is None or not held.wakes:
        return
    wakes, held.wakes, held.aged = held.wakes, [], 0
    for fn in wakes:
        fn()


def step_done() -> None:
    """A step has ended: make the wake-ups held through a whole step (none released them)."""
    held: _Held | None = getattr(_local, "held", None)
    if held is None:
        return
    if held.aged:
        aged, held.wakes = held.wakes[: held.aged], held.wakes[held.aged :]
        for fn in aged:
            fn()
    held.aged = len(held.wakes)


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """Hold this thread's wake-ups for its releases within the block; any still held at its end are
    made then."""
    if getattr(_local, "held", None) is not None:  # nested: the outer block releases
        yield
        return
    _local.held = _Held()
    try:
        yield
    finally:
        try:
            release()
        finally:
            _local.held = None
