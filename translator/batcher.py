"""Dynamic batching: sentences of concurrent requests decoded together by worker threads.

Requests wait in a bounded admission queue; a full queue refuses at once (`QueueFull`) rather than
letting latency grow without bound. A worker (`workers` of them, each decoding its own batch)
groups queued sentences that share decoding options into batches of at most `max_batch_tokens`
(sentences x longest source x beam). A request that finds no batch decoding starts at once;
while others decode, a new batch waits at most `max_queue_delay_ms` to fill. Workers take turns
(`take_turns`, translator.turns): one step at a time with every thread, the batch with the least
compute so far first, so that short requests keep moving beside a long one.
A request that ends early (cancelled, past its deadline) gives its places in the queue back at
once; its sentences leave the queue, and a running batch at its next step.

With `continuous` on, a running batch also takes queued sentences with its options between steps
(iteration-level batching), as far as its token budget allows, if the decode function asks
(`admit`; greedy and beam search do): under steady load the batch stays full instead of running
down to its longest sentence while new requests wait. Sentences join together once the first of
them has waited `max_join_delay_ms` (at once when the batch is full or has run out): each join
costs an encoder pass, and one pass over several sentences costs little more than over one. When
every worker is busy and the oldest queued request wants other options, joining stops once it has
waited `max_queue_delay_ms`, so that its batch goes next.

Knows nothing of gRPC, tokenizers or models: it is given a `decode` function.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from translator.config import ConfigError
from translator.turns import Turns

# decode(sources, options, cancelled, on_step, on_result, admit) -> one result per source, in order.
# cancelled() gives one bool per source, on_step(prefixes) the final tokens so far per source;
# on_result(i, result) may hand over source i's result early, as soon as it is final, so that
# its request is answered while the rest of the batch is still decoding. admit(alive) gives
# queued sources that join the batch now (alive: sources still decoding), as sources
# len(sources), len(sources) + 1, ... of this call; a decode function that cannot take them in
# never calls it.
DecodeFn = Callable[
    [list[list[int]], Any, Callable[[], Sequence[bool]], Callable[[list[list[int]]], None],
     Callable[[int, Any], None], Callable[[int], list[list[int]]]],
    list[Any],
]


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


@dataclass(frozen=True)
class BatcherConfig:
    max_queue_sentences: int = 256  # admitted and not yet finished, across all requests
    max_batch_tokens: int = 4096  # sentences x longest source x beam size, per decode call
    # How long a new batch may wait to fill while another is decoding (an idle decoder starts at once).
    max_queue_delay_ms: float = 5.0
    workers: int = 4  # decode threads taking batches from the one queue: batches with other options at once
    # Workers run one step at a time, each with every thread, least-served batch first; false:
    # side by side (then give each worker its share of the cores with `threads`).
    take_turns: bool = True
    continuous: bool = True  # queued sentences join a running batch between steps
    # Joins stop past this many sentences in one decode call, which then runs down and ends: its
    # per-step bookkeeping grows with every sentence it has taken.
    max_sentences_per_decode: int = 1024
    # How long queued sentences may wait to join a running batch. Each join runs the encoder
    # once for the sentences joining; waiting a little lets several share that pass.
    max_join_delay_ms: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_queue_sentences", "max_batch_tokens", "workers", "max_sentences_per_decode"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"batching.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_queue_delay_ms", "max_join_delay_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"batching.{name} must be >= 0, got {getattr(self, name)}")


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


class _Lane:
    """One worker thread and the batch it is decoding (key None: idle)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.key: Hashable | None = None  # the decoding options of its batch
        self.joinable = False  # its batch takes queued sentences between steps


class Batcher:
    """Admission queue plus `config.workers` decode worker threads, one batch each.

    worker_init, when given, runs first in every worker thread (per-thread settings such as
    the number of intra-op threads a decode may use).
    """

    def __init__(
        self, decode: DecodeFn, config: BatcherConfig | None = None, worker_init: Callable[[], None] | None = None
    ) -> None:
        self.decode = decode
        self.config = config or BatcherConfig()
        self._queue: deque[_Item] = deque()
        self._pending = 0  # admitted sentences holding a place (queued or decoding)
        self._closed = False
        self._stopping = False
        self._cond = threading.Condition()  # reentrant: a job failing under it comes back through _forget
        self._worker_init = worker_init
        self._turns = Turns() if self.config.take_turns else None
        self._lanes = [_Lane(i) for i in range(self.config.workers)]
        self._workers = [threading.Thread(target=self._run, args=(lane,), name=f"batcher-{lane.index}", daemon=True)
                         for lane in self._lanes]
        # Queued requests past their deadline give their places back when it passes, even while
        # every worker is busy (the gRPC layer cancels them too; a direct caller may not).
        self._workers.append(threading.Thread(target=self._expire, name="batcher-deadlines", daemon=True))
        for worker in self._workers:
            worker.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, job: Job) -> Job:
        """Admit job or refuse it at once with QueueFull / ShuttingDown."""
        n = len(job.sources)
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._pending + n > self.config.max_queue_sentences:
                raise QueueFull(
                    f"the queue is full ({self._pending} of {self.config.max_queue_sentences} sentences "
                    f"waiting); retry later"
                )
            job._submitted = time.monotonic()
            job._items = [_Item(job, i) for i in range(n)]
            self._pending += n
            self._queue.extend(job._items)
            job._on_end = self._forget
            self._cond.notify_all()
        if job.done:  # cancelled before it got here: it held its places for no time
            self._forget(job)
        return job

    def close(self) -> None:
        """Refuse new jobs; admitted ones still finish."""
        with self._cond:
            self._closed = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every admitted sentence has finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def stop(self) -> None:
        """Refuse new jobs, fail the queued ones, stop the workers after their current step."""
        with self._cond:
            self._closed = self._stopping = True
            for job in {id(item.job): item.job for item in self._queue}.values():
                job.fail(ShuttingDown("the server shut down before the request was decoded"))
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()

    def _forget(self, job: Job) -> None:
        """A job ended: its queued sentences leave the queue and every place it held is given back
        at once, its running sentences' too (they leave their batch at its next step)."""
        with self._cond:
            if any(item.queued for item in job._items):
                self._queue = deque(item for item in self._queue if item.job is not job)
            self._release([item for item in job._items if item.held])

    def _release(self, items: list[_Item]) -> None:
        for item in items:
            item.held = item.queued = False
        if items:
            self._pending -= len(items)
            self._cond.notify_all()

    def _run(self, lane: _Lane) -> None:
        if self._worker_init is not None:
            self._worker_init()
        while True:
            batch = self._next_batch(lane)
            if batch is None:
                return
            try:
                self._decode(lane, batch)
            finally:
                with self._cond:
                    lane.key, lane.joinable = None, False
                    self._cond.notify_all()  # its options may start a batch in another lane now

    def _expire(self) -> None:
        with self._cond:
            while not self._stopping:
                self._drop_stopped()
                self._cond.wait(self._next_deadline())

    def _next_batch(self, lane: _Lane) -> list[_Item] | None:
        """The oldest waiting sentence's batch, at once when no batch is decoding (nothing to wait
        for), else when it is full or the oldest has waited max_queue_delay_ms; None on stop."""
        delay = self.config.max_queue_delay_ms / 1000.0
        with self._cond:
            while True:
                self._drop_stopped()
                if self._stopping:
                    return None
                key = self._unserved_key()
                if key is None:
                    self._cond.wait()
                    continue
                batch, full = self._gather(key)
                busy = any(other.key is not None for other in self._lanes)
                wait = batch[0].job._submitted + delay - time.monotonic()
                if full or not busy or wait <= 0:
                    self._take(batch)
                    lane.key = key
                    return batch
                self._cond.wait(wait)

    def _unserved_key(self) -> Hashable | None:
        """Options of the oldest queued sentence that no running batch can take in; None if none."""
        taken = {lane.key for lane in self._lanes if lane.joinable}
        return next((item.job.options for item in self._queue if item.job.options not in taken), None)

    def _next_deadline(self) -> float | None:
        """Seconds until the first queued deadline (when its places go back), None if none."""
        deadlines = [item.job.deadline for item in self._queue if item.job.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _gather(self, key: Hashable, rows: int = 0, longest: int = 0) -> tuple[list[_Item], bool]:
        """Queued sentences with options `key`, oldest first, that fit the token budget beside
        `rows` sentences of up to `longest` tokens already decoding; and whether one more would
        not have fit."""
        batch: list[_Item] = []
        for item in self._queue:
            if item.job.options != key:
                continue
            size = max(longest, item.length)
            if (batch or rows) and (rows + len(batch) + 1) * size * item.job.cost > self.config.max_batch_tokens:
                return batch, True
            batch.append(item)
            longest = size
        return batch, False

    def _take(self, batch: list[_Item]) -> None:
        """Remove batch from the queue; its jobs start decoding now (called under the lock)."""
        taken = set(map(id, batch))
        self._queue = deque(item for item in self._queue if id(item) not in taken)
        now = time.monotonic()
        for item in batch:
            item.queued = False
            item.job._start(now)

    def _drop_stopped(self) -> None:
        """Queued jobs past their deadline end now (and leave the queue through _forget)."""
        for job in {id(item.job): item.job for item in self._queue}.values():
            job.stopped()

    def _admit(self, lane: _Lane, batch: list[_Item], alive: int, longest: int) -> list[list[int]]:
        """Queued sentences with the batch's options that join it now; appended to batch.
        longest: the longest source the batch has taken (the width its cross-attention keys pad to)."""
        if not self.config.continuous or len(batch) >= self.config.max_sentences_per_decode:
            lane.joinable = False
            return []
        key = lane.key
        with self._cond:
            lane.joinable = True
            self._drop_stopped()
            if self._stopping or not self._queue:
                return []
            head = self._queue[0].job
            all_busy = all(other.key is not None for other in self._lanes)
            waited = time.monotonic() - head._submitted
            if head.options != key and all_busy and waited > self.config.max_queue_delay_ms / 1000.0:
                lane.joinable = False
                return []  # the oldest request wants other options and no lane is free: run down for it
            joining, full = self._gather(key, alive, longest)
            joining = joining[: self.config.max_sentences_per_decode - len(batch)]
            wait = self.config.max_join_delay_ms / 1000.0
            if alive and joining and not full and time.monotonic() - joining[0].job._submitted < wait:
                return []  # let more arrive: sentences joining together share one encoder pass
            self._take(joining)
        batch.extend(joining)
        return [item.job.sources[item.index] for item in joining]

    def _decode(self, lane: _Lane, batch: list[_Item]) -> None:
        if self._turns is None:
            self._search(lane, batch)
            return
        self._turns.enter(lane)
        try:
            # Requests that ended while the batch waited for its turn cost nothing, not even an encoder pass.
            batch = [item for item in batch if not item.job.stopped()]
            if batch:
                self._search(lane, batch)
        finally:
            self._turns.leave(lane)

    def _search(self, lane: _Lane, batch: list[_Item]) -> None:
        # The batch's sentences still decoding, by index: per-step work stays with them rather than
        # with every sentence a long-running batch has taken. A sentence leaves it, and gives its
        # place in the admission queue back, when it finishes or stops, not when the call ends.
        active: dict[int, _Item] = {}
        seen = 0
        longest = max(item.length for item in batch)

        def admit(alive: int) -> list[list[int]]:
            nonlocal longest
            joining = self._admit(lane, batch, alive, longest)
            longest = max([longest, *map(len, joining)])
            return joining

        def take_joined() -> None:
            nonlocal seen
            active.update((k, batch[k]) for k in range(seen, len(batch)))
            seen = len(batch)

        def release(k: int) -> _Item:
            item = active.pop(k)
            if item.held:
                with self._cond:
                    self._release([item])
            return item

        def cancelled() -> list[bool]:  # once before every step: the batch's turn ends here
            if self._turns is not None:
                self._turns.pause(lane)
            take_joined()
            flags = [False] * len(batch)
            for k in [k for k, item in active.items() if item.job.stopped()]:
                flags[k] = True
                release(k)
            return flags

        def on_step(prefixes: list[list[int]]) -> None:
            take_joined()
            for job in {id(item.job): item.job for item in active.values()}.values():
                if not job.done:
                    job.stats.steps += 1
            for k, item in active.items():
                if item.job.streaming and not item.job.done:
                    item.job._emit(("prefix", item.index, prefixes[k]))

        def on_result(i: int, result: Any) -> None:
            take_joined()
            if i in active:
                item = release(i)
                if not item.job.stopped():
                    item.job._set_result(item.index, result)

        try:
            results = self.decode([item.job.sources[item.index] for item in batch], lane.key,
                                  cancelled, on_step, on_result, admit)
        except Exception as e:  # noqa: BLE001 - the error goes to every caller in the batch
            for job in {id(item.job): item.job for item in batch}.values():
                job.fail(DecodeFailed(f"decoding failed: {type(e).__name__}: {e}"))
            results = [None] * len(batch)
        take_joined()
        for k, result in enumerate(results):
            if k in active:
                on_result(k, result)
        for k in list(active):  # results the decode function did not give
            release(k)
