"""The models a server serves: named TranslationServices, routed by name or language pair, and
swapped, loaded and unloaded while requests run.

A swap builds the new service beside the old one (`load_checkpoint` verifies digests, finite
weights and shapes; a failure raises CheckpointError and changes nothing), then points the name at
it in one step under a lock. A request holds the service it was routed to (`checkout`) until it
ends, so requests already running finish on the old weights; the old service is stopped in the
background once the last of them has ended (or after `retire_grace_s`, when the rest fail with
ShuttingDown). Knows nothing of gRPC.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from translator.config import ConfigError
from translator.model_info import ModelInfo
from translator.service import TranslationService
from translator.shared_engine import SharedEngine

log = logging.getLogger("translator.models")
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class UnknownModel(LookupError):
    """A request names a model, or a language pair, that the server does not serve."""


class ModelExists(ValueError):
    """A model of that name is already served."""


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: its name, its checkpoint, and the languages it is routed by (empty: as
    the checkpoint records them)."""

    name: str
    checkpoint: str
    source_language: str = ""
    target_language: str = ""

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ConfigError(f"model name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if not self.checkpoint:
            raise ConfigError(f"model {self.name}: checkpoint is required")


class Models:
    """Named services; thread-safe. build(spec) loads and verifies one (raising CheckpointError, or
    EngineStartError in the engine-process layout); engine: the SharedEngine they decode on, if
    they share one (it stops after them), else each has an engine process of its own."""

    def __init__(self, build: Callable[[ModelSpec], TranslationService], specs: Sequence[ModelSpec],
                 engine: SharedEngine | None = None, retire_grace_s: float = 60.0) -> None:
        names = [s.name for s in specs]
        if not specs or len(set(names)) != len(names):
            raise ConfigError(f"models must be at least one, with distinct names; got {names}")
        self._build = build
        self.engine = engine
        self._stopped = threading.Event()
        self.retire_grace_s = retire_grace_s
        self._lock = threading.Condition()
        self._admin = threading.Lock()  # one load / reload / unload at a time
        self._specs: dict[str, ModelSpec] = {}
        self._services: dict[str, TranslationService] = {}  # in order: the first is the default
        self._users: dict[int, int] = {}  # id(service) -> requests holding it
        self._retiring: dict[int, TranslationService] = {}  # swapped out or unloaded, not yet stopped
        try:
            for spec in specs:
                self._services[spec.name], self._specs[spec.name] = build(spec), spec
        except BaseException:
            self.stop()
            raise

    # -- requests ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def checkout(self, name: str = "", source: str = "", target: str = "") -> Iterator[TranslationService]:
        """The service a request is routed to, held until the request ends (see `route`)."""
        with self._lock:
            service = self.route(name, source, target)
            self._users[id(service)] = self._users.get(id(service), 0) + 1
        try:
            yield service
        finally:
            with self._lock:
                self._users[id(service)] -= 1
                if not self._users[id(service)]:
                    del self._users[id(service)]
                    self._lock.notify_all()

    def route(self, name: str = "", source: str = "", target: str = "") -> TranslationService:
        """By name; else the first model translating source into target (an empty one matches
        any); else the default (the first model). UnknownModel names what is served."""
        with self._lock:
            if name:
                if name in self._services:
                    return self._services[name]
                raise UnknownModel(f"no model named {name!r}; served: {self._served()}")
            if source or target:
                for service in self._services.values():
                    ident = service.identity
                    if source in ("", ident.source_language) and target in ("", ident.target_language):
                        return service
                raise UnknownModel(f"no model translates {source or '*'}->{target or '*'}; served: {self._served()}")
            if not self._services:
                raise UnknownModel("no model is served")
            return next(iter(self._services.values()))

    def _served(self) -> str:
        return ", ".join(f"{n} ({s.identity.source_language or '?'}->{s.identity.target_language or '?'})"
                         for n, s in self._services.items()) or "none"

    def infos(self) -> list[ModelInfo]:
        with self._lock:
            return [s.info for s in self._services.values()]

    def services(self) -> list[TranslationService]:
        with self._lock:
            return list(self._services.values())

    @property
    def pending(self) -> int:
        return sum(s.batcher.pending for s in self.services())

    # -- changes -------------------------------------------------------------------------------

    def load(self, spec: ModelSpec) -> ModelInfo:
        """Serve a new model; ModelExists if the name is taken."""
        with self._admin:
            with self._lock:
                if spec.name in self._services:
                    raise ModelExists(f"a model named {spec.name!r} is already served; reload it instead")
            with _short_gil_slices():
                service = self._build(spec)
            with self._lock:
                self._services[spec.name], self._specs[spec.name] = service, spec
        log.info("model %s loaded from %s", spec.name, spec.checkpoint)
        return service.info

    def reload(self, name: str, checkpoint: str = "") -> ModelInfo:
        """Swap model `name` to `checkpoint` (default: its current path, read again)."""
        with self._admin:
            with self._lock:
                if name not in self._specs:
                    raise UnknownModel(f"no model named {name!r}; served: {self._served()}")
                spec = replace(self._specs[name], checkpoint=checkpoint or self._specs[name].checkpoint)
            with _short_gil_slices():
                service = self._build(spec)  # beside the old one, which serves meanwhile
            with self._lock:
                old, self._services[name], self._specs[name] = self._services[name], service, spec
            self._retire(old)
        log.info("model %s swapped to %s", name, spec.checkpoint)
        return service.info

    def reload_all(self) -> dict[str, Exception | None]:
        """Reload every model from its path; per name, None or the error that refused it."""
        outcome: dict[str, Exception | None] = {}
        for name in list(self._specs):
            try:
                self.reload(name)
                outcome[name] = None
            except Exception as e:  # noqa: BLE001 - each model's refusal is reported, the rest go on
                log.error("model %s not reloaded: %s", name, e)
                outcome[name] = e
        return outcome

    def unload(self, name: str) -> None:
        with self._admin:
            with self._lock:
                if name not in self._services:
                    raise UnknownModel(f"no model named {name!r}; served: {self._served()}")
                old = self._services.pop(name)
                del self._specs[name]
            self._retire(old)
        log.info("model %s unloaded", name)

    def _retire(self, service: TranslationService) -> None:
        """Stop service once no request holds it (in the background)."""
        with self._lock:
            self._retiring[id(service)] = service
        threading.Thread(target=self._wait_and_stop, args=(service,), name="retire", daemon=True).start()

    def _wait_and_stop(self, service: TranslationService) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: id(service) not in self._users, self.retire_grace_s):
                log.warning("model %s: requests still running after %.0f s are failed",
                            service.identity.name, self.retire_grace_s)
            if id(service) not in self._retiring:
                return  # stop() got to it first
        service.stop()
        with self._lock:
            self._retiring.pop(id(service), None)
            self._lock.notify_all()

    def wait_retired(self, timeout: float | None = None) -> bool:
        """Block until every swapped-out or unloaded model has stopped; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._retiring, timeout)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new requests (ShuttingDown); admitted ones still finish."""
        with self._lock:
            services = [*self._services.values(), *self._retiring.values()]
        for service in services:
            service.close()

    def stop(self) -> None:
        """Stop every model (unfinished requests fail), then the shared engine."""
        with self._lock:
            services = [*self._services.values(), *self._retiring.values()]
            self._retiring.clear()
            self._lock.notify_all()
        for service in services:
            service.stop()
        if self.engine is not None:
            self.engine.stop()
        self._stopped.set()

    def run_engine(self) -> None:
        """Decode on this thread until stop() (a shared engine made with thread=False); with engine
        processes, wait until stop() or until the default model's engine could not be restarted."""
        if self.engine is not None:
            self.engine.run()
            return
        while not self._stopped.wait(0.2):
            services = self.services()
            if services and getattr(services[0].batcher, "failed", False):
                return


LOAD_SWITCH_INTERVAL_S = 1e-4


@contextlib.contextmanager
def _short_gil_slices() -> Iterator[None]:
    """While a model is built beside the serving ones: its thread's Python (unpickling, module
    construction, the warm-up's search) holds the GIL for up to sys.getswitchinterval() at a
    time, and the engine thread needs the GIL between every two of its torch calls, so each of
    those could wait a whole slice. Shorter slices meanwhile. (Loads run one at a time.)"""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, LOAD_SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def load_priority() -> None:
    """The calling thread (one that loads a model and then ends) at the lowest CPU priority: where
    the engine's threads fill the cores, the load then runs in the time they leave instead of
    taking a core from the engine's OpenMP worker, which stalls every parallel region of its steps.
    A swap takes longer (docs/RESULTS.md); requests are not slowed by it."""
    with contextlib.suppress(AttributeError, OSError):  # no per-thread priority on this platform
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
