"""The gRPC adapter on grpc.aio: proto -> TranslationService call -> proto.

Errors become status codes in one place (`status_of`); every call leaves one structured log line
(logger "translator.server") and its metrics. The server around it is `translator.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.protobuf import unknown_fields

from translator.batcher import (
    Cancelled,
    DeadlineExceeded,
    DecodeFailed,
    EngineRestarted,
    QueueFull,
    ShuttingDown,
)
from translator.checkpoint import CheckpointError
from translator.config import ConfigError
from translator.document_requests import DocumentEvent, DocumentRequest, SentenceDone
from translator.documents import DocumentResult, TranslatedSentence
from translator.engine_process import EngineStartError
from translator.glossary import Term
from translator.metrics import Metrics
from translator.model_info import CheckpointOrigin, ModelIdentity, ModelInfo
from translator.models import ModelExists, Models, UnknownModel
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc
from translator.requests import InvalidArgument, RequestOptions, check_request_id
from translator.server_security import AccessDenied
from translator.service import Call, Candidate, TranslationService

log = logging.getLogger("translator.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Translator"].full_name  # translator.v1.Translator
# gRPC core's deadline timer and Python's clock disagree by a little; a cancel this close to the
# deadline is the deadline.
DEADLINE_SLACK_S = 0.05


# -- errors: the one place where outcomes become status codes --------------------------------

_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownModel, grpc.StatusCode.NOT_FOUND),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),  # a model to load, e.g. a bad name
    (ModelExists, grpc.StatusCode.ALREADY_EXISTS),
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),  # a model to load failed verification
    (EngineStartError, grpc.StatusCode.FAILED_PRECONDITION),
    (AccessDenied, grpc.StatusCode.UNAUTHENTICATED),  # the admin token
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (DecodeFailed, grpc.StatusCode.INTERNAL),
    (EngineRestarted, grpc.StatusCode.UNAVAILABLE),
)


def status_of(error: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
    """Status code and client-facing message; unexpected errors are logged, never sent as traces."""
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code, str(error)
    log.exception("request %s failed", json.dumps(request_id), exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log"


@dataclass
class _Rpc:
    id: str
    call: Call
    code: grpc.StatusCode = grpc.StatusCode.OK
    model: str = ""  # the name of the model that served it


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
    """Refuse malformed bytes, fields this server does not know (a newer client's options) and a
    request id that is too long or not printable."""
    if isinstance(request, _Malformed):
        raise InvalidArgument(request.message)
    check_request_id(getattr(request, "request_id", ""))
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


# Optional DecodingOptions fields that RequestOptions takes by the same name; floats among them
# come as the shortest decimal of their float32 (0.9, not 0.8999999762), as a client wrote them.
OPTIONAL_FIELDS = ("beam_size", "length_penalty", "max_length", "n_best", "min_length", "max_len_a", "max_len_b",
                   "length_penalty_form", "length_includes_eos", "no_repeat_ngram", "sample", "top_k", "top_p",
                   "temperature", "seed")


def _request_options(o: pb.DecodingOptions, terms: Sequence[Any] = ()) -> RequestOptions:
    def opt(name: str) -> Any:
        if not o.HasField(name):
            return None
        value = getattr(o, name)
        return _shortest_decimal(value) if isinstance(value, float) else value

    return RequestOptions(**{name: opt(name) for name in OPTIONAL_FIELDS}, return_scores=o.return_scores,
                          return_alignments=o.return_alignments, target_prefix=o.target_prefix,
                          terms=tuple(Term(t.source, t.target) for t in terms))


def _shortest_decimal(value: float) -> float:
    """The shortest decimal whose float32 is value's (a float field read from the wire)."""
    for digits in range(1, 10):
        decimal = float(f"{value:.{digits}g}")
        try:
            if struct.pack("<f", decimal) == struct.pack("<f", value):
                return decimal
        except OverflowError:  # rounded past float32's largest
            continue
    return value


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
        h.unmet_terms.extend(pb.Term(source=t.source, target=t.target) for t in c.unmet_terms)
    return out


def _document_request(request: pb.TranslateRequest) -> DocumentRequest | None:
    d = request.document
    if not d.enabled:
        if d.markup or d.language:
            raise InvalidArgument("document.markup and document.language need document.enabled")
        return None
    return DocumentRequest(markup=d.markup, language=d.language)


def _sentence(s: SentenceDone | TranslatedSentence) -> pb.DocumentSentence:
    out = pb.DocumentSentence(source_start=s.source[0], source_end=s.source[1], text=s.text)
    if s.target is not None:
        out.target_start, out.target_end = s.target
    return out


def _document_translation(doc: DocumentResult) -> pb.Translation:
    return pb.Translation(hypotheses=[pb.Hypothesis(text=doc.text)], document=pb.TranslatedDocument(
        text=doc.text, sentences=[_sentence(s) for s in doc.sentences]))


def _document_event(event: DocumentEvent, model: pb.ModelIdentity | None) -> pb.TranslateStreamResponse:
    msg = pb.TranslateStreamResponse(index=event.index, text=event.text, model=model)
    if event.sentence is not None:
        msg.sentence.CopyFrom(_sentence(event.sentence))
    if event.result is not None:
        msg.done = True
        msg.translation.CopyFrom(_document_translation(event.result))
    return msg


def _identity(ident: ModelIdentity) -> pb.ModelIdentity:
    return pb.ModelIdentity(name=ident.name, checkpoint_sha256=ident.checkpoint_sha256,
                            source_language=ident.source_language, target_language=ident.target_language)


def _model_info(info: ModelInfo) -> pb.ModelInfo:
    arch, lim, d = info.architecture, info.limits, info.defaults
    defaults = pb.DecodingOptions(
        beam_size=d.beam_size, max_length=min(d.max_len, info.max_length), n_best=d.n_best, min_length=d.min_len,
        length_penalty=d.length_penalty, max_len_a=d.max_len_a, max_len_b=d.max_len_b,
        length_penalty_form=d.length_penalty_form, length_includes_eos=d.length_includes_eos,
        no_repeat_ngram=d.no_repeat_ngram, sample=d.sample, top_k=d.top_k, top_p=d.top_p,
        temperature=d.temperature, seed=d.seed)
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
                         max_request_cost=lim.max_request_cost, max_document_chars=lim.max_document_chars,
                         max_document_sentences=lim.max_document_sentences, max_terms=lim.max_terms,
                         max_term_chars=lim.max_term_chars),
        defaults=defaults,
        metrics=info.metrics,
        provenance=_provenance(info.origin) if info.origin else None,
    )


def _provenance(origin: CheckpointOrigin) -> pb.Provenance:
    p = origin.provenance
    out = pb.Provenance(
        weights_sha256=origin.weights_sha256, verified=origin.verified, created=p.created,
        training_config_json=json.dumps(origin.training_config, sort_keys=True), code_commit=p.code_commit or "",
        versions=p.versions, corpus=p.corpus, corpus_sha256=p.corpus_sha256 or "",
        averaged_from=list(p.averaged_from),
        test_scores=[pb.TestScore(test=s.test, bleu=s.bleu, chrf=s.chrf, beam_size=s.beam_size,
                                  bleu_signature=s.bleu_signature, date=s.date) for s in p.test_scores],
    )
    for name in ("step", "code_dirty", "valid_bleu"):  # proto3 optionals: unset when not recorded
        if getattr(p, name) is not None:
            setattr(out, name, getattr(p, name))
    return out


# -- the servicer -----------------------------------------------------------------------------


class TranslatorServicer(pb_grpc.TranslatorServicer):
    """translator.v1.Translator over the served Models, on grpc.aio; one structured log line per
    call. Lives on the server's event loop: a cancelled handler task (the client left, its deadline
    passed) cancels the request inside the service. A request holds the model it was routed to
    until it ends, so a swap never moves it to other weights mid-way."""

    def __init__(self, models: Models, metrics: Metrics | None = None) -> None:
        self.models = models
        self.metrics = metrics or Metrics()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def Translate(self, request: pb.TranslateRequest,
                        context: grpc.aio.ServicerContext) -> pb.TranslateResponse:
        async with self._rpc("Translate", request, context) as rpc:
            check_request(request)
            with self._checkout(request, rpc) as service:
                if document := _document_request(request):
                    docs = await service.translate_documents_async(
                        list(request.texts), _request_options(request.options, request.terms), document, rpc.call)
                    return pb.TranslateResponse(translations=[_document_translation(d) for d in docs],
                                                model=_identity(service.identity))
                results = await service.translate_async(list(request.texts), _request_options(request.options, request.terms),
                                                        rpc.call)
                scores = request.options.return_scores
                return pb.TranslateResponse(translations=[_translation(r, scores) for r in results],
                                            model=_identity(service.identity))

    async def TranslateStream(self, request: pb.TranslateRequest,
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TranslateStreamResponse]:
        async with self._rpc("TranslateStream", request, context) as rpc:
            check_request(request)
            options = _request_options(request.options, request.terms)
            with self._checkout(request, rpc) as service:
                if document := _document_request(request):
                    stream = service.translate_documents_stream_async(list(request.texts), options, document,
                                                                      rpc.call)
                    async with contextlib.aclosing(stream):
                        first: pb.ModelIdentity | None = _identity(service.identity)
                        async for event in stream:
                            yield _document_event(event, first)
                            first = None
                    return
                events = service.translate_stream_async(list(request.texts), options, rpc.call)
                async with contextlib.aclosing(events):
                    model: pb.ModelIdentity | None = _identity(service.identity)
                    async for ev in events:
                        msg = pb.TranslateStreamResponse(index=ev.index, text=ev.text, model=model)
                        if ev.result is not None:
                            msg.done = True
                            msg.translation.CopyFrom(_translation(ev.result, request.options.return_scores))
                        model = None
                        yield msg

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async with self._rpc("GetModelInfo", request, context) as rpc:
            check_request(request)
            service = self.models.route(request.model)
            rpc.model = service.identity.name
            return _model_info(service.info)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async with self._rpc("ListModels", request, context):
            check_request(request)
            return pb.ListModelsResponse(models=[_model_info(info) for info in self.models.infos()])

    @contextlib.contextmanager
    def _checkout(self, request: pb.TranslateRequest, rpc: _Rpc) -> Iterator[TranslationService]:
        with self.models.checkout(request.model, request.source_language, request.target_language) as service:
            rpc.model = service.identity.name
            yield service

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no call of this servicer is running; True if none is."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[_Rpc]:
        given = getattr(request, "request_id", "")
        try:
            check_request_id(given)
        except InvalidArgument:
            given = ""  # refused in check_request; the log names the call by an id of its own
        rpc = _Rpc(given or uuid.uuid4().hex[:16], Call(deadline=_deadline(context)))
        self._begin(context)
        start = time.perf_counter()
        try:
            yield rpc
        except (asyncio.CancelledError, GeneratorExit):
            # gRPC cancelled the handler (the client left, or its deadline passed) or closed the
            # stream's generator; the service's own cleanup has cancelled the request.
            rpc.code = grpc.StatusCode.DEADLINE_EXCEEDED if _past_deadline(context) else grpc.StatusCode.CANCELLED
            raise
        except Exception as e:  # noqa: BLE001 - every error leaves through status_of
            if isinstance(e, Cancelled) and _past_deadline(context):
                e = DeadlineExceeded("deadline exceeded")
            rpc.code, message = status_of(e, rpc.id)
            await context.abort(rpc.code, message)
        finally:
            self._log(method, rpc, time.perf_counter() - start)

    def _begin(self, context: grpc.aio.ServicerContext) -> None:
        """Count the call as in flight until gRPC has sent its status (what drain waits for)."""
        self._in_flight += 1
        self._idle.clear()
        context.add_done_callback(self._end)

    def _end(self, context: grpc.aio.ServicerContext) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    def _log(self, method: str, rpc: _Rpc, seconds: float) -> None:
        s = rpc.call
        self.metrics.record(method, rpc.code.name, seconds, s.sentences, s.queue_ms, s.decode_ms, rpc.model)
        log.info(json.dumps({
            "event": "rpc", "id": rpc.id, "method": method, "status": rpc.code.name, "model": rpc.model,
            "sentences": s.sentences, "src_tokens": s.src_tokens, "queue_ms": round(s.queue_ms, 2),
            "decode_ms": round(s.decode_ms, 2), "steps": s.steps, "total_ms": round(seconds * 1000.0, 2),
        }))


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _past_deadline(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining < DEADLINE_SLACK_S


def generic_handler(servicer: TranslatorServicer) -> grpc.GenericRpcHandler:
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
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, _parser(pb.ListModelsRequest), pb.ListModelsResponse.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
