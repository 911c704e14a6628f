"""A Python client for translator.v1: a deadline on every call, UNAVAILABLE and RESOURCE_EXHAUSTED
retried with backoff within it; and nmt-translate's / nmt-evaluate's backend for `--server`."""

from __future__ import annotations

import dataclasses
import os
import random
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from translator.decode_options import DecodeOptions
from translator.documents import DocumentLimits, DocumentResult, TranslatedSentence
from translator.glossary import Term
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc
from translator.translate import Translation, unchanged

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

T = TypeVar("T")

# DecodeOptions fields that the API's DecodingOptions carries under other names; always sent.
RENAMED_OPTIONS = {"beam_size": "beam_size", "n_best": "n_best", "max_len": "max_length", "min_len": "min_length",
                   "length_penalty": "length_penalty"}
# DecodeOptions fields that DecodingOptions carries by the same name: sent when they differ from the
# server's default (so that a server without them still takes requests that leave them alone).
SAME_NAME_OPTIONS = ("max_len_a", "max_len_b", "length_penalty_form", "length_includes_eos", "no_repeat_ngram",
                     "sample", "top_k", "top_p", "temperature", "seed")
# Refusals that a later try may not meet: the server starting, draining or restarting, or its queue full.
RETRIED_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class ClientTls:
    """PEM files: the CA that signed the server's certificate, and for mutual TLS the client's own."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""  # expected name in the server certificate, when it differs from the host


class TranslatorClient:
    """Calls a translation server. Every call gets `timeout` seconds unless given its own, retries
    included; calls refused with UNAVAILABLE (server starting, draining, restarting) or
    RESOURCE_EXHAUSTED (its queue full; not a message over the size limit, which stays so) are
    retried up to `retries` times with exponential backoff and jitter, while the deadline leaves
    room. Retrying is safe: translating has no side effects, and a stream is retried only before
    its first message. Other errors raise grpc.RpcError at once."""

    def __init__(
        self,
        target: str,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.2,
        token: str | None = None,
        tls: ClientTls | None = None,
        max_message_bytes: int = 16 << 20,
    ) -> None:
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", max_message_bytes)]
        if tls is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(tls.ca_file).read_bytes(),
                private_key=Path(tls.key_file).read_bytes() if tls.key_file else None,
                certificate_chain=Path(tls.cert_file).read_bytes() if tls.cert_file else None,
            )
            self.channel = grpc.secure_channel(target, creds, options=options)
        self.stub = pb_grpc.TranslatorStub(self.channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def translate(self, texts: list[str], timeout: float | None = None, request_id: str = "",
                  document: pb.DocumentOptions | None = None, model: str = "", source_language: str = "",
                  target_language: str = "", terms: Sequence[tuple[str, str]] = (),
                  **options: Any) -> pb.TranslateResponse:
        """Translate texts (documents, with `document`) with the model named, or the one for the
        language pair, or the server's default; options are DecodingOptions fields (beam_size=4,
        n_best=2, ...); terms: the glossary, (source phrase, target phrase) pairs."""
        request = pb.TranslateRequest(texts=texts, options=pb.DecodingOptions(**options), request_id=request_id,
                                      document=document, model=model, source_language=source_language,
                                      target_language=target_language,
                                      terms=[pb.Term(source=s, target=t) for s, t in terms])
        return self._retry(lambda left: self.stub.Translate(request, timeout=left, metadata=self.metadata),
                           timeout)

    def translate_text(self, texts: list[str], **options: Any) -> list[str]:
        """Best translation of each text."""
        return [t.hypotheses[0].text for t in self.translate(texts, **options).translations]

    def translate_stream(self, texts: list[str], timeout: float | None = None, request_id: str = "",
                         document: pb.DocumentOptions | None = None, model: str = "",
                         source_language: str = "", target_language: str = "",
                         terms: Sequence[tuple[str, str]] = (),
                         **options: Any) -> Iterator[pb.TranslateStreamResponse]:
        """Stream of partial and final results (model chosen as translate() says). Retried only
        until the first message arrives."""
        request = pb.TranslateRequest(texts=texts, options=pb.DecodingOptions(**options), request_id=request_id,
                                      document=document, model=model, source_language=source_language,
                                      target_language=target_language,
                                      terms=[pb.Term(source=s, target=t) for s, t in terms])

        def start(left: float) -> tuple[Any, pb.TranslateStreamResponse | None]:
            call = self.stub.TranslateStream(request, timeout=left, metadata=self.metadata)
            return call, next(call, None)

        call, first = self._retry(start, timeout)
        if first is None:
            return
        yield first
        yield from call

    def model_info(self, model: str = "") -> pb.ModelInfo:
        return self._retry(lambda left: self.stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=left,
                                                               metadata=self.metadata), None)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._retry(lambda left: self.stub.ListModels(pb.ListModelsRequest(), timeout=left,
                                                                   metadata=self.metadata), None).models)

    def _retry(self, call: Callable[[float], T], timeout: float | None) -> T:
        """call(seconds left before the deadline), retried as the class docstring says."""
        end = time.monotonic() + (timeout or self.timeout)
        for attempt in range(self.retries + 1):
            try:
                return call(max(0.0, end - time.monotonic()))
            except grpc.RpcError as e:
                if attempt == self.retries or not _retried(e):
                    raise
                # Full jitter: spread the retries of many clients after a restart.
                pause = random.uniform(0, self.backoff * 2**attempt)
                if time.monotonic() + pause >= end:
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")


def _retried(error: grpc.RpcError) -> bool:
    if error.code() not in RETRIED_CODES:
        return False
    # gRPC's own refusal of a message over the size limit is RESOURCE_EXHAUSTED too, and stays so.
    return "larger than max" not in (error.details() or "")


class ServerBackend:
    """nmt-translate's and nmt-evaluate's backend for `--server`: Translator.translate's interface
    over a TranslatorClient.

    Every DecodeOptions field but `alignment` goes over the wire (the server checks them as
    DecodeOptions does offline). Requests hold at most the server's max_sentences and run
    `parallel` at a time; blank lines come back unchanged, never sent.
    """

    def __init__(self, client: TranslatorClient, parallel: int = 4) -> None:
        self.client = client
        self.parallel = parallel
        try:
            self.info = client.model_info()
        except grpc.RpcError as e:
            raise ConnectionError(f"translation server: {e.code().name}: {e.details()}") from None
        self.limits = self.info.limits

    @classmethod
    def connect(cls, target: str, token: str | None = None, tls: ClientTls | None = None,
                timeout: float = 30.0, retries: int = 4) -> ServerBackend:
        """A backend for host:port; without a token, the bearer token (if the server wants one)
        comes from $NMT_AUTH_TOKEN."""
        token = token or os.environ.get("NMT_AUTH_TOKEN") or None
        return cls(TranslatorClient(target, timeout=timeout, retries=retries, token=token, tls=tls))

    def translate(
        self,
        texts: list[str],
        options: DecodeOptions | None = None,
        progress: Callable[[int], None] | None = None,
        target_prefix: str = "",
        glossary: Sequence[Term] = (),
    ) -> list[Translation]:
        request = self.request_options(options or DecodeOptions())
        terms = [(t.source, t.target) for t in glossary]
        if target_prefix:
            request["target_prefix"] = target_prefix

        def run(batch: list[str]) -> list[Translation]:
            out = [unchanged(text) for text in batch]
            todo = [i for i, text in enumerate(batch) if text.strip()]
            if todo:
                response = self.client.translate([batch[i] for i in todo], return_scores=True, terms=terms,
                                                 **request)
                for i, t in zip(todo, response.translations):
                    nbest = [Translation(h.text, [], h.score,
                                         unmet_terms=[Term(u.source, u.target) for u in h.unmet_terms])
                             for h in t.hypotheses]
                    out[i] = dataclasses.replace(nbest[0], nbest=nbest)
            if progress:
                progress(len(batch))
            return out

        chunk = self.limits.max_sentences
        try:
            with ThreadPoolExecutor(max_workers=self.parallel) as pool:
                batches = pool.map(run, [texts[i : i + chunk] for i in range(0, len(texts), chunk)])
                return [t for batch in batches for t in batch]
        except grpc.RpcError as e:  # an OSError, so that command-line callers report it plainly
            raise ConnectionError(f"translation server: {e.code().name}: {e.details()}") from None

    def translate_document(
        self, text: str, options: DecodeOptions | None = None, lang: str | None = None,
        limits: DocumentLimits | None = None, markup: bool = False,
    ) -> DocumentResult:
        """Translator.translate_document through the server, whose own limits apply (`limits` is
        taken for the same signature and not sent)."""
        request = self.request_options(options or DecodeOptions())
        document = pb.DocumentOptions(enabled=True, markup=markup, language=lang or "")
        try:
            response = self.client.translate([text], document=document, **request)
        except grpc.RpcError as e:
            raise ConnectionError(f"translation server: {e.code().name}: {e.details()}") from None
        doc = response.translations[0].document
        return DocumentResult(doc.text, tuple(
            TranslatedSentence((s.source_start, s.source_end), (s.target_start, s.target_end), s.text)
            for s in doc.sentences))

    def request_options(self, opts: DecodeOptions) -> dict[str, Any]:
        """DecodingOptions fields for opts; a ValueError names an option the API cannot carry."""
        default = DecodeOptions()
        for f in dataclasses.fields(DecodeOptions):
            carried = f.name in RENAMED_OPTIONS or f.name in SAME_NAME_OPTIONS
            if not carried and getattr(opts, f.name) != getattr(default, f.name):
                raise ValueError(f"{f.name} cannot be set through the server; its own setting applies")
        fields = {wire: getattr(opts, name) for name, wire in RENAMED_OPTIONS.items()}
        fields["max_length"] = min(opts.max_len, self.limits.max_length)
        for name in SAME_NAME_OPTIONS:
            value = getattr(opts, name)
            if value is not None and not _same(value, self._server_default(name)):
                fields[name] = value
        return fields

    def _server_default(self, name: str) -> Any:
        """The server's default for a DecodingOptions field; DecodeOptions' own where it does not say."""
        defaults = self.info.defaults
        return getattr(defaults, name) if defaults.HasField(name) else getattr(DecodeOptions(), name)


def _same(value: Any, other: Any) -> bool:
    """Equal as the wire carries them (floats as float32)."""
    if isinstance(value, float) and isinstance(other, (int, float)):
        try:
            return struct.pack("<f", value) == struct.pack("<f", other)
        except OverflowError:  # past float32's range: the wire cannot carry it either way
            return False
    return value == other


def backend_from_args(args: Any) -> ServerBackend:
    """The backend for the client flags of translator.cli.add_client_flags."""
    from translator.server_security import read_token

    if (args.tls_cert or args.tls_key or args.tls_server_name) and not args.tls_ca:
        raise ValueError("--tls-cert, --tls-key and --tls-server-name need --tls-ca")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key must be given together")
    if args.deadline <= 0:
        raise ValueError(f"--deadline must be > 0 seconds, got {args.deadline}")
    if args.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {args.retries}")
    tls = ClientTls(args.tls_ca, args.tls_cert or "", args.tls_key or "", args.tls_server_name or "") \
        if args.tls_ca else None
    token = read_token(args.token_file) if args.token_file else None
    return ServerBackend.connect(args.server, token=token, tls=tls, timeout=args.deadline, retries=args.retries)
