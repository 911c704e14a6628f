"""The server: the grpc.aio front end on an event loop thread of its own, with health
(grpc.health.v1), optional reflection, bearer-token auth, TLS / mutual TLS, the metrics endpoint and
graceful draining, wired in `create_server`; the admin service (translator.admin) when an admin
token file is configured. A call waiting for the decoder, an idle stream or an
idle metrics connection holds a coroutine on that loop, never a thread; decoding runs in the
service's engine, never on the loop. Nothing here assumes the main thread: nmt-serve runs the
engine there and calls start() / drain() from others.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from translator.admin import ADMIN_SERVICE_NAME, AdminServicer, admin_handler
from translator.batcher import BatcherConfig
from translator.config import ConfigError
from translator.decoding import DecodeOptions
from translator.metrics import Metrics, MetricsEndpoint
from translator.models import NAME, Models, ModelSpec
from translator.requests import Limits
from translator.server_security import BearerTokenAuth, TlsConfig, read_token, server_credentials
from translator.service import TranslationService
from translator.servicer import SERVICE_NAME, TranslatorServicer, generic_handler
from translator.shared_engine import SharedEngine

log = logging.getLogger("translator.server")
T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    checkpoint: str = ""  # one model, named after the file; or:
    models: tuple[ModelSpec, ...] = ()  # several, by name; the first is the default
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_port: int | None = None  # Prometheus text on http://host:port/metrics; 0 picks a free port
    reflection: bool = False
    auth_token_file: str = ""  # when set, calls need `authorization: Bearer <token>` (health is exempt)
    # When set, the Admin service (load, reload, unload models) is on, its calls needing
    # `authorization: Bearer <admin token>`; unset, it is UNIMPLEMENTED.
    admin_token_file: str = ""
    # How long requests running on a swapped-out or unloaded model may take to finish.
    swap_grace_seconds: float = 60.0
    grace_seconds: float = 10.0  # how long in-flight requests may take to finish on shutdown
    threads: int = 0  # torch intra-op threads of the decoding engine; 0 = torch's default
    # Decode in a process of its own, apart from the front end's GIL (translator.engine_process).
    engine_process: bool = False
    # With engine_process: engine processes per model, each decoding batches of its own on its
    # share of the cores (threads each; 0: the cores divided among them), one admission queue.
    engine_processes: int = 1
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: Limits = field(default_factory=Limits)
    batching: BatcherConfig = field(default_factory=BatcherConfig)
    decoding: DecodeOptions = field(default_factory=DecodeOptions)  # defaults for unset request fields

    def __post_init__(self) -> None:
        if not self.checkpoint and not self.models:
            raise ConfigError("checkpoint (one model) or models (several) is required")
        if self.checkpoint and self.models:
            raise ConfigError("give checkpoint (one model) or models (several), not both")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"models: names must be distinct, got {names}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if self.engine_processes < 1:
            raise ConfigError(f"engine_processes must be >= 1, got {self.engine_processes}")
        if self.engine_processes > 1 and not self.engine_process:
            raise ConfigError(f"engine_processes={self.engine_processes} needs engine_process: true "
                              "(the engines run in processes of their own)")
        for name in ("grace_seconds", "swap_grace_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    def model_specs(self) -> tuple[ModelSpec, ...]:
        """The models to serve: `models`, or the one `checkpoint` named after its file."""
        if self.models:
            return self.models
        name = Path(self.checkpoint).name
        return (ModelSpec(name if NAME.fullmatch(name) else "default", self.checkpoint),)


def build_models(cfg: ServerConfig, engine_thread: bool = True) -> Models:
    """Load and verify every configured model. All decode on one SharedEngine (on a thread of its
    own, or the caller runs `models.run_engine()`), or each in an engine process of its own."""
    engine = None if cfg.engine_process else SharedEngine(cfg.batching, cfg.threads, thread=engine_thread)

    def build(spec: ModelSpec) -> TranslationService:
        service = TranslationService.from_checkpoint(
            spec.checkpoint, cfg.limits, cfg.batching, cfg.decoding, cfg.threads, engine_process=cfg.engine_process,
            engine=engine, name=spec.name, languages=(spec.source_language, spec.target_language),
            engine_processes=cfg.engine_processes)
        if engine is not None:  # first-call costs (packed weights, caches) now, not on its first request
            service.translator.translate(["warm-up"])
        return service

    return Models(build, cfg.model_specs(), engine, cfg.swap_grace_seconds)


# -- the server -------------------------------------------------------------------------------


class _LoopThread:
    """An asyncio event loop running in a daemon thread of its own; any other thread hands it work."""

    def __init__(self, name: str = "grpc-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro on the loop and wait for its result (never call this from the loop's thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


class TranslationServer:
    """A grpc.aio server with its models, health status and metrics endpoint, driven from plain
    threads (the aio pieces run on the server's own loop thread); see create_server."""

    def __init__(self, loop: _LoopThread, server: grpc.aio.Server, servicer: TranslatorServicer,
                 health_servicer: health.aio.HealthServicer, metrics_http: MetricsEndpoint | None) -> None:
        self._loop = loop
        self.grpc = server
        self.servicer = servicer
        self.models = servicer.models
        self.metrics = servicer.metrics
        self.health = health_servicer
        self.metrics_http = metrics_http
        self._stopped = False

    @property
    def service(self) -> TranslationService:
        """The default model's service."""
        return self.models.route()

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.port if self.metrics_http else None

    def start(self) -> None:
        self._loop.run(self._start())

    async def _start(self) -> None:
        await self.grpc.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.metrics_http:
            await self.metrics_http.start()

    def drain(self, grace: float) -> None:
        """Health NOT_SERVING and new calls refused (UNAVAILABLE); the running Translator calls get
        up to `grace` seconds to finish (any still running then are cancelled); then the server
        stops at once, so that idle long-lived streams (Health.Watch, reflection) cannot hold it."""
        if self._stopped:
            return
        self._stopped = True
        self.models.close()  # first: a client that sees NOT_SERVING is refused from then on
        self._loop.run(self.health.enter_graceful_shutdown())
        if not self._loop.run(self.servicer.wait_idle(grace)):
            log.warning("requests still running after the %.1f s grace period are cancelled", grace)
        self._loop.run(self.grpc.stop(0))
        self.models.stop()
        if self.metrics_http:
            self._loop.run(self.metrics_http.close())
        self._loop.close()

    def stop(self) -> None:
        """Stop at once: in-flight calls are cancelled."""
        self.drain(0.0)


def create_server(cfg: ServerConfig, models: Models | None = None) -> tuple[TranslationServer, int]:
    """Load the models once and bind the port (0 = any free one); returns the unstarted server and
    its port. A port already in use is an OSError, never a silently shared port."""
    # Files first: a missing certificate or token file fails before the models load.
    interceptors = ([BearerTokenAuth(read_token(cfg.auth_token_file), (f"/{ADMIN_SERVICE_NAME}/",))]
                    if cfg.auth_token_file else [])
    admin_token = read_token(cfg.admin_token_file) if cfg.admin_token_file else None
    credentials = server_credentials(cfg.tls) if cfg.tls.enabled else None
    owns_models = models is None
    if models is None:
        models = build_models(cfg)
    loop = _LoopThread()
    try:
        server, port = loop.run(_build(cfg, models, interceptors, credentials, admin_token, loop))
    except BaseException:
        loop.close()
        if owns_models:
            models.stop()
        raise
    return server, port


async def _build(cfg: ServerConfig, models: Models, interceptors: list[grpc.aio.ServerInterceptor],
                 credentials: grpc.ServerCredentials | None, admin_token: str | None,
                 loop: _LoopThread) -> tuple[TranslationServer, int]:
    """The server's aio pieces, made on the loop that will run them."""
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", cfg.limits.max_message_bytes),
    ])
    servicer = TranslatorServicer(models, Metrics(lambda: models.pending))
    server.add_generic_rpc_handlers((generic_handler(servicer),))
    services = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
    if admin_token is not None:
        server.add_generic_rpc_handlers((admin_handler(AdminServicer(models, admin_token)),))
        services.append(ADMIN_SERVICE_NAME)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if cfg.reflection:
        reflection.enable_server_reflection(tuple(services), server)
    port = _bind(server, f"{cfg.host}:{cfg.port}", credentials)
    metrics_http = None
    if cfg.metrics_port is not None:
        metrics_http = MetricsEndpoint(servicer.metrics)
        await metrics_http.bind(cfg.host, cfg.metrics_port)
    return TranslationServer(loop, server, servicer, health_servicer, metrics_http), port


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        port, reason = 0, str(e)
    else:
        reason = "bind failed"
    if port == 0:
        raise OSError(f"cannot listen on {address}: {reason} (is another server using the port?)")
    return port
