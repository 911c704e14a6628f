"""The gRPC adapter of the Admin service: load, reload (swap) and unload models (translator.models).

Registered only when the server has an admin token file; every call needs `authorization: Bearer
<admin token>` (the server's ordinary token, if any, does not open it). Loading a checkpoint reads
and verifies it on a thread started for that load alone, which ends with it: torch work on a
long-lived second thread would leave the process a second OpenMP team (translator.batcher).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from translator.models import Models, ModelSpec, load_priority
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.server_security import AccessDenied
from translator.servicer import _model_info, _parser, check_request, status_of

log = logging.getLogger("translator.server")
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name  # translator.v1.Admin
T = TypeVar("T")


class AdminServicer:
    def __init__(self, models: Models, token: str) -> None:
        self.models = models
        self._expected = f"Bearer {token}".encode()

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        def load() -> pb.ModelInfo:
            spec = ModelSpec(request.name, request.checkpoint, request.source_language, request.target_language)
            return _model_info(self.models.load(spec))

        return await self._call("LoadModel", request, context, load)

    async def ReloadModel(self, request: pb.ReloadModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return await self._call("ReloadModel", request, context,
                                lambda: _model_info(self.models.reload(request.name, request.checkpoint)))

    async def UnloadModel(self, request: pb.UnloadModelRequest,
                          context: grpc.aio.ServicerContext) -> pb.UnloadModelResponse:
        def unload() -> pb.UnloadModelResponse:
            self.models.unload(request.name)
            return pb.UnloadModelResponse()

        return await self._call("UnloadModel", request, context, unload)

    async def _call(self, method: str, request: Any, context: grpc.aio.ServicerContext, work: Callable[[], T]) -> T:
        """Check the token and the request, run work on a fresh thread; one log line, errors
        through status_of."""
        start, code, name = time.perf_counter(), grpc.StatusCode.OK, getattr(request, "name", "")
        try:
            given = dict(context.invocation_metadata()).get("authorization", "")
            if not hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
                raise AccessDenied("missing or wrong admin bearer token in 'authorization'")
            check_request(request)
            # Only a load that decodes on this process's engine yields the cores: an engine process
            # started by the loading thread would keep its priority for life (and an unprivileged
            # process cannot take a lowered one back), starved wherever other work fills the cores.
            return await asyncio.to_thread(_on_fresh_thread, work, self.models.engine is not None)
        except Exception as e:  # noqa: BLE001 - every error leaves through status_of
            code, message = status_of(e, f"{method}:{name}")
            await context.abort(code, message)
        finally:
            log.info(json.dumps({"event": "admin", "method": method, "model": name, "status": code.name,
                                 "total_ms": round((time.perf_counter() - start) * 1000.0, 2)}))


def _on_fresh_thread(work: Callable[[], T], low_priority: bool) -> T:
    """work() on a thread of its own, which ends with it (at the lowest CPU priority with
    low_priority); its result or its error."""
    out: list[Any] = []

    def run() -> None:
        try:
            if low_priority:
                load_priority()
            out.append((True, work()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out.append((False, e))

    thread = threading.Thread(target=run, name="model-load")
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def admin_handler(servicer: AdminServicer) -> grpc.GenericRpcHandler:
    handlers = {
        "LoadModel": grpc.unary_unary_rpc_method_handler(
            servicer.LoadModel, _parser(pb.LoadModelRequest), pb.ModelInfo.SerializeToString),
        "ReloadModel": grpc.unary_unary_rpc_method_handler(
            servicer.ReloadModel, _parser(pb.ReloadModelRequest), pb.ModelInfo.SerializeToString),
        "UnloadModel": grpc.unary_unary_rpc_method_handler(
            servicer.UnloadModel, _parser(pb.UnloadModelRequest), pb.UnloadModelResponse.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(ADMIN_SERVICE_NAME, handlers)
