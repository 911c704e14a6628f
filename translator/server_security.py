"""Who may call the server: TLS / mutual TLS credentials and bearer-token auth (health is exempt)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health

from translator.config import ConfigError

HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"


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


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    key, cert = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()
    ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


class AccessDenied(Exception):
    """A call lacks the token its method needs (the admin token)."""


def read_token(path: str) -> str:
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError(f"auth token file {path} is empty")
    return token


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Calls must carry `authorization: Bearer <token>`; health checks are exempt, and the methods
    under the `exempt` prefixes (the admin service, which checks a token of its own)."""

    def __init__(self, token: str, exempt: tuple[str, ...] = ()) -> None:
        self._expected = f"Bearer {token}".encode()
        self._exempt = (HEALTH_PREFIX, *exempt)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._exempt):
            return handler
        given = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization'")

    if handler.response_streaming:
        make = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler)
    else:
        make = (grpc.stream_unary_rpc_method_handler if handler.request_streaming
                else grpc.unary_unary_rpc_method_handler)
    return make(refuse, handler.request_deserializer, handler.response_serializer)
