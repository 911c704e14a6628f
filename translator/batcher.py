"""Dynamic batching: sentences of concurrent requests decoded together, on one engine thread.

Requests wait in a bounded admission queue; a full queue refuses at once (`QueueFull`) rather than
letting latency grow without bound. Queued sentences that share decoding options are grouped into
batches of at most `max_batch_tokens` (the source tokens of the sentences decoding together x
beam). A request that finds no batch decoding starts at once; while others decode, a new batch
waits at most `max_queue_delay_ms` to fill. Up to `max_batches` batches (requests with different
options) decode at once, a step at a time, the one with the least compute so far next (the rule of
Linux's fair scheduler): a one-sentence request's short steps keep coming while a long request's
long steps run, and a lone batch never waits for anyone. A request that ends early (cancelled,
past its deadline) gives its places in the queue back at once; its sentences leave the queue,
and a running batch at its next step.

All decoding runs on one thread, the engine (`run`): a second thread starting OpenMP work
(torch's or the native kernels') gives the process a second thread team, more OpenMP threads
than cores, and libgomp then stops spinning between parallel regions, so that every region pays
a wake-up: decoding on a thread other than the one that loaded the model is several times slower
(benchmarks/engine_thread.py, docs/RESULTS.md). `nmt-serve` runs the engine on its main thread,
which loaded the model.

With `continuous` on, a running batch also takes queued sentences with its options between steps
(iteration-level batching), as far as its token budget allows, if the decode function asks
(`admit`; greedy and beam search do): under steady load the batch stays full instead of running
down to its longest sentence while new requests wait. Sentences join together once they are at
least `join_ratio` times the sentences decoding, or once the first of them has waited
`max_join_delay_ms` (at once when the batch is full or has run out): each join costs an encoder
pass, and one pass over several sentences costs little more than over one, while beside a batch of
a few sentences a joining one need not wait for company (docs/RESULTS.md). When
`max_batches` batches run and the oldest queued request wants other options, joining stops once it
has waited `max_queue_delay_ms`, so that its batch goes next.

Knows nothing of gRPC, tokenizers or models: it is given a `decode` function.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass
from typing import Any

from translator import handover
from translator.config import ConfigError
from translator.jobs import (
    Admission,
    BatcherError,
    Cancelled,
    DeadlineExceeded,
    DecodeFailed,
    EngineRestarted,
    Job,
    JobStats,
    QueueFull,
    ShuttingDown,
    _Item,
)

__all__ = [
    "Batcher", "BatcherConfig", "BatcherError", "Cancelled", "DeadlineExceeded", "DecodeFailed", "DecodeFn",
    "EngineRestarted", "Job", "JobStats", "QueueFull", "RunningBatch", "ShuttingDown",
]

# decode(batch, options) -> a generator that yields before each decoding step and returns one
# result per source of the batch, in order (Translator.decode_steps). The search calls the batch's
# hooks (RunningBatch, translator.hooks): cancelled() before every step, on_step(prefixes) after
# each when batch.streaming (requests that stream are batched apart from those that do not),
# on_result(i, result) to hand source i's result over as soon as it is final, so that its request
# is answered while the rest of the batch is still decoding, and admit(alive) for queued sources
# that join the batch now (alive: sources still decoding), as sources len(batch.sources),
# len(batch.sources) + 1, ... of the search; a decode function that cannot take them in never calls it.
DecodeFn = Callable[["RunningBatch", Any], Generator[None, None, list[Any]]]

# An idle engine wakes this often even with nothing to do. nmt-serve runs it on the main thread,
# the only one where Python runs signal handlers; a signal the kernel hands to another thread (an
# OpenMP worker, one of gRPC's: it does so while the main thread has a signal pending) is seen
# only when the main thread next runs Python, and a wait on a lock is not interrupted by it.
IDLE_WAKE_S = 0.25


@dataclass(frozen=True)
class BatcherConfig:
    max_queue_sentences: int = 256  # admitted and not yet finished, across all requests
    max_batch_tokens: int = 4096  # source tokens x beam size of the sentences a decode step runs
    # How long a new batch may wait to fill while another is decoding (an idle decoder starts at once).
    max_queue_delay_ms: float = 5.0
    # Batches decoding at once, a step at a time, least-served first: requests with other options
    # start beside a running batch instead of waiting for it to end.
    max_batches: int = 4
    continuous: bool = True  # queued sentences join a running batch between steps
    # Joins stop past this many sentences in one decode call, which then runs down and ends: its
    # per-step bookkeeping grows with every sentence it has taken.
    max_sentences_per_decode: int = 1024
    # How long queued sentences may wait to join a running batch. Each join runs the encoder
    # once for the sentences joining; waiting lets several share that pass.
    max_join_delay_ms: float = 100.0
    # Queued sentences join without that wait once they are at least this many times the
    # sentences decoding (the waiting-to-served ratio of Hugging Face's text-generation-inference):
    # beside a batch of few sentences, one joins at once. 0: only the wait.
    join_ratio: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_queue_sentences", "max_batch_tokens", "max_batches", "max_sentences_per_decode"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"batching.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_queue_delay_ms", "max_join_delay_ms", "join_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"batching.{name} must be >= 0, got {getattr(self, name)}")




class Batcher:
    """Admission queue plus the engine that decodes its batches (see the module docstring).

    With thread=True the engine runs on a daemon thread of its own; with False the caller runs it
    (`run()`, until `stop()`). worker_init, when given, runs first on the engine's thread
    (per-thread settings such as the number of intra-op threads a decode may use).
    """

    def __init__(
        self,
        decode: DecodeFn,
        config: BatcherConfig | None = None,
        worker_init: Callable[[], None] | None = None,
        thread: bool = True,
    ) -> None:
        self.decode = decode
        self.config = config or BatcherConfig()
        self._queue: deque[_Item] = deque()
        self._admission = Admission(self.config.max_queue_sentences)
        self._batches: list[RunningBatch] = []  # decoding now
        self._stopping = False
        self._cond = self._admission.cond  # guards the queue and the batches too
        # The deadline thread's own condition on the same lock: the engine's and wait_idle's
        # wake-ups (every submission, every place given back) do not wake it to scan the queue
        # for nothing; it is woken when a job comes with a deadline before the one it waits for.
        self._deadlines = threading.Condition(self._admission.lock)
        self._next_expiry: float | None = None  # the deadline it waits for; None: none
        self._worker_init = worker_init
        self._engine: threading.Thread | None = None  # the thread running run()
        self._engine_done = threading.Event()
        # Queued requests past their deadline give their places back when it passes, even while the
        # engine is busy (the gRPC layer cancels them too; a direct caller may not).
        threading.Thread(target=self._expire, name="batcher-deadlines", daemon=True).start()
        if thread:
            threading.Thread(target=self.run, name="batcher", daemon=True).start()

    @property
    def pending(self) -> int:
        return self._admission.pending

    def submit(self, job: Job) -> Job:
        """Admit job or refuse it at once with QueueFull / ShuttingDown."""
        n = len(job.sources)
        with self._cond:
            self._admission.take(n)
            job._submitted = time.monotonic()
            job._items = [_Item(job, i) for i in range(n)]
            self._queue.extend(job._items)
            job._on_end = self._forget
            self._cond.notify_all()
            if job.deadline is not None and (self._next_expiry is None or job.deadline < self._next_expiry):
                self._deadlines.notify()
        if job.done:  # cancelled before it got here: it held its places for no time
            self._forget(job)
        return job

    def close(self) -> None:
        """Refuse new jobs; admitted ones still finish."""
        self._admission.close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every admitted sentence has finished; False on timeout."""
        return self._admission.wait_idle(timeout)

    def stop(self) -> None:
        """Refuse new jobs, fail the admitted ones that have not finished, and stop the engine
        (its batches end at their next step)."""
        with self._cond:
            self._admission.closed = self._stopping = True
            jobs = [item.job for item in self._queue] + [item.job for b in self._batches for item in b.items]
            for job in {id(job): job for job in jobs}.values():
                job.fail(ShuttingDown("the server shut down before the request was decoded"))
            self._cond.notify_all()
            self._deadlines.notify_all()
            engine = self._engine
        if engine is not None and engine is not threading.current_thread():
            self._engine_done.wait()

    # -- the engine ------------------------------------------------------------------------

    def run(self) -> None:
        """Start batches and step them, least-served first, until stop()."""
        with self._cond:
            if self._engine is not None:
                raise RuntimeError("the batcher's engine is already running")
            self._engine = threading.current_thread()
        try:
            if self._worker_init is not None:
                self._worker_init()
            with handover.deferring():  # answers wake the event loop while a step runs natively
                self._serve()
        finally:
            self._engine_done.set()

    def _serve(self) -> None:
        while True:
            with self._cond:
                self._start_batches()
                if not self._batches:
                    if self._stopping:
                        return
                    handover.release()  # before waiting: nothing held while there is nothing to do
                    self._cond.wait(IDLE_WAKE_S)
                    continue
                batch = min(self._batches, key=lambda b: b.used)
            if not batch.step():
                handover.release()
                with self._cond:
                    self._batches.remove(batch)
                    self._cond.notify_all()
            handover.step_done()

    def _start_batches(self) -> None:
        """Turn queued sentences into batches while there is room: at once when nothing decodes,
        else when a batch is full or its oldest sentence has waited max_queue_delay_ms."""
        delay = self.config.max_queue_delay_ms / 1000.0
        while not self._stopping and len(self._batches) < self.config.max_batches:
            key = self._unserved_key()
            if key is None:
                return
            items, full = self._gather(key)
            if self._batches and not full and time.monotonic() - items[0].job._submitted < delay:
                return
            self._take(items)
            # A new batch starts level with the least-served one: it goes soon, but cannot claim
            # all the time the others have used.
            used = min((b.used for b in self._batches), default=0.0)
            self._batches.append(RunningBatch(self, key, items, used))

    def _unserved_key(self) -> tuple[Hashable, bool] | None:
        """Key of the oldest queued sentence that no running batch can take in; None if none."""
        taken = {b.key for b in self._batches if b.joinable}
        return next((item.key for item in self._queue if item.key not in taken), None)

    # -- the queue (under the lock) -------------------------------------------------------

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
        self._admission.give_back(len(items))

    def _expire(self) -> None:
        with self._cond:
            while not self._stopping:
                self._drop_stopped()
                self._next_expiry = self._first_deadline()
                self._deadlines.wait(None if self._next_expiry is None else max(0.0, self._next_expiry - time.monotonic()))

    def _first_deadline(self) -> float | None:
        """The first queued deadline (when its places go back), None if none."""
        return min((item.job.deadline for item in self._queue if item.job.deadline is not None), default=None)

    def _drop_stopped(self) -> None:
        """Queued jobs past their deadline end now (and leave the queue through _forget)."""
        for job in {id(item.job): item.job for item in self._queue}.values():
            job.stopped()

    def _gather(self, key: tuple[Hashable, bool], tokens: int = 0) -> tuple[list[_Item], bool]:
        """Queued sentences with `key` (options, streaming), oldest first, that fit the token budget beside
        sentences of `tokens` source tokens already decoding; and whether one more would not have fit.

        The budget counts each sentence's own tokens, not rows x the longest: a decoding step's
        products grow with its rows, and a batch of mixed lengths then holds as many rows as a
        length-sorted batch of their mean length would."""
        batch: list[_Item] = []
        for item in self._queue:
            if item.key != key:
                continue
            if (batch or tokens) and (tokens + item.length) * item.job.cost > self.config.max_batch_tokens:
                return batch, True
            batch.append(item)
            tokens += item.length
        return batch, False

    def _take(self, batch: list[_Item]) -> None:
        """Remove batch from the queue; its jobs start decoding now."""
        taken = set(map(id, batch))
        self._queue = deque(item for item in self._queue if id(item) not in taken)
        now = time.monotonic()
        for item in batch:
            item.queued = False
            item.job._start(now)

    def _joining(self, batch: RunningBatch, alive: int) -> list[_Item]:
        """Queued sentences with the batch's options that join it now (taken from the queue)."""
        if not self.config.continuous or len(batch.items) >= self.config.max_sentences_per_decode:
            batch.joinable = False
            return []
        batch.joinable = True  # read on this thread only (_unserved_key)
        if not self._queue:  # the usual step: no lock; a sentence queued meanwhile joins at the next
            return []
        with self._cond:
            if self._stopping or not self._queue:
                return []
            head = self._queue[0]
            crowded = len(self._batches) >= self.config.max_batches
            if (head.key != batch.key and crowded
                    and time.monotonic() - head.job._submitted > self.config.max_queue_delay_ms / 1000.0):
                batch.joinable = False
                return []  # the oldest request wants other options and there is no room: run down for it
            joining, full = self._gather(batch.key, batch.tokens)
            joining = joining[: self.config.max_sentences_per_decode - len(batch.items)]
            wait = self.config.max_join_delay_ms / 1000.0
            enough = self.config.join_ratio and len(joining) >= self.config.join_ratio * alive
            if alive and joining and not full and not enough and time.monotonic() - joining[0].job._submitted < wait:
                return []  # let more arrive: sentences joining together share one encoder pass
            self._take(joining)
        return joining


class RunningBatch:
    """One decode call in progress, and the hooks its search calls (translator.hooks.RunningSearch).

    Holds: the batch's `key` (options, streaming) and the sources it started with; every sentence it
    has taken (`items`, joined ones appended, so that a sentence's index in the search is its index
    there); the ones still decoding (`active`, by that index) and their requests (`jobs`, with how
    many sentences each still has here), so that per-step work goes with these rather than with
    every sentence a long-running batch has taken; the step generator; and the compute time it has
    had, against which the engine ranks batches. A sentence leaves it, and gives its place in the
    admission queue back, when it finishes or stops, not when the call ends.
    """

    def __init__(self, batcher: Batcher, key: tuple[Hashable, bool], items: list[_Item], used: float) -> None:
        self.batcher = batcher
        self.key = key
        self.options, self.streaming = key
        self.items = items
        self.sources: list[list[int]] = []  # of the items it starts with (set at its first step)
        self.used = used  # compute seconds
        # Takes queued sentences with its key between steps: assumed from the start, so that no
        # second batch of its key starts beside it and takes a place that other options need;
        # dropped if its search runs a step without asking (sampling). Until then it stays joinable:
        # a search asks only from its first step on, after the call that encodes.
        self.joinable = batcher.config.continuous
        self.asked = False  # its decode function has called admit()
        self.active: dict[int, _Item] = {}
        self.jobs: dict[Job, int] = {}  # request -> its sentences in `active`
        self.tokens = 0  # source tokens of the sentences in `active`: what the token budget counts
        self.flags: list[bool] = []  # what cancelled() returns: True for the sentences stopping now
        self.raised: list[int] = []  # the flags it set True last time, lowered at the next step
        self.steps: Generator[None, None, list[Any]] | None = None

    def step(self) -> bool:
        """Run the batch up to its next step (the first call encodes it); False once it has ended."""
        start = time.perf_counter()
        try:
            if self.steps is None:
                return self.start()
            next(self.steps)
            if self.joinable and not self.asked:
                self.stop_joining()
            return True
        except StopIteration as stop:
            self.finish(stop.value or [])
        except Exception as e:  # noqa: BLE001 - the error goes to every caller in the batch
            for job in {id(item.job): item.job for item in self.items}.values():
                job.fail(DecodeFailed(f"decoding failed: {type(e).__name__}: {e}"))
            self.finish([None] * len(self.items))
        finally:
            self.used += time.perf_counter() - start
        return False

    def start(self) -> bool:
        """Begin the decode call and run it to its first step (StopIteration: it ended there)."""
        # Requests that ended while the batch waited to start cost nothing, not even an encoder pass.
        self.items = [item for item in self.items if not item.job.stopped()]
        if not self.items:
            return False
        self.sources = [item.job.sources[item.index] for item in self.items]
        handover.release()  # not held while the batch is encoded
        self.take(self.items, 0)
        self.steps = self.batcher.decode(self, self.options)
        next(self.steps)  # encodes, and stops before the first step: a search asks to admit from there on
        return True

    def stop_joining(self) -> None:
        """Its search ran a step without asking for joining sentences (sampling): queued ones with
        its key start a batch of their own."""
        with self.batcher._cond:
            self.joinable = False
            self.batcher._cond.notify_all()

    def finish(self, results: list[Any]) -> None:
        for k, result in enumerate(results):
            self.on_result(k, result)
        for k in list(self.active):  # results the decode function did not give
            self.release(k)

    def take(self, items: list[_Item], first: int) -> None:
        """items, sentences first, first + 1, ... of the search, start decoding here."""
        self.flags.extend([False] * len(items))
        for k, item in enumerate(items, first):
            self.active[k] = item
            self.jobs[item.job] = self.jobs.get(item.job, 0) + 1
            self.tokens += item.length

    def release(self, k: int) -> _Item:
        """Sentence k leaves the batch, and its place in the queue goes back if it still holds one."""
        item = self.active.pop(k)
        self.tokens -= item.length
        left = self.jobs.pop(item.job) - 1
        if left:
            self.jobs[item.job] = left
        if item.held:
            with self.batcher._cond:
                self.batcher._release([item])
        return item

    # -- the hooks its search calls -----------------------------------------------------------

    def admit(self, alive: int) -> list[list[int]]:
        """Before a step: the sources of queued sentences that join now (alive: sentences decoding)."""
        self.asked = True
        joining = self.batcher._joining(self, alive)
        if not joining:
            return []
        handover.release()  # not held while the joining sentences are encoded
        self.take(joining, len(self.items))
        self.items.extend(joining)
        return [item.job.sources[item.index] for item in joining]

    def cancelled(self) -> list[bool]:
        """Before a step: True for each sentence whose request has stopped since the last step (it
        leaves now); the step counts for every other request decoding here."""
        for k in self.raised:
            self.flags[k] = False
        self.raised = []
        stopped = set()
        for job in self.jobs:
            if job.stopped():
                stopped.add(job)
            else:
                job.stats.steps += 1
        if stopped:
            self.raised = [k for k, item in self.active.items() if item.job in stopped]
            for k in self.raised:
                self.flags[k] = True
                self.release(k)
        return self.flags

    def on_step(self, prefixes: list[list[int]]) -> None:
        """After a step of a streaming batch: each decoding sentence's final tokens so far."""
        for k, item in self.active.items():
            if not item.job.done:
                item.job._emit(("prefix", item.index, prefixes[k]))

    def on_result(self, k: int, result: Any) -> None:
        """Sentence k's result, final: its request has it at once."""
        if k in self.active:
            item = self.release(k)
            if not item.job.stopped():
                item.job._set_result(item.index, result)
