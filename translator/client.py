"""A Python client for translator.v1: a default deadline on every call, UNAVAILABLE retried with backoff."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from translator.decode_options import DecodeOptions
from translator.proto.translator.v1 import translator_pb2 as pb
from translator.proto.translator.v1 import translator_pb2_grpc as pb_grpc
from translator.translate import Translation

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

T = TypeVar("T")

# DecodeOptions fields that the API's DecodingOptions carries.
SENT_OPTIONS = ("beam_size", "n_best", "max_len", "min_len", "length_penalty")


@dataclass(frozen=True)
class ClientTls:
    """PEM files: the CA that signed the server's certificate, and for mutual TLS the client's own."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""  # expected name in the server certificate, when it differs from the host


class TranslatorClient:
    """Calls a translation server. Every call gets `timeout` seconds unless given its own; calls that
    fail with UNAVAILABLE (server starting, draining, restarting) are retried `retries` times with
    exponential backoff and jitter. Other errors raise grpc.RpcError at once."""

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
                  **options: Any) -> pb.TranslateResponse:
        """Translate texts; options are DecodingOptions fields (beam_size=4, n_best=2, ...)."""
        request = pb.TranslateRequest(texts=texts, options=pb.DecodingOptions(**options),
                                      request_id=request_id)
        return self._retry(lambda: self.stub.Translate(request, timeout=timeout or self.timeout,
                                                       metadata=self.metadata))

    def translate_text(self, texts: list[str], **options: Any) -> list[str]:
        """Best translation of each text."""
        return [t.hypotheses[0].text for t in self.translate(texts, **options).translations]

    def translate_stream(self, texts: list[str], timeout: float | None = None,
                         **options: Any) -> Iterator[pb.TranslateStreamResponse]:
        """Stream of partial and final results. Retried only until the first message arrives."""
        request = pb.TranslateRequest(texts=texts, options=pb.DecodingOptions(**options))

        def start() -> tuple[Any, pb.TranslateStreamResponse | None]:
            call = self.stub.TranslateStream(request, timeout=timeout or self.timeout, metadata=self.metadata)
            return call, next(call, None)

        call, first = self._retry(start)
        if first is None:
            return
        yield first
        yield from call

    def model_info(self) -> pb.ModelInfo:
        return self._retry(lambda: self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout,
                                                          metadata=self.metadata))

    def _retry(self, call: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise
                # Full jitter: spread the retries of many clients after a restart.
                time.sleep(random.uniform(0, self.backoff * 2**attempt))
        raise AssertionError("unreachable")


class ServerBackend:
    """nmt-translate's backend for `--server`: Translator.translate's interface over a TranslatorClient.

    Sends the options the API carries (beam size, n-best, lengths, length penalty); the server
    decides the rest, so other options must keep DecodeOptions' defaults. Requests hold at most the
    server's max_sentences and run `parallel` at a time; blank lines are never sent.
    """

    def __init__(self, client: TranslatorClient, parallel: int = 4) -> None:
        self.client = client
        self.parallel = parallel
        try:
            self.limits = client.model_info().limits
        except grpc.RpcError as e:
            raise ConnectionError(f"translation server: {e.code().name}: {e.details()}") from None

    @classmethod
    def connect(cls, target: str) -> ServerBackend:
        """A backend for host:port; the bearer token, if the server wants one, comes from $NMT_AUTH_TOKEN."""
        return cls(TranslatorClient(target, token=os.environ.get("NMT_AUTH_TOKEN") or None))

    def translate(
        self,
        texts: list[str],
        options: DecodeOptions | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Translation]:
        request = self.request_options(options or DecodeOptions())

        def run(batch: list[str]) -> list[Translation]:
            out = [Translation("", [], 0.0)] * len(batch)
            todo = [i for i, text in enumerate(batch) if text.strip()]
            if todo:
                response = self.client.translate([batch[i] for i in todo], return_scores=True, **request)
                for i, t in zip(todo, response.translations):
                    nbest = [Translation(h.text, [], h.score) for h in t.hypotheses]
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

    def request_options(self, opts: DecodeOptions) -> dict[str, Any]:
        """DecodingOptions fields for opts; a ValueError names an option the API cannot carry."""
        default = DecodeOptions()
        for f in dataclasses.fields(DecodeOptions):
            if f.name not in SENT_OPTIONS and getattr(opts, f.name) != getattr(default, f.name):
                raise ValueError(f"{f.name} cannot be set through the server; its own setting applies")
        return {"beam_size": opts.beam_size, "n_best": opts.n_best, "min_length": opts.min_len,
                "max_length": min(opts.max_len, self.limits.max_length),
                "length_penalty": opts.length_penalty}

