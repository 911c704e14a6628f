"""One decoding engine for several models: one Batcher, one engine thread, a lane per model.

All torch work of a process stays on one engine thread (translator.batcher: a second thread
starting OpenMP work slows every decoder step), so the models a server holds share one Batcher.
Each model's service submits through a `Lane`, which marks its jobs with the lane: the Batcher
groups sentences by that key, so a batch never mixes models, and the shared decode function hands
each batch to its lane's model. A lane has the Batcher's interface for one model (submit,
pending, close, wait_idle, stop), so a model can be retired while the others keep decoding.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from translator.batcher import Batcher, BatcherConfig, DecodeFn, RunningBatch
from translator.jobs import Job, ShuttingDown


@dataclass(frozen=True)
class _LaneKey:
    """A job's batching key in the shared Batcher: its model's lane and its own options."""

    lane: Lane
    options: Hashable


class SharedEngine:
    """The Batcher every model of a server decodes on (see the module docstring)."""

    def __init__(self, batching: BatcherConfig | None = None, threads: int = 0, thread: bool = True) -> None:
        """threads: intra-op threads of the engine, 0 = torch's default; thread: run the engine on a
        thread of its own, else the caller runs `run()`."""
        init = (lambda: torch.set_num_threads(threads)) if threads else None
        self.batcher = Batcher(_decode, batching, init, thread=thread)

    @property
    def config(self) -> BatcherConfig:
        return self.batcher.config

    @property
    def pending(self) -> int:
        return self.batcher.pending

    def lane(self, decode: DecodeFn) -> Lane:
        return Lane(self, decode)

    def run(self) -> None:
        self.batcher.run()

    def stop(self) -> None:
        self.batcher.stop()


class Lane:
    """One model's way into a SharedEngine, with the Batcher's interface for that model alone."""

    def __init__(self, engine: SharedEngine, decode: DecodeFn) -> None:
        self.engine = engine
        self.decode = decode
        self._jobs: dict[int, Job] = {}  # submitted and maybe not ended
        self._closed = False
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Sentences of this model's unfinished jobs."""
        with self._lock:
            return sum(len(job.sources) for job in self._jobs.values() if not job.done)

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise ShuttingDown("the model is being unloaded")
            self._jobs = {k: j for k, j in self._jobs.items() if not j.done}
            self._jobs[id(job)] = job
        job.options = _LaneKey(self, job.options)
        try:
            return self.engine.batcher.submit(job)
        except BaseException:  # refused (queue full, shutting down): nothing of it to wait for
            with self._lock:
                self._jobs.pop(id(job), None)
            raise

    def close(self) -> None:
        """Refuse new jobs; admitted ones still finish."""
        with self._lock:
            self._closed = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every job submitted here has ended; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not job.wait_ended(left):
                return False
        return True

    def stop(self) -> None:
        """Refuse new jobs and fail this model's unfinished ones (the engine keeps running)."""
        self.close()
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.fail(ShuttingDown("the model was unloaded before the request was decoded"))

    def run(self) -> None:
        self.engine.run()


def _decode(batch: RunningBatch, key: _LaneKey) -> Generator[None, None, list[Any]]:
    """The shared Batcher's decode function: the batch goes to its lane's model."""
    return (yield from key.lane.decode(batch, key.options))
