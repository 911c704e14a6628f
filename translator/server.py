"""The gRPC adapter: proto -> TranslationService call -> proto, and the server around it.

Errors become status codes in one place (`status_of`); health (grpc.health.v1), optional
reflection, bearer-token auth, TLS / mutual TLS and graceful draining are wired in `create_server`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.protobuf import unknown_fields
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from translator.batcher import (
    BatcherConfig,
    Cancelled,
    DeadlineExceeded,
    DecodeFailed,
    QueueFull,
    ShuttingDown,
)
from translator.config import ConfigError
from translator.decoding import DecodeOptions
from translator.metrics import Metrics, serve_metrics
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc
from translator.service import (
    Call,
    Candidate,
    InvalidArgument,
    Limits,
    ModelIdentity,
    ModelInfo,
    RequestOptions,
    TranslationService,
)

log = logging.getLogger("translator.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Translator"].full_name  # translator.v1.Translator
HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"
# gRPC core's deadline timer and Python's clock disagree by a little; a cancel this close to the
# deadline is the deadline.
DEADLINE_SLACK_S = 0.05


@dataclass(frozen=True)
class TlsConfig:
    """PEM files. With client_ca_file set, clients must present a certificate it signed (mutual TLS)."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("tls.cert_file and tls.key_file must be given together")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("tls.client_ca_file (mutual TLS) needs tls.cert_file and tls.key_file")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class ServerConfig:
    checkpoint: str = ""
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_port: int | None = None  # Prometheus text on http://host:port/metrics; 0 picks a free port
    reflection: bool = False
    auth_token_file: str = ""  # when set, calls need `authorization: Bearer <token>` (health is exempt)
    grace_seconds: float = 10.0  # how long in-flight requests may take to finish on shutdown
    threads: int = 0  # torch intra-op threads of each decode worker (batching.workers); 0 = torch's default
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: Limits = field(default_factory=Limits)
    batching: BatcherConfig = field(default_factory=BatcherConfig)
    decoding: DecodeOptions = field(default_factory=DecodeOptions)  # defaults for unset request fields

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint is required")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if self.grace_seconds < 0:
            raise ConfigError(f"grace_seconds must be >= 0, got {self.grace_seconds}")


# -- errors: the one place where outcomes become status codes --------------------------------

_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (DecodeFailed, grpc.StatusCode.INTERNAL),
)


def status_of(error: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
    """Status code and client-facing message; unexpected errors are logged, never sent as traces."""
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code, str(error)
    log.exception("request %s failed", request_id, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log"


@dataclass
class _Rpc:
    id: str
    call: Call
    code: grpc.StatusCode = grpc.StatusCode.OK


class _Malformed:
    """What the request deserializer returns for bytes that do not parse, so the handler can say why."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"request is not a valid {type_name}: {error}"


def _parser(cls: type[pb_message.Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except pb_message.DecodeError as e:
            return _Malformed(cls.DESCRIPTOR.full_name, e)

    return parse


def check_request(request: Any) -> None:
    """Refuse malformed bytes and fields this server does not know (a newer client's options)."""
    if isinstance(request, _Malformed):
        raise InvalidArgument(request.message)
    unknown = _unknown_field(request, request.DESCRIPTOR.name)
    if unknown:
        raise InvalidArgument(f"unknown field {unknown}: this server does not support it")


def _unknown_field(msg: pb_message.Message, path: str) -> str | None:
    for f in unknown_fields.UnknownFieldSet(msg):
        return f"{path}.#{f.field_number}"
    for desc, value in msg.ListFields():
        if desc.message_type is not None and not desc.message_type.GetOptions().map_entry:
            for i, sub in enumerate(value if desc.is_repeated else [value]):
                name = f"{path}.{desc.name}" + (f"[{i}]" if desc.is_repeated else "")
                if found := _unknown_field(sub, name):
                    return found
    return None


# -- proto <-> domain -------------------------------------------------------------------------


def _request_options(o: pb.DecodingOptions) -> RequestOptions:
    def opt(name: str) -> Any:
        return getattr(o, name) if o.HasField(name) else None

    return RequestOptions(
        beam_size=opt("beam_size"), length_penalty=opt("length_penalty"), max_length=opt("max_length"),
        n_best=opt("n_best"), min_length=opt("min_length"),
        return_scores=o.return_scores, return_alignments=o.return_alignments,
    )


def _translation(candidates: list[Candidate], scores: bool) -> pb.Translation:
    out = pb.Translation()
    for c in candidates:
        h = out.hypotheses.add(text=c.text)
        if scores:
            h.score = c.score
        if c.alignment is not None:
            a = c.alignment
            h.alignment.CopyFrom(pb.Alignment(source_tokens=a.source_tokens, target_tokens=a.target_tokens,
                                              weights=[w for row in a.weights for w in row]))
    return out


def _identity(ident: ModelIdentity) -> pb.ModelIdentity:
    return pb.ModelIdentity(name=ident.name, checkpoint_sha256=ident.checkpoint_sha256,
                            source_language=ident.source_language, target_language=ident.target_language)


def _model_info(info: ModelInfo) -> pb.ModelInfo:
    arch, lim, d = info.architecture, info.limits, info.defaults
    defaults = pb.DecodingOptions(beam_size=d.beam_size, max_length=min(d.max_len, info.max_length),
                                  n_best=d.n_best, min_length=d.min_len, length_penalty=d.length_penalty)
    return pb.ModelInfo(
        model=_identity(info.identity),
        vocabulary_size=info.vocabulary_size,
        preset=info.preset,
        tokenizer_sha256=info.tokenizer_sha256,
        architecture=pb.Architecture(d_model=arch.d_model, n_heads=arch.n_heads, n_layers=arch.n_layers,
                                     d_ff=arch.d_ff, max_positions=arch.max_positions),
        limits=pb.Limits(max_sentences=lim.max_sentences, max_sentence_chars=lim.max_sentence_chars,
                         max_source_tokens=info.max_source_tokens, max_beam_size=lim.max_beam_size,
                         max_length=info.max_length, max_message_bytes=lim.max_message_bytes,
                         max_request_cost=lim.max_request_cost),
        defaults=defaults,
        metrics=info.metrics,
    )


# -- the servicer -----------------------------------------------------------------------------


class TranslatorServicer(pb_grpc.TranslatorServicer):
    """translator.v1.Translator over a TranslationService; one structured log line per call."""

    def __init__(self, service: TranslationService, metrics: Metrics | None = None) -> None:
        self.service = service
        self.metrics = metrics or Metrics()
        self.model = _identity(service.identity)

    def Translate(self, request: pb.TranslateRequest, context: grpc.ServicerContext) -> pb.TranslateResponse:
        with self._rpc("Translate", request, context) as rpc:
            check_request(request)
            results = self.service.translate(list(request.texts), _request_options(request.options), rpc.call)
            scores = request.options.return_scores
            return pb.TranslateResponse(translations=[_translation(r, scores) for r in results],
                                        model=self.model)

    def TranslateStream(self, request: pb.TranslateRequest,
                        context: grpc.ServicerContext) -> Iterator[pb.TranslateStreamResponse]:
        with self._rpc("TranslateStream", request, context) as rpc:
            check_request(request)
            options = _request_options(request.options)
            events = self.service.translate_stream(list(request.texts), options, rpc.call)
            model: pb.ModelIdentity | None = self.model
            for ev in events:
                msg = pb.TranslateStreamResponse(index=ev.index, text=ev.text, model=model)
                if ev.result is not None:
                    msg.done = True
                    msg.translation.CopyFrom(_translation(ev.result, request.options.return_scores))
                model = None
                yield msg

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        with self._rpc("GetModelInfo", request, context):
            check_request(request)
            return _model_info(self.service.info)

    @contextlib.contextmanager
    def _rpc(self, method: str, request: Any, context: grpc.ServicerContext) -> Iterator[_Rpc]:
        rpc = _Rpc(getattr(request, "request_id", "") or uuid.uuid4().hex[:16],
                   Call(deadline=_deadline(context), on_cancel=context.add_callback))
        start = time.perf_counter()
        try:
            yield rpc
        except GeneratorExit:  # the client went away in the middle of a stream
            rpc.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:  # noqa: BLE001 - every error leaves through status_of
            if isinstance(e, Cancelled) and context.time_remaining() < DEADLINE_SLACK_S:
                # gRPC ends a call at its deadline through the same callback as a client's cancel.
                e = DeadlineExceeded("deadline exceeded")
            rpc.code, message = status_of(e, rpc.id)
            context.abort(rpc.code, message)
        finally:
            self._log(method, rpc, time.perf_counter() - start)

    def _log(self, method: str, rpc: _Rpc, seconds: float) -> None:
        s = rpc.call
        self.metrics.record(method, rpc.code.name, seconds, s.sentences, s.queue_ms, s.decode_ms)
        log.info(json.dumps({
            "event": "rpc", "id": rpc.id, "method": method, "status": rpc.code.name,
            "sentences": s.sentences, "src_tokens": s.src_tokens, "queue_ms": round(s.queue_ms, 2),
            "decode_ms": round(s.decode_ms, 2), "steps": s.steps, "total_ms": round(seconds * 1000.0, 2),
        }))


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    # Without a client deadline gRPC reports an effectively infinite time.
    return None if remaining is None or remaining > 1e8 else time.monotonic() + remaining


def _generic_handler(servicer: TranslatorServicer) -> grpc.GenericRpcHandler:
    """Like the generated add_TranslatorServicer_to_server, but unparseable requests reach the
    servicer (as _Malformed) so that they get INVALID_ARGUMENT instead of gRPC's INTERNAL."""
    handlers = {
        "Translate": grpc.unary_unary_rpc_method_handler(
            servicer.Translate, _parser(pb.TranslateRequest), pb.TranslateResponse.SerializeToString),
        "TranslateStream": grpc.unary_stream_rpc_method_handler(
            servicer.TranslateStream, _parser(pb.TranslateRequest),
            pb.TranslateStreamResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, _parser(pb.GetModelInfoRequest), pb.ModelInfo.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


# -- auth -------------------------------------------------------------------------------------


class BearerTokenAuth(grpc.ServerInterceptor):
    """Calls must carry `authorization: Bearer <token>`; health checks are exempt."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        given = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization'")

    if handler.response_streaming:
        make = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler)
    else:
        make = (grpc.stream_unary_rpc_method_handler if handler.request_streaming
                else grpc.unary_unary_rpc_method_handler)
    return make(refuse, handler.request_deserializer, handler.response_serializer)


# -- the server -------------------------------------------------------------------------------


class TranslationServer:
    """A gRPC server with its service, health status and metrics endpoint; see create_server."""

    def __init__(self, server: grpc.Server, service: TranslationService,
                 health_servicer: health.HealthServicer, metrics: Metrics, metrics_http=None) -> None:
        self.grpc = server
        self.service = service
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_http = metrics_http

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.server_address[1] if self.metrics_http else None

    def start(self) -> None:
        self.grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def drain(self, grace: float) -> None:
        """Health NOT_SERVING, refuse new calls, give in-flight ones up to `grace` seconds, stop."""
        self.health.enter_graceful_shutdown()
        self.service.close()
        self.grpc.stop(grace).wait()
        self.service.stop()
        if self.metrics_http:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()

    def stop(self) -> None:
        """Stop at once: in-flight calls are cancelled."""
        self.drain(0.0)


def create_server(
    cfg: ServerConfig, service: TranslationService | None = None
) -> tuple[TranslationServer, int]:
    """Load the model once and bind the port (0 = any free one); returns the unstarted server and
    its port. A port already in use is an OSError, never a silently shared port."""
    # Files first: a missing certificate or token file fails before the model loads.
    interceptors = [BearerTokenAuth(_read_token(cfg.auth_token_file))] if cfg.auth_token_file else []
    credentials = _server_credentials(cfg.tls) if cfg.tls.enabled else None
    owns_service = service is None
    if service is None:
        service = TranslationService.from_checkpoint(cfg.checkpoint, cfg.limits, cfg.batching, cfg.decoding,
                                                     cfg.threads)
    try:
        metrics = Metrics(lambda: service.batcher.pending)
        # A thread per admitted request (they wait on the batcher) plus headroom for health checks
        # and refusals, so a full queue never starves them.
        workers = cfg.batching.max_queue_sentences + 16
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", cfg.limits.max_message_bytes),
            ],
        )
        server.add_generic_rpc_handlers((_generic_handler(TranslatorServicer(service, metrics)),))
        health_servicer = health.HealthServicer()
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if cfg.reflection:
            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
        port = _bind(server, f"{cfg.host}:{cfg.port}", credentials)
        metrics_http = None
        if cfg.metrics_port is not None:
            metrics_http = serve_metrics(metrics, cfg.host, cfg.metrics_port)
    except BaseException:
        if owns_service:
            service.stop()
        raise
    return TranslationServer(server, service, health_servicer, metrics, metrics_http), port


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
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


def _server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    key, cert = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()
    ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def _read_token(path: str) -> str:
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError(f"auth token file {path} is empty")
    return token
