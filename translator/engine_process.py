"""The decoding engine in a process of its own, behind the service (the layout of vLLM's engine core).

In one process the front end's Python (grpc.aio, tokenizing, request logs) and the engine share one
GIL: every torch op the engine runs releases it, the front end takes it, and the engine waits for
it back; each answer handed to the event loop does the same. Here the engine process runs the
Batcher on its main thread (the one that loaded the model, for the reason in translator.batcher),
and the front end keeps everything else: its TranslationService checks limits, tokenizes and
detokenizes as before, with a `RemoteBatcher` in place of the Batcher. Jobs live in the front end;
their sources, options and deadline go to the engine over a pipe, and their events come back.

Messages, pickled, over a socket pair (framed by multiprocessing's Connection):
    front -> engine: ("submit", id, sources, key, cost, stream, deadline), ("cancel", id), ("stop",)
    engine -> front: ("ready",), ("failed", message),
                     ("event", id, (kind, i, value), started, steps), ("end", id, error, started, steps)
`deadline` and `started` are time.monotonic() values, which the two processes share (one host).

If the engine process dies (killed, out of memory), its requests fail with `EngineRestarted`
(UNAVAILABLE: safe to retry) and a new engine process starts; the front end keeps serving.

`EnginePool` runs several engine processes for one model (as Triton runs several instances of a
model), each decoding batches of its own on a share of the cores, behind one admission queue; a
request goes to the engine holding the fewest sentences. It is meant for machines with more cores
than one engine's small products can use. On two cores, two single-threaded engines delivered more
than one engine of two threads for beam search under heavy load, not for greedy search, and a lone
request, decoded on one core, took longer (docs/RESULTS.md); the pool is off by default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from itertools import count
from multiprocessing.connection import Connection
from typing import Any

from translator.batcher import BatcherConfig
from translator.decoding import DecodeOptions
from translator.jobs import Admission, BatcherError, DecodeFailed, EngineRestarted, Job, ShuttingDown

log = logging.getLogger("translator.engine")
# Plain pickle, not multiprocessing's: that one sends tensors as shared-memory handles, which only a
# process multiprocessing started (and authenticated) can open.
PROTOCOL = pickle.HIGHEST_PROTOCOL


class EngineStartError(RuntimeError):
    """The engine process did not come up."""


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process needs to build its side of the service."""

    checkpoint: str
    batching: BatcherConfig
    limits: Any  # translator.requests.Limits
    defaults: DecodeOptions | None = None
    threads: int = 0
    start_timeout_s: float = 300.0
    processes: int = 1  # engine processes for the model (EnginePool when more than one)


# -- the engine process -----------------------------------------------------------------------


def engine_main(conn: Connection) -> None:
    """The engine process: take its spec, load the model, then decode until told to stop or the
    front end goes away."""
    import torch

    from translator.runtime import keep_freed_memory
    from translator.service import TranslationService

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the front end drains
    _, spec = pickle.loads(conn.recv_bytes())
    keep_freed_memory()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        service = TranslationService.from_checkpoint(spec.checkpoint, spec.limits, spec.batching, spec.defaults,
                                                     spec.threads, engine_thread=False)
        service.translator.translate(["warm-up"])  # first-call costs before the first request
    except Exception as e:  # noqa: BLE001 - reported to the front end, which names it
        conn.send_bytes(pickle.dumps(("failed", f"{type(e).__name__}: {e}"), PROTOCOL))
        return

    side = _EngineSide(conn, service.batcher)
    threading.Thread(target=side.receive, name="engine-requests", daemon=True).start()
    side.send(("ready",))
    service.run_engine()  # until ("stop",) or the pipe closes


class _EngineSide:
    """The engine process's end of the pipe: requests in, job events out (from any thread)."""

    def __init__(self, conn: Connection, batcher: Any) -> None:
        self.conn = conn
        self.batcher = batcher
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()  # one message on the pipe at a time

    def send(self, message: tuple) -> None:
        with self.lock:
            try:
                self.conn.send_bytes(pickle.dumps(message, PROTOCOL))
            except (OSError, ValueError):  # the front end has gone: receive() stops the engine
                pass

    def receive(self) -> None:
        while True:
            try:
                message = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                message = ("stop",)
            kind = message[0]
            if kind == "stop":
                self.batcher.stop()
                return
            try:
                if kind == "submit":
                    self.submit(*message[1:])
                elif kind == "cancel" and (job := self.jobs.get(message[1])) is not None:
                    job.cancel()
            except Exception as e:  # the request fails, the engine carries on
                log.exception("engine: %s of request %s failed", kind, message[1])
                self.send(("end", message[1], DecodeFailed(f"{type(e).__name__}: {e}"), None, 0))

    def submit(self, job_id: int, sources: list[list[int]], options: Any, cost: int, stream: bool,
               deadline: float | None) -> None:
        def listener(event: tuple[str, int, Any]) -> None:
            job = self.jobs.get(job_id)
            if job is None:
                return
            if event[0] == "end":
                self.jobs.pop(job_id, None)
                self.send(("end", job_id, job.error, job._started, job.stats.steps))
            else:
                self.send(("event", job_id, event, job._started, job.stats.steps))

        job = Job(sources, options, cost=cost, deadline=deadline, stream=stream, listener=listener)
        self.jobs[job_id] = job
        try:
            self.batcher.submit(job)
        except BatcherError as e:  # the front end counts places too, so only a race gets here
            job.fail(e)


# -- the front end's side ---------------------------------------------------------------------


class RemoteBatcher:
    """The Batcher's interface (submit, pending, close, wait_idle, stop, run) over an engine process.

    Admission is decided here, at once, against the same max_queue_sentences: a sentence holds its
    place from submit until its result arrives or its job ends, as in the Batcher.
    """

    def __init__(self, spec: EngineSpec, admission: Admission | None = None,
                 stopped: threading.Event | None = None) -> None:
        """admission, stopped: shared with the other engines of a pool (the places of one queue;
        set when any of them stops)."""
        self.spec = spec
        self.config = spec.batching
        self._jobs: dict[int, Job] = {}
        self._held: dict[int, int] = {}  # places each job still holds
        self._ids = count()
        self._admission = admission or Admission(self.config.max_queue_sentences)
        self._cond = self._admission.cond
        self._stopping = False
        self._send_lock = threading.Lock()
        self._stopped = stopped or threading.Event()
        self._restarting = False
        self.restarts = 0
        self._conn, self._process = self._start()

    @property
    def pending(self) -> int:
        return self._admission.pending

    @property
    def failed(self) -> bool:
        """The engine process died and could not be restarted: requests are refused."""
        return self._stopped.is_set() and not self._stopping

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def holding(self) -> int:
        """Sentences of this engine's jobs not finished yet."""
        with self._cond:
            return sum(self._held.values())

    # -- the Batcher's interface --------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        n = len(job.sources)
        with self._cond:
            self._admission.take(n)
            job_id = next(self._ids)
            job._submitted = time.monotonic()
            self._jobs[job_id] = job
            self._held[job_id] = n
            job._on_end = lambda job, job_id=job_id: self._ended(job_id)
        with self._send_lock:
            if not self._restarting:  # else it goes to the new engine once that has started
                self._send_locked(_submit_message(job_id, job))
        if job.done:  # cancelled before it got here
            self._ended(job_id)
        return job

    def close(self) -> None:
        self._admission.close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._admission.wait_idle(timeout)

    def stop(self) -> None:
        """Refuse new jobs, fail the unfinished ones and stop the engine process."""
        with self._cond:
            self._admission.closed = self._stopping = True
            jobs = list(self._jobs.values())
        for job in jobs:
            job.fail(ShuttingDown("the server shut down before the request was decoded"))
        self._send(("stop",))
        try:
            self._process.wait(10.0)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._stopped.set()

    def run(self) -> None:
        """Block until stop(): the engine runs in its own process."""
        self._stopped.wait()

    # -- the engine process -------------------------------------------------------------------

    def _start(self) -> tuple[Connection, subprocess.Popen]:
        """Start an engine process and wait until it has loaded the model. A fresh interpreter
        (`python -m translator.engine_process FD`), not multiprocessing's spawn: that would import
        the caller's main module again in the child."""
        mine, theirs = socket.socketpair()
        with theirs:
            process = subprocess.Popen([sys.executable, "-m", "translator.engine_process", str(theirs.fileno())],
                                       pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        conn = Connection(mine.detach())
        try:
            conn.send_bytes(pickle.dumps(("spec", self.spec), PROTOCOL))
            deadline = time.monotonic() + self.spec.start_timeout_s
            while not conn.poll(0.1):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise EOFError
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            process.kill()
            conn.close()
            raise EngineStartError(f"the decoding engine did not start (exit code {process.wait()})") from None
        if message[0] != "ready":
            process.wait()
            conn.close()
            raise EngineStartError(f"the decoding engine failed to start: {message[1]}")
        threading.Thread(target=self._receive, args=(conn, process), name="engine-events", daemon=True).start()
        return conn, process

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._send_locked(message)

    def _send_locked(self, message: tuple) -> None:
        try:
            self._conn.send_bytes(pickle.dumps(message, PROTOCOL))
        except (OSError, ValueError):  # the engine has gone: _receive fails its jobs and restarts it
            pass

    def _receive(self, conn: Connection, process: subprocess.Popen) -> None:
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break
            kind, job_id = message[0], message[1]
            job = self._jobs.get(job_id)
            if job is None:
                continue
            started, steps = message[-2], message[-1]
            if started is not None:
                job._start(started)
            job.stats.steps = steps
            if kind == "event":
                self._event(job_id, job, message[2])
            elif kind == "end":
                self._finish(job_id, job, message[2])
        conn.close()
        self._lost(process.wait())

    def _event(self, job_id: int, job: Job, event: tuple[str, int, Any]) -> None:
        if event[0] == "prefix":
            if not job.done:
                job._emit(event)
            return
        self._release(job_id, 1)
        job._set_result(event[1], event[2])

    def _finish(self, job_id: int, job: Job, error: BatcherError | None) -> None:
        with self._cond:
            self._jobs.pop(job_id, None)
        if error is not None:
            job.fail(error)
        self._release(job_id)

    def _ended(self, job_id: int) -> None:
        """A job ended here (cancelled, past its deadline, failed): its places go back at once,
        and the engine stops spending compute on it."""
        with self._cond:
            running = self._jobs.pop(job_id, None) is not None
        self._release(job_id)
        if running:
            self._send(("cancel", job_id))

    def _release(self, job_id: int, n: int | None = None) -> None:
        """Give back n of the job's places (all of them when None)."""
        with self._cond:
            held = self._held.get(job_id, 0)
            n = held if n is None else min(n, held)
            if held - n:
                self._held[job_id] = held - n
            else:
                self._held.pop(job_id, None)
            self._admission.give_back(n)

    def _lost(self, exitcode: int | None) -> None:
        """The engine process ended: fail what it held and, unless stopping, start another; requests
        that arrive meanwhile wait for it."""
        with self._send_lock:
            self._restarting = True
            with self._cond:
                stopping = self._stopping
                lost = list(self._jobs.values())
        if stopping:
            return
        log.error("the decoding engine exited (code %s); %d requests failed; restarting it", exitcode, len(lost))
        for job in lost:
            job.fail(EngineRestarted(f"the decoding engine stopped (exit code {exitcode}) and was restarted; retry"))
        try:
            conn, process = self._start()
        except EngineStartError as e:
            log.error("%s; refusing requests", e)
            with self._cond:
                self._admission.closed = True
                waiting = list(self._jobs.values())
            for job in waiting:
                job.fail(ShuttingDown(f"the decoding engine could not be restarted: {e}"))
            self._stopped.set()
            return
        with self._send_lock:
            self._conn, self._process = conn, process
            self._restarting = False
            with self._cond:
                waiting = list(self._jobs.items())
            for job_id, job in waiting:
                self._send_locked(_submit_message(job_id, job))
        self.restarts += 1


class EnginePool:
    """The Batcher's interface over several engine processes of one model (see the module
    docstring): one admission queue, each request to the engine holding the fewest sentences.

    An engine that dies is replaced as a lone one is, failing only its own requests; one that
    cannot be replaced stops the pool, which then refuses requests (`failed`), as a lone one does.
    """

    def __init__(self, spec: EngineSpec) -> None:
        if spec.processes < 1:
            raise ValueError(f"an engine pool needs at least one process, got {spec.processes}")
        # Each engine gets its share of the cores this process may run on, unless told its threads.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        one = dataclasses.replace(spec, threads=spec.threads or max(1, cores // spec.processes), processes=1)
        self.config = spec.batching
        self._admission = Admission(self.config.max_queue_sentences)
        self._stopped = threading.Event()
        self.engines: list[RemoteBatcher] = []
        try:
            for _ in range(spec.processes):
                self.engines.append(RemoteBatcher(one, self._admission, self._stopped))
        except EngineStartError:
            self.stop()
            raise

    @property
    def pending(self) -> int:
        return self._admission.pending

    @property
    def failed(self) -> bool:
        return any(engine.failed for engine in self.engines)

    @property
    def restarts(self) -> int:
        return sum(engine.restarts for engine in self.engines)

    def submit(self, job: Job) -> Job:
        with self._admission.cond:
            engine = min(self.engines, key=lambda e: e.holding)
        return engine.submit(job)  # sends outside the lock, as a lone engine does

    def close(self) -> None:
        self._admission.close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._admission.wait_idle(timeout)

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()
        self._stopped.set()

    def run(self) -> None:
        """Block until stop(), or until an engine has died and could not be restarted."""
        self._stopped.wait()


def engine_batcher(spec: EngineSpec) -> RemoteBatcher | EnginePool:
    """The front end's side of spec's engine processes: one, or a pool."""
    return RemoteBatcher(spec) if spec.processes == 1 else EnginePool(spec)


def _submit_message(job_id: int, job: Job) -> tuple:
    return ("submit", job_id, job.sources, job.options, job.cost, job.streaming, job.deadline)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    engine_main(Connection(int(sys.argv[1])))
