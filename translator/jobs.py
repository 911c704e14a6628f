"""A request as the batcher sees it: source sentences sharing decoding options, finished once
with results or an error (`BatcherError`), watched by its caller from any thread."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any


class BatcherError(Exception):
    """Why a job ended without results."""


class QueueFull(BatcherError):
    """The admission queue has no room for the request."""


class Cancelled(BatcherError):
    """The caller cancelled the request."""


class DeadlineExceeded(BatcherError):
    """The request's deadline passed before it was finished."""


class ShuttingDown(BatcherError):
    """The batcher no longer accepts or finishes work."""


class DecodeFailed(BatcherError):
    """The decode function raised; every request in the batch ends with this error."""


class EngineRestarted(BatcherError):
    """The decoding engine's process ended while the request was in it; a new one took its place."""


class Admission:
    """The places of a bounded admission queue: a job takes one per sentence when it is submitted,
    or is refused at once, and each goes back as its sentence finishes or the job ends. `cond`
    guards the places and may guard its owner's state too (the batcher's queue)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lock = threading.RLock()  # reentrant: a job failing under it comes back to release
        self.cond = threading.Condition(self.lock)
        self.pending = 0  # places taken: sentences queued or decoding
        self.closed = False

    def take(self, n: int) -> None:
        """Under cond: take n places, or raise ShuttingDown (closed) / QueueFull (no room)."""
        if self.closed:
            raise ShuttingDown("the server is shutting down")
        if self.pending + n > self.capacity:
            raise QueueFull(f"the queue is full ({self.pending} of {self.capacity} sentences waiting); retry later")
        self.pending += n

    def give_back(self, n: int) -> None:
        """Under cond."""
        if n:
            self.pending -= n
            self.cond.notify_all()

    def close(self) -> None:
        """Refuse from now on; admitted jobs still finish."""
        with self.cond:
            self.closed = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every place is back; False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: self.pending == 0, timeout)


@dataclass
class JobStats:
    """Where a request's time went; read after the job has ended."""

    queue_ms: float = 0.0  # admission until its first sentence started decoding
    decode_ms: float = 0.0  # its first sentence starting to decode until its last finished
    steps: int = 0  # decode steps run while any of its sentences was in a batch


class Job:
    """One request: source sentences sharing decoding options, finished once with results or an error.

    With `stream=True`, `events()` yields ("prefix", i, tokens) as sentence i's final tokens grow
    and ("result", i, value) when it is done. A `listener` is called instead with every event, and
    ("end", -1, None) last, from whichever thread emits it (an event loop's waiter, for example).
    """

    def __init__(
        self,
        sources: list[list[int]],
        options: Hashable,
        cost: int = 1,
        deadline: float | None = None,
        stream: bool = False,
        listener: Callable[[tuple[str, int, Any]], None] | None = None,
    ) -> None:
        self.sources = sources
        self.options = options
        self.cost = cost  # token multiplier per source token (the beam size)
        self.deadline = deadline  # time.monotonic() value
        self.stats = JobStats()
        self.results: list[Any] = [None] * len(sources)
        self.error: BatcherError | None = None
        self._remaining = len(sources)
        self._submitted = 0.0
        self._started: float | None = None  # when its first sentence started decoding
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._events: queue.SimpleQueue | None = queue.SimpleQueue() if stream and listener is None else None
        self._listener = listener
        self.streaming = stream  # wants ("prefix", ...) events
        self._items: list[_Item] = []  # its sentences, once admitted
        self._on_end: Callable[[Job], None] | None = None  # the batcher's, told when it fails

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stopped(self) -> bool:
        """Finished, failed, cancelled or past its deadline: no more compute should go to it."""
        if self._done.is_set():
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.fail(DeadlineExceeded("deadline exceeded"))
            return True
        return False

    def cancel(self) -> None:
        self.fail(Cancelled("cancelled by the caller"))

    def fail(self, error: BatcherError) -> None:
        """End the job with error, unless it has already ended."""
        with self._lock:
            if self._done.is_set():
                return
            self.error = error
            self._done.set()
        if self._on_end is not None:
            self._on_end(self)
        self._emit(("end", -1, None))

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Block until the job has ended (results or error) or timeout passes; whether it has."""
        return self._done.wait(timeout)

    def wait(self) -> list[Any]:
        """Block until the job ends; its results in source order, or its error raised."""
        timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        if not self._done.wait(timeout):
            self.fail(DeadlineExceeded("deadline exceeded"))
        if self.error is not None:
            raise self.error
        return self.results

    def events(self) -> Iterator[tuple[str, int, Any]]:
        """Stream of ("prefix" | "result", sentence index, tokens | result) until the job ends."""
        assert self._events is not None, "job was not created with stream=True"
        while True:
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            try:
                kind, i, value = self._events.get(timeout=timeout)
            except queue.Empty:
                self.fail(DeadlineExceeded("deadline exceeded"))
                continue
            if kind == "end":
                if self.error is not None:
                    raise self.error
                return
            yield kind, i, value

    def _start(self, now: float) -> None:
        """One of its sentences starts decoding (called under the batcher's lock)."""
        if self._started is None:
            self._started = now
            self.stats.queue_ms = (now - self._submitted) * 1000.0

    def _set_result(self, i: int, value: Any) -> None:
        """Store sentence i's result; the last one settles the decode time and ends the job."""
        with self._lock:
            if self._done.is_set() or self.results[i] is not None:
                return
            self.results[i] = value
            self._remaining -= 1
            finished = self._remaining == 0
            if finished:  # before waiters wake up and read the stats
                self.stats.decode_ms = (time.monotonic() - (self._started or self._submitted)) * 1000.0
        self._emit(("result", i, value))
        if finished:
            self._done.set()
            self._emit(("end", -1, None))

    def _emit(self, event: tuple[str, int, Any]) -> None:
        if self._listener is not None:
            self._listener(event)
        elif self._events is not None:
            self._events.put(event)


@dataclass(eq=False)
class _Item:
    job: Job
    index: int  # sentence index within the job
    queued: bool = True  # waiting in the admission queue
    held: bool = True  # holding a place in it (queued or decoding, until finished or stopped)

    @property
    def length(self) -> int:
        return len(self.job.sources[self.index])

    @property
    def key(self) -> tuple[Hashable, bool]:
        """What sentences batched together share: decoding options, and whether they stream (a
        batch that nobody streams skips the per-step work of final prefixes)."""
        return self.job.options, self.job.streaming
