"""Dynamic batching: sentences of concurrent requests decoded together by worker threads.

Requests wait in a bounded admission queue; a full queue refuses at once (`QueueFull`) rather than
letting latency grow without bound. A worker (`workers` of them, each decoding its own batch)
groups queued sentences that share decoding options into batches of at most `max_batch_tokens`
(sentences x longest source x beam), waiting at most `max_queue_delay_ms` for a batch to fill.
Cancellation and deadlines are checked once per decode step: a stopped request's sentences leave
the running batch at once and its queued ones are dropped.

With `continuous` on, a running batch also takes queued sentences with its options between steps
(iteration-level batching), as far as its token budget allows, if the decode function asks
(`admit`; greedy search does): under steady load the batch stays full instead of running down to
its longest sentence while new requests wait. Sentences join together once the first of them has
waited `max_join_delay_ms` (at once when the batch is full or has run out): each join costs an
encoder pass, and one pass over several sentences costs little more than over one. Joining stops
once the oldest queued request wants other options and has waited `max_queue_delay_ms`, so that
its batch goes next.

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
    max_queue_delay_ms: float = 5.0  # how long a sentence may wait for a batch to fill
    workers: int = 1  # decode threads taking batches from the one queue
    continuous: bool = True  # queued sentences join a running batch between steps (greedy)
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
    and ("result", i, value) when it is done.
    """

    def __init__(
        self,
        sources: list[list[int]],
        options: Hashable,
        cost: int = 1,
        deadline: float | None = None,
        stream: bool = False,
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
        self._events: queue.SimpleQueue | None = queue.SimpleQueue() if stream else None

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
        if self._events is not None:
            self._events.put(event)


@dataclass(eq=False)
class _Item:
    job: Job
    index: int  # sentence index within the job

    @property
    def length(self) -> int:
        return len(self.job.sources[self.index])


class Batcher:
    """Admission queue plus `config.workers` decode worker threads.

    worker_init, when given, runs first in every worker thread (per-thread settings such as
    the number of intra-op threads a decode may use).
    """

    def __init__(
        self, decode: DecodeFn, config: BatcherConfig | None = None, worker_init: Callable[[], None] | None = None
    ) -> None:
        self.decode = decode
        self.config = config or BatcherConfig()
        self._queue: deque[_Item] = deque()
        self._pending = 0  # admitted sentences not yet finished (queued or decoding)
        self._closed = False
        self._stopping = False
        self._cond = threading.Condition()
        self._worker_init = worker_init
        self._workers = [threading.Thread(target=self._run, name=f"batcher-{i}", daemon=True)
                         for i in range(self.config.workers)]
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
            self._pending += n
            self._queue.extend(_Item(job, i) for i in range(n))
            self._cond.notify()
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
            for item in self._queue:
                item.job.fail(ShuttingDown("the server shut down before the request was decoded"))
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()

    def _run(self) -> None:
        if self._worker_init is not None:
            self._worker_init()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._decode(batch)

    def _next_batch(self) -> list[_Item] | None:
        """Wait for the oldest sentence's batch to fill or for its delay to pass, then take it."""
        delay = self.config.max_queue_delay_ms / 1000.0
        with self._cond:
            while True:
                self._drop_stopped()
                if self._stopping:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                batch, full = self._gather()
                wait = self._queue[0].job._submitted + delay - time.monotonic()
                if full or wait <= 0:
                    self._take(batch)
                    return batch
                self._cond.wait(wait)

    def _gather(self, key: Hashable | None = None, rows: int = 0, longest: int = 0) -> tuple[list[_Item], bool]:
        """Queued sentences with options `key` (the oldest one's when None), oldest first, that fit
        the token budget beside `rows` sentences of up to `longest` tokens already decoding; and
        whether one more would not have fit."""
        if key is None:
            key = self._queue[0].job.options
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
            item.job._start(now)

    def _drop_stopped(self) -> None:
        kept = deque(item for item in self._queue if not item.job.stopped())
        self._finish(len(self._queue) - len(kept))
        self._queue = kept

    def _finish(self, n: int) -> None:
        if n:
            self._pending -= n
            self._cond.notify_all()

    def _admit(self, batch: list[_Item], alive: int, longest: int) -> list[list[int]]:
        """Queued sentences with the batch's options that join it now; appended to batch.
        longest: the longest source the batch has taken (the width its cross-attention keys pad to)."""
        if not self.config.continuous or len(batch) >= self.config.max_sentences_per_decode:
            return []
        key = batch[0].job.options
        with self._cond:
            self._drop_stopped()
            if self._stopping or not self._queue:
                return []
            head = self._queue[0].job
            if head.options != key and time.monotonic() - head._submitted > self.config.max_queue_delay_ms / 1000.0:
                return []  # the oldest request wants other options: run down, so that its batch goes next
            joining, full = self._gather(key, alive, longest)
            joining = joining[: self.config.max_sentences_per_decode - len(batch)]
            wait = self.config.max_join_delay_ms / 1000.0
            if alive and joining and not full and time.monotonic() - joining[0].job._submitted < wait:
                return []  # let more arrive: sentences joining together share one encoder pass
            self._take(joining)
        batch.extend(joining)
        return [item.job.sources[item.index] for item in joining]

    def _decode(self, batch: list[_Item]) -> None:
        # The batch's sentences still decoding, by index: per-step work stays with them rather than
        # with every sentence a long-running batch has taken. A sentence leaves it, and gives its
        # place in the admission queue back, when it finishes or stops, not when the call ends.
        active: dict[int, _Item] = {}
        seen = 0
        longest = max(item.length for item in batch)

        def admit(alive: int) -> list[list[int]]:
            nonlocal longest
            joining = self._admit(batch, alive, longest)
            longest = max([longest, *map(len, joining)])
            return joining

        def take_joined() -> None:
            nonlocal seen
            active.update((k, batch[k]) for k in range(seen, len(batch)))
            seen = len(batch)

        def release(k: int) -> _Item:
            item = active.pop(k)
            with self._cond:
                self._finish(1)
            return item

        def cancelled() -> list[bool]:
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
                if not item.job.done:
                    item.job._emit(("prefix", item.index, prefixes[k]))

        def on_result(i: int, result: Any) -> None:
            take_joined()
            if i in active:
                item = release(i)
                if not item.job.stopped():
                    item.job._set_result(item.index, result)

        try:
            results = self.decode([item.job.sources[item.index] for item in batch], batch[0].job.options,
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
