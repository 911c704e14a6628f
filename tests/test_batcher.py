"""Dynamic batching: admission, grouping, budgets, cancellation and deadlines, with a scripted decoder.

The scripted decoder stands in for beam search the way a fake model with fixed probabilities does:
each sentence's output is its source reversed, one token per step, so every result is predictable
and every step observable.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from translator.batcher import (
    Batcher,
    BatcherConfig,
    Cancelled,
    DeadlineExceeded,
    DecodeFailed,
    Job,
    QueueFull,
    ShuttingDown,
)
from translator.config import ConfigError


class ReverseDecoder:
    """Emits each source reversed, one token per step; honours cancelled(), reports on_step, hands
    each sentence over with on_result the step it is done, and with `joins` takes queued
    sentences before every step, as greedy search does; a generator, yielding between steps."""

    def __init__(self, step_seconds: float = 0.0, joins: bool = False) -> None:
        self.step_seconds = step_seconds
        self.joins = joins
        self.batches: list[tuple[object, list[list[int]]]] = []  # sources of each call, joined ones too
        self.streams: list[bool] = []  # whether each call was given on_step
        self.alive_per_step: list[list[int]] = []
        self.joined: list[int] = []  # sentences taken in by each admit() call that took some
        self.tokens_per_step: list[int] = []  # source tokens of the sentences decoding
        self.gate: threading.Event | None = None  # when set, every step waits for it
        self.started = threading.Event()
        self.fail = False

    def __call__(self, batch, options):
        sources = [list(s) for s in batch.sources]
        self.batches.append((options, sources))
        self.streams.append(batch.streaming)
        self.started.set()
        if self.fail:
            raise RuntimeError("scripted failure")
        out: list[list[int]] = [[] for _ in sources]
        alive = set(range(len(sources)))
        while True:
            yield  # a step ends here: the engine may step another batch
            new = batch.admit(len(alive)) if self.joins else []
            if new:
                self.joined.append(len(new))
            alive |= set(range(len(sources), len(sources) + len(new)))
            sources += [list(s) for s in new]
            out += [[] for _ in new]
            flags = batch.cancelled()
            alive -= {i for i in alive if flags[i]}
            if not alive:
                return out
            if self.gate is not None:
                self.gate.wait()
            time.sleep(self.step_seconds)
            self.alive_per_step.append(sorted(alive))
            self.tokens_per_step.append(sum(len(sources[i]) for i in alive))
            for i in alive:
                out[i].append(sources[i][-1 - len(out[i])])
            if batch.streaming:
                batch.on_step([list(o) for o in out])
            for i in sorted(alive):
                if len(out[i]) == len(sources[i]):
                    alive.remove(i)
                    batch.on_result(i, out[i])


def make(decoder: ReverseDecoder, **cfg) -> Batcher:
    return Batcher(decoder, BatcherConfig(**cfg))


def test_every_job_gets_its_own_results_exactly_once():
    decoder = ReverseDecoder()
    batcher = make(decoder, max_queue_delay_ms=2.0)
    jobs = [Job([[i, i + 1, i + 2], [i]], options="greedy") for i in range(0, 300, 10)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: batcher.submit(job).wait(), jobs))
    assert results == [[[i + 2, i + 1, i], [i]] for i in range(0, 300, 10)]
    assert sum(len(srcs) for _, srcs in decoder.batches) == 2 * len(jobs)  # nothing decoded twice
    assert batcher.pending == 0
    batcher.stop()


def test_while_a_batch_decodes_sentences_arriving_within_the_delay_share_one_batch():
    decoder = ReverseDecoder()
    decoder.gate = threading.Event()
    batcher = make(decoder, max_queue_delay_ms=300.0)
    first = batcher.submit(Job([[9]], options="other"))
    assert decoder.started.wait(5)
    jobs = [batcher.submit(Job([[1, 2, i]], options="greedy")) for i in range(5)]
    decoder.gate.set()
    for job in [first, *jobs]:
        job.wait()
    assert [len(srcs) for _, srcs in decoder.batches] == [1, 5]
    batcher.stop()


def test_a_request_reaching_an_idle_batcher_starts_at_once():
    decoder = ReverseDecoder(joins=True)
    batcher = make(decoder, max_queue_delay_ms=10_000.0, max_join_delay_ms=10_000.0)
    for sources in ([[1, 2, 3]], [[4], [5, 6]]):
        job = batcher.submit(Job(sources, options="g"))
        assert job.wait() == [s[::-1] for s in sources]
        assert job.stats.queue_ms < 1_000.0
    batcher.stop()


def test_requests_with_different_options_are_batched_separately():
    decoder = ReverseDecoder()
    batcher = make(decoder, max_queue_delay_ms=200.0)
    jobs = [batcher.submit(Job([[i]], options=opts)) for i, opts in enumerate(["a", "b", "a", "b", "a"])]
    assert [job.wait() for job in jobs] == [[[i]] for i in range(5)]
    assert sorted((opts, len(srcs)) for opts, srcs in decoder.batches) == [("a", 3), ("b", 2)]
    batcher.stop()


def test_batches_stay_within_max_batch_tokens():
    decoder = ReverseDecoder()
    batcher = make(decoder, max_batch_tokens=40, max_queue_delay_ms=100.0)
    jobs = [batcher.submit(Job([list(range(n))], options="beam2", cost=2)) for n in (3, 9, 4, 10, 2, 5)]
    for job in jobs:
        job.wait()
    for _, srcs in decoder.batches:
        assert len(srcs) == 1 or sum(map(len, srcs)) * 2 <= 40
    assert len(decoder.batches) > 1
    batcher.stop()


def test_full_queue_refuses_at_once_and_loses_nothing():
    decoder = ReverseDecoder()
    decoder.gate = threading.Event()
    batcher = make(decoder, max_queue_sentences=4, max_queue_delay_ms=0.0)
    admitted = [batcher.submit(Job([[1, 2, 3]], options="g"))]
    decoder.started.wait(5)  # the first job is decoding, holding its place
    admitted += [batcher.submit(Job([[i, 7]], options="g")) for i in range(3)]
    start = time.monotonic()
    with pytest.raises(QueueFull, match="queue is full"):
        batcher.submit(Job([[9]], options="g"))
    assert time.monotonic() - start < 0.5
    decoder.gate.set()
    assert [job.wait() for job in admitted] == [[[3, 2, 1]]] + [[[7, i]] for i in range(3)]
    assert batcher.pending == 0
    batcher.submit(Job([[5]], options="g")).wait()  # room again once the queue drained
    batcher.stop()


def test_cancelled_job_leaves_the_batch_within_one_step():
    decoder = ReverseDecoder(step_seconds=0.02)
    batcher = make(decoder, max_queue_delay_ms=200.0)
    long_a, long_b = list(range(20)), list(range(100, 120))
    a = batcher.submit(Job([long_a], options="g"))
    b = batcher.submit(Job([long_b], options="g"))
    while len(decoder.alive_per_step) < 3:
        time.sleep(0.001)
    a.cancel()
    steps_at_cancel = len(decoder.alive_per_step)
    assert b.wait() == [long_b[::-1]]
    with pytest.raises(Cancelled):
        a.wait()
    # At most the step already under way when cancel() landed still held a's row.
    assert all(rows == [1] for rows in decoder.alive_per_step[steps_at_cancel + 1:])
    assert a.stats.steps <= steps_at_cancel + 1 < b.stats.steps
    batcher.stop()


def test_deadline_stops_a_running_job():
    decoder = ReverseDecoder(step_seconds=0.01)
    batcher = make(decoder, max_queue_delay_ms=0.0)
    job = batcher.submit(Job([list(range(200))], options="g", deadline=time.monotonic() + 0.1))
    with pytest.raises(DeadlineExceeded):
        job.wait()
    batcher.wait_idle(5)
    assert len(decoder.alive_per_step) < 200
    batcher.stop()


def test_queued_job_past_its_deadline_is_never_decoded():
    decoder = ReverseDecoder()
    decoder.gate = threading.Event()
    batcher = make(decoder, max_queue_delay_ms=0.0)
    first = batcher.submit(Job([[1, 2]], options="g"))
    decoder.started.wait(5)
    late = batcher.submit(Job([[42]], options="g", deadline=time.monotonic() + 0.05))
    with pytest.raises(DeadlineExceeded):
        late.wait()
    decoder.gate.set()
    first.wait()
    assert batcher.wait_idle(5)
    assert all([42] not in srcs for _, srcs in decoder.batches)
    batcher.stop()


def test_decode_error_fails_its_batch_and_the_worker_carries_on():
    decoder = ReverseDecoder()
    batcher = make(decoder, max_queue_delay_ms=0.0)
    decoder.fail = True
    with pytest.raises(DecodeFailed, match="scripted failure"):
        batcher.submit(Job([[1]], options="g")).wait()
    decoder.fail = False
    assert batcher.submit(Job([[1, 2]], options="g")).wait() == [[2, 1]]
    batcher.stop()


def test_stream_reports_growing_prefixes_then_the_result():
    batcher = make(ReverseDecoder(), max_queue_delay_ms=0.0)
    job = batcher.submit(Job([[1, 2, 3], [4]], options="g", stream=True))
    events = list(job.events())
    prefixes = [value for kind, i, value in events if kind == "prefix" and i == 0]
    assert prefixes == [[3], [3, 2], [3, 2, 1]]
    assert sorted((i, value) for kind, i, value in events if kind == "result") == [(0, [3, 2, 1]), (1, [4])]
    batcher.stop()


def test_closed_batcher_refuses_new_jobs_and_finishes_admitted_ones():
    decoder = ReverseDecoder(step_seconds=0.01)
    batcher = make(decoder, max_queue_delay_ms=0.0)
    job = batcher.submit(Job([[1, 2, 3]], options="g"))
    batcher.close()
    with pytest.raises(ShuttingDown):
        batcher.submit(Job([[1]], options="g"))
    assert batcher.wait_idle(5)
    assert job.wait() == [[3, 2, 1]]
    batcher.stop()


def test_the_engine_decodes_on_one_thread_after_worker_init():
    """Batches of any options, one after another or side by side, decode on the engine's thread."""
    threads: set[str] = set()
    decoder = ReverseDecoder(joins=True)

    def decode(batch, options):
        threads.add(threading.current_thread().name)
        return (yield from decoder(batch, options))

    inits: list[str] = []
    batcher = Batcher(decode, BatcherConfig(max_queue_delay_ms=0.0),
                      worker_init=lambda: inits.append(threading.current_thread().name))
    jobs = [batcher.submit(Job([[i, 2]], options=opts)) for i, opts in enumerate("abcab")]
    assert [job.wait() for job in jobs] == [[[2, i]] for i in range(5)]
    assert inits == ["batcher"] and threads == {"batcher"}
    batcher.stop()


def test_an_engine_run_by_its_caller_decodes_until_stopped():
    batcher = Batcher(ReverseDecoder(), BatcherConfig(max_queue_delay_ms=0.0), thread=False)
    engine = threading.Thread(target=batcher.run, name="caller")
    engine.start()
    assert batcher.submit(Job([[1, 2, 3]], options="g")).wait() == [[3, 2, 1]]
    batcher.stop()
    engine.join(5)
    assert not engine.is_alive()


def test_stop_fails_the_requests_still_decoding_and_ends_the_engine():
    decoder = ReverseDecoder(step_seconds=0.01)
    batcher = make(decoder, max_queue_delay_ms=0.0)
    job = batcher.submit(Job([list(range(1000))], options="g"))
    assert decoder.started.wait(5)
    batcher.stop()
    with pytest.raises(ShuttingDown):
        job.wait()
    assert len(decoder.alive_per_step) < 1000 and batcher.pending == 0


def test_max_batches_must_be_positive():
    with pytest.raises(ConfigError, match="batching.max_batches"):
        BatcherConfig(max_batches=0)


def test_a_sentence_handed_over_early_answers_its_request_before_the_batch_ends():
    release = threading.Event()

    def decode(batch, options):
        yield
        batch.on_result(0, "short")  # the first sentence is final at once
        assert release.wait(10)  # the rest of the batch is still decoding
        return ["short", "long"]

    batcher = Batcher(decode, BatcherConfig(max_queue_delay_ms=200.0))
    short = batcher.submit(Job([[1]], options="g"))
    long = batcher.submit(Job([[1, 2, 3]], options="g"))
    assert short.wait() == ["short"]
    assert short.stats.decode_ms > 0  # settled before the answer, not when the batch ends
    assert not long.done
    release.set()
    assert long.wait() == ["long"]
    assert batcher.pending == 0
    batcher.stop()


def test_queued_sentences_join_a_running_batch_between_steps():
    decoder = ReverseDecoder(step_seconds=0.01, joins=True)
    batcher = make(decoder, max_queue_delay_ms=0.0, max_join_delay_ms=0.0)
    first = batcher.submit(Job([list(range(30))], options="g"))
    while len(decoder.alive_per_step) < 3:
        time.sleep(0.001)
    joining = batcher.submit(Job([[7, 8, 9], [5]], options="g"))
    other = batcher.submit(Job([[4, 2]], options="beam"))  # other options: a batch of its own
    assert joining.wait() == [[9, 8, 7], [5]]
    assert not first.done  # answered while the batch it joined is still decoding
    assert first.wait() == [list(range(30))[::-1]]
    assert other.wait() == [[2, 4]]
    assert [srcs for _, srcs in decoder.batches] == [[list(range(30)), [7, 8, 9], [5]], [[4, 2]]]
    assert joining.stats.queue_ms < first.stats.decode_ms and joining.stats.steps == 3
    assert batcher.pending == 0
    batcher.stop()


def test_joining_sentences_stay_within_max_batch_tokens_and_the_per_decode_cap():
    decoder = ReverseDecoder(joins=True)
    decoder.gate = threading.Event()
    batcher = make(decoder, max_batch_tokens=40, max_queue_delay_ms=0.0, max_join_delay_ms=0.0,
                   max_sentences_per_decode=6)
    jobs = [batcher.submit(Job([list(range(8))], options="g"))]
    decoder.started.wait(5)
    jobs += [batcher.submit(Job([list(range(n))], options="g")) for n in (3, 9, 4, 2, 5, 1, 6, 2)]
    decoder.gate.set()
    for job in jobs:
        job.wait()
    assert max(decoder.tokens_per_step) <= 40
    assert len(decoder.batches) > 1 and all(len(srcs) <= 6 for _, srcs in decoder.batches)
    assert sum(len(srcs) for _, srcs in decoder.batches) == len(jobs)
    batcher.stop()


def test_the_token_budget_counts_the_sentences_still_decoding_each_by_its_own_length():
    decoder = ReverseDecoder(step_seconds=0.05, joins=True)
    batcher = make(decoder, max_batch_tokens=70, max_queue_delay_ms=0.0, max_join_delay_ms=0.0)
    long = batcher.submit(Job([list(range(50))], options="g"))
    assert decoder.started.wait(5)
    short = batcher.submit(Job([list(range(10))], options="g"))  # 50 + 10 tokens: fits beside it
    while decoder.joined != [1]:
        time.sleep(0.001)
    long.cancel()
    while not decoder.alive_per_step or decoder.alive_per_step[-1] != [1]:  # the long one has left
        time.sleep(0.001)
    four = batcher.submit(Job([list(range(5))] * 4, options="g"))  # 10 + 4 x 5 tokens
    assert four.wait() == [list(range(5))[::-1]] * 4
    assert short.wait() == [list(range(10))[::-1]]
    with pytest.raises(Cancelled):
        long.wait()
    # Counted by the longest source the batch ever took (5 x 50), or by 5 rows x the longest
    # still decoding (5 x 10), they would not have fit.
    assert decoder.joined == [1, 4] and len(decoder.batches) == 1
    assert max(decoder.tokens_per_step) <= 70
    batcher.stop()


def running(tokens: int, options: str = "g", **cfg) -> tuple[ReverseDecoder, Batcher, Job]:
    """A batcher whose joining decoder is busy with one job of `tokens` steps, 10 ms each."""
    decoder = ReverseDecoder(step_seconds=0.01, joins=True)
    batcher = make(decoder, **cfg)
    first = batcher.submit(Job([list(range(tokens))], options=options))
    assert decoder.started.wait(5)
    return decoder, batcher, first


def test_without_continuous_batching_a_running_batch_takes_no_one():
    decoder, batcher, first = running(10, max_queue_delay_ms=0.0, continuous=False)
    second = batcher.submit(Job([[1, 2]], options="g"))
    assert second.wait() == [[2, 1]] and first.wait() == [list(range(10))[::-1]]
    assert [len(srcs) for _, srcs in decoder.batches] == [1, 1]
    batcher.stop()


def test_a_finished_sentence_gives_its_queue_place_back_while_its_batch_runs_on():
    _, batcher, long = running(40, max_queue_sentences=2, max_queue_delay_ms=0.0, max_join_delay_ms=0.0)
    assert batcher.submit(Job([[1, 2]], options="g")).wait() == [[2, 1]]
    assert not long.done and batcher.pending == 1
    assert batcher.submit(Job([[3]], options="g")).wait() == [[3]]  # refused if the first still counted
    long.wait()
    assert batcher.pending == 0
    batcher.stop()


def test_with_every_worker_busy_a_request_with_other_options_stops_the_joining_once_it_has_waited():
    decoder, batcher, first = running(30, options="greedy", max_batches=1, max_queue_delay_ms=10.0,
                                      max_join_delay_ms=0.0)
    other = batcher.submit(Job([[1, 2]], options="beam"))
    time.sleep(0.05)
    late = batcher.submit(Job([[3, 4]], options="greedy"))  # would join, but the beam request is older
    assert [job.wait() for job in (first, other, late)] == [[list(range(30))[::-1]], [[2, 1]], [[4, 3]]]
    assert [srcs for _, srcs in decoder.batches] == [[list(range(30))], [[1, 2]], [[3, 4]]]
    batcher.stop()


def test_sentences_arriving_within_the_join_delay_join_a_running_batch_together():
    decoder, batcher, first = running(100, max_queue_delay_ms=0.0, max_join_delay_ms=300.0, join_ratio=0.0)
    early = batcher.submit(Job([[1, 2]], options="g"))
    time.sleep(0.03)
    late = batcher.submit(Job([[3, 4, 5]], options="g"))
    assert early.wait() == [[2, 1]] and late.wait() == [[5, 4, 3]]
    assert decoder.joined == [2]  # one encoder pass for both
    assert early.stats.queue_ms >= 300.0 > late.stats.queue_ms
    assert not first.done
    first.wait()
    batcher.stop()


def test_sentences_join_at_once_when_the_batch_has_no_room_to_wait_for():
    # The budget fits the running sentence and one more: the first to come joins without waiting.
    decoder, batcher, first = running(10, max_batch_tokens=12, max_queue_delay_ms=0.0, max_join_delay_ms=10_000.0)
    joining = batcher.submit(Job([[1, 2]], options="g"))
    after = batcher.submit(Job([[3]], options="g"))
    assert joining.wait() == [[2, 1]] and after.wait() == [[3]]
    assert joining.stats.queue_ms < 1_000.0 and decoder.joined[0] == 1
    assert first.wait() == [list(range(10))[::-1]]
    batcher.stop()


def test_join_delay_must_not_be_negative():
    with pytest.raises(ConfigError, match="batching.max_join_delay_ms"):
        BatcherConfig(max_join_delay_ms=-1.0)
    with pytest.raises(ConfigError, match="batching.join_ratio"):
        BatcherConfig(join_ratio=-0.5)


def test_a_sentence_joins_a_batch_of_no_more_sentences_at_once_whatever_the_join_delay():
    decoder, batcher, first = running(100, max_queue_delay_ms=0.0, max_join_delay_ms=10_000.0, join_ratio=1.0)
    joining = batcher.submit(Job([[1, 2]], options="g"))
    assert joining.wait() == [[2, 1]]
    assert joining.stats.queue_ms < 1_000.0 and decoder.joined == [1]
    assert not first.done
    first.wait()
    batcher.stop()


def test_beside_more_sentences_joining_ones_wait_until_they_are_as_many():
    # Two decode; a first sentence waits for company, the second one makes them as many: both join together.
    decoder = ReverseDecoder(step_seconds=0.01, joins=True)
    batcher = make(decoder, max_queue_delay_ms=0.0, max_join_delay_ms=10_000.0, join_ratio=1.0)
    first = batcher.submit(Job([list(range(100)), list(range(100))], options="g"))
    assert decoder.started.wait(5)
    early = batcher.submit(Job([[1, 2]], options="g"))
    time.sleep(0.05)
    assert decoder.joined == []  # one of two: it waits
    late = batcher.submit(Job([[3]], options="g"))
    assert early.wait() == [[2, 1]] and late.wait() == [[3]]
    assert decoder.joined == [2]  # one encoder pass for both
    assert early.stats.queue_ms >= 50.0 and late.stats.queue_ms < 1_000.0
    assert not first.done
    first.wait()
    batcher.stop()


def test_a_short_request_with_other_options_keeps_moving_beside_a_long_one():
    """Batches step in turn by compute used: 3 steps of a cheap batch do not wait out 100 costly ones."""
    decoder = ReverseDecoder(joins=True)
    seconds = {"beam16": 0.03, "greedy": 0.0}

    def decode(batch, options):
        steps = decoder(batch, options)
        while True:
            decoder.step_seconds = seconds[options]  # this batch's next step costs this much
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value
            yield

    batcher = Batcher(decode, BatcherConfig(max_queue_delay_ms=0.0, max_join_delay_ms=0.0))
    long = batcher.submit(Job([list(range(100))], options="beam16"))
    assert decoder.started.wait(5)
    time.sleep(0.1)
    start = time.monotonic()
    short = batcher.submit(Job([[1, 2, 3]], options="greedy"))
    assert short.wait() == [[3, 2, 1]]
    assert time.monotonic() - start < 1.0 and not long.done  # the long one needs 3 s in all
    long.cancel()
    assert batcher.wait_idle(5)
    batcher.stop()


def held(**cfg) -> tuple[ReverseDecoder, Batcher, Job]:
    """A batcher with one batch place, taken by a job held at its first step until decoder.gate is set."""
    decoder = ReverseDecoder()
    decoder.gate = threading.Event()
    batcher = make(decoder, max_batches=1, max_queue_delay_ms=0.0, **cfg)
    first = batcher.submit(Job([[1, 2]], options="g"))
    assert decoder.started.wait(5)
    return decoder, batcher, first


def test_a_cancelled_request_gives_its_queue_places_back_at_once():
    decoder, batcher, running_job = held(max_queue_sentences=5)
    queued = batcher.submit(Job([[3], [4], [5]], options="g"))
    assert batcher.pending == 4
    queued.cancel()
    assert batcher.pending == 1  # before any step ran
    running_job.cancel()
    assert batcher.pending == 0  # the running batch has not even reached its next step
    after = batcher.submit(Job([[6], [7], [8], [9], [10]], options="g"))
    decoder.gate.set()
    assert after.wait() == [[6], [7], [8], [9], [10]]
    assert all([3] not in srcs for _, srcs in decoder.batches)
    assert batcher.wait_idle(5)
    batcher.stop()


def test_a_queued_request_past_its_deadline_gives_its_places_back_without_a_step():
    decoder, batcher, first = held(max_queue_sentences=3)
    batcher.submit(Job([[3], [4]], options="g", deadline=time.monotonic() + 0.05))
    deadline = time.monotonic() + 5
    while batcher.pending > 1 and time.monotonic() < deadline:  # nobody waits on the job: the batcher notices
        time.sleep(0.01)
    assert batcher.pending == 1
    decoder.gate.set()
    assert first.wait() == [[2, 1]]
    batcher.stop()


def test_a_queued_request_with_an_earlier_deadline_than_those_queued_gives_its_places_back_at_it():
    # The deadline thread waits for the first deadline queued (10 s); one queued after it with an
    # earlier deadline wakes it.
    decoder, batcher, first = held(max_queue_sentences=4)
    batcher.submit(Job([[3]], options="g", deadline=time.monotonic() + 10.0))
    time.sleep(0.05)  # the deadline thread now waits for the 10 s deadline
    early = batcher.submit(Job([[4], [5]], options="g", deadline=time.monotonic() + 0.05))
    deadline = time.monotonic() + 5
    while batcher.pending > 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.pending == 2 and early.done  # the running sentence and the 10 s one
    with pytest.raises(DeadlineExceeded):
        early.wait()
    decoder.gate.set()
    assert first.wait() == [[2, 1]]
    batcher.stop()


def test_streaming_requests_batch_apart_and_only_their_batches_report_prefixes():
    decoder = ReverseDecoder()
    decoder.gate = threading.Event()
    batcher = make(decoder, max_batches=1, max_queue_delay_ms=0.0)
    first = batcher.submit(Job([[9]], options="other"))
    assert decoder.started.wait(5)
    plain = [batcher.submit(Job([[i, 1]], options="g")) for i in range(2)]
    streamed = batcher.submit(Job([[5, 6]], options="g", stream=True))
    decoder.gate.set()
    assert [job.wait() for job in (first, *plain)] == [[[9]], [[1, 0]], [[1, 1]]]
    assert [(kind, value) for kind, _, value in streamed.events()] == [("prefix", [6]), ("prefix", [6, 5]),
                                                                        ("result", [6, 5])]
    assert [len(srcs) for _, srcs in decoder.batches] == [1, 2, 1] and decoder.streams == [False, False, True]
    batcher.stop()


def test_a_short_request_is_not_kept_out_by_the_queued_sentences_of_a_long_one():
    """A long request whose sentences fit the token budget one at a time keeps most of them queued;
    they do not take every batch place: a later request with other options starts beside it."""
    decoder = ReverseDecoder(step_seconds=0.005, joins=True)
    batcher = make(decoder, max_batch_tokens=30, max_queue_delay_ms=0.0, max_join_delay_ms=0.0)
    long = batcher.submit(Job([list(range(20))] * 8, options="beam"))  # two of them exceed the budget
    assert decoder.started.wait(5)
    short = batcher.submit(Job([[1, 2]], options="greedy"))
    assert short.wait() == [[2, 1]]
    assert not long.done  # 8 sentences one after another: 160 steps of 5 ms
    assert long.wait() == [list(range(20))[::-1]] * 8
    batcher.stop()


def test_the_engine_wakes_the_event_loop_at_most_one_step_after_an_answer_and_before_it_idles():
    """Without a native step to release them (translator.handover), answers handed to an event loop
    wake it after the next whole step, and the last one when the batch ends."""
    from translator.service import LoopMailbox

    class Loop:  # asyncio's part: runs what it is handed at once, counting the wake-ups
        woken = 0

        def call_soon_threadsafe(self, fn):
            self.woken += 1
            fn()

    loop = Loop()
    box = LoopMailbox(loop)
    woken_at_step: list[int] = []

    def decode(batch, options):
        out: list[list[int]] = [[] for _ in batch.sources]
        for step in range(max(map(len, batch.sources))):
            yield
            woken_at_step.append(loop.woken)
            for i, source in enumerate(batch.sources):
                if step < len(source):
                    out[i].append(source[-1 - step])
                    if step == len(source) - 1:
                        batch.on_result(i, out[i])
        yield
        return out

    handed: list[tuple] = []
    batcher = Batcher(decode, BatcherConfig())
    job = batcher.submit(Job([[1], [2, 3, 4, 5]], options="g", listener=lambda e: box.post(handed.append, e)))
    assert job.wait() == [[1], [5, 4, 3, 2]]
    deadline = time.monotonic() + 5.0  # the engine goes idle (no stop() to release what it holds)
    while loop.woken < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    batcher.stop()
    # sentence 0's answer, handed over in step 1, wakes the loop after step 2; the rest when it ends
    assert woken_at_step == [0, 0, 1, 1]
    assert [e[0] for e in handed] == ["result", "result", "end"]
    assert loop.woken == 2
