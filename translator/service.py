"""The translation service: requests checked, queued and decoded in batches through one Translator.

Everything a server does except speak gRPC: `translator.server` is a thin adapter over this.
Requests are checked against the limits before any work is queued (translator.requests,
translator.request_options, translator.preparation); errors are `InvalidArgument` (naming the
field) or the batcher's `QueueFull`, `Cancelled`, `DeadlineExceeded`, `ShuttingDown`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from translator import handover
from translator.batcher import Batcher, BatcherConfig, Job, RunningBatch
from translator.checkpoint import Checkpoint, load_checkpoint, load_checkpoint_metadata
from translator.config import ConfigError
from translator.decoding import DecodeOptions
from translator.document_requests import (
    DocumentEvent,
    DocumentRequest,
    DocumentStream,
    PieceTranslation,
    SplitDocuments,
    piece_translations,
)
from translator.documents import DocumentResult
from translator.engine_process import EnginePool, EngineSpec, RemoteBatcher, engine_batcher
from translator.glossary import Term
from translator.hypotheses import Hypothesis
from translator.model import EncoderDecoder, build_model
from translator.model_info import CheckpointOrigin, ModelIdentity, ModelInfo
from translator.preparation import Forced, Prepared, Preparer
from translator.requests import Limits, RequestOptions
from translator.shared_engine import Lane, SharedEngine
from translator.translate import Translator, aligned_translation, passed_through


@dataclass(frozen=True)
class Alignment:
    source_tokens: list[str]
    target_tokens: list[str]
    weights: list[list[float]]  # (target, source); each row sums to 1


@dataclass(frozen=True)
class Candidate:
    text: str
    score: float
    alignment: Alignment | None = None
    unmet_terms: tuple[Term, ...] = ()  # glossary terms of its text whose target it lacks


@dataclass(frozen=True)
class StreamEvent:
    """Text newly final for sentence `index`; `result` (n-best, best first) once it is done."""

    index: int
    text: str
    result: list[Candidate] | None = None


@dataclass
class Call:
    """One request's deadline and its sizes and timings, filled in as far as it got, for the request
    log and metrics. (Cancelling: Job.cancel, or cancelling the task of an async call.)"""

    deadline: float | None = None  # a time.monotonic() value
    sentences: int = 0
    src_tokens: int = 0
    queue_ms: float = 0.0
    decode_ms: float = 0.0
    steps: int = 0



class TranslationService:
    """Checks, queues and decodes translation requests with one model; thread-safe."""

    def __init__(
        self,
        translator: Translator,
        identity: ModelIdentity,
        limits: Limits | None = None,
        batching: BatcherConfig | None = None,
        checkpoint_config: dict[str, Any] | None = None,
        checkpoint_metrics: dict[str, Any] | None = None,
        threads: int = 0,
        engine_thread: bool = True,
        engine_process: EngineSpec | None = None,
        origin: CheckpointOrigin | None = None,
        engine: SharedEngine | None = None,
    ) -> None:
        """threads: intra-op threads of the decoding engine; 0 = torch's default. engine_thread:
        decode on a thread of the service's own; False: the caller runs `run_engine()` (best on
        the thread that loaded the model: see translator.batcher). engine_process: decode in a
        process of its own started from this spec instead (translator.engine_process); the
        service then only checks, tokenizes and detokenizes. engine: decode on this engine, shared
        with other models (translator.shared_engine), instead of one of the service's own."""
        if threads < 0:
            raise ConfigError(f"threads must be >= 0, got {threads}")
        self.translator = translator
        self.tokenizer = translator.tokenizer
        self.identity = identity
        self.limits = limits or Limits()
        batching = batching or BatcherConfig()
        _check_queue(batching, self.limits)
        self.requests = Preparer(translator, self.limits, identity.source_language)
        self.info = ModelInfo(
            identity=identity,
            vocabulary_size=self.tokenizer.vocab_size,
            preset=str((checkpoint_config or {}).get("preset", "")),
            tokenizer_sha256=self.tokenizer.sha256,
            architecture=translator.model.cfg,
            limits=self.limits,
            max_source_tokens=translator.max_source_tokens,
            max_length=self.requests.max_length,
            defaults=translator.options,
            metrics={k: float(v) for k, v in (checkpoint_metrics or {}).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)},
            origin=origin,
        )
        self.batcher: Batcher | RemoteBatcher | EnginePool | Lane
        if engine is not None:
            self.batcher = engine.lane(self._decode)
        elif engine_process is not None:
            self.batcher = engine_batcher(engine_process)
        else:
            self.batcher = Batcher(self._decode, batching,
                                   (lambda: torch.set_num_threads(threads)) if threads else None, thread=engine_thread)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        limits: Limits | None = None,
        batching: BatcherConfig | None = None,
        defaults: DecodeOptions | None = None,
        threads: int = 0,
        engine_thread: bool = True,
        engine_process: bool = False,
        engine: SharedEngine | None = None,
        name: str = "",
        engine_processes: int = 1,
        languages: tuple[str, str] = ("", ""),
    ) -> TranslationService:
        """Load the checkpoint (weights-only unpickling, verified: CheckpointError) and build the
        service around it; with engine, it decodes on that shared engine. With engine_process, an
        engine process (engine_processes of them, translator.engine_process.EnginePool) loads the
        weights and decodes, and this one reads only the config and the tokenizer: its model is
        the architecture on the meta device, with no weights in memory.
        name: the model's name (default: the file's); languages: (source, target) to serve it as,
        each where the checkpoint's record is to be replaced."""
        path = Path(path)
        ckpt, model = _load(path, engine_process)
        data = ckpt.config.get("data", {})
        identity = ModelIdentity(name or path.name, _file_sha256(path), languages[0] or data.get("src_lang", ""),
                                 languages[1] or data.get("tgt_lang", ""))
        # The front end of an engine process decodes nothing: no kernels, no packed weights.
        translator = Translator(model, ckpt.tokenizer, defaults, backend="torch" if engine_process else "native")
        spec = EngineSpec(str(path), batching or BatcherConfig(), limits or Limits(), defaults, threads,
                          processes=engine_processes)
        origin = CheckpointOrigin(ckpt.weights_sha256, ckpt.verified, ckpt.provenance, ckpt.config)
        return cls(translator, identity, limits, batching, ckpt.config, ckpt.metrics, threads, engine_thread,
                   spec if engine_process else None, origin, None if engine_process else engine)

    # -- requests: awaited on an event loop, so no thread waits; a cancelled task (the caller
    # left, its deadline passed) cancels the request -----------------------------------------

    async def translate_async(
        self, texts: Sequence[str], options: RequestOptions, call: Call | None = None
    ) -> list[list[Candidate]]:
        """n-best candidates per text, in order; a content-free text comes back unchanged, alone."""
        call = call or Call()
        prepared = self.requests.sentences(texts, options)
        out = [[Candidate(text, 0.0)] for text in prepared.texts]
        for k, r in enumerate(await self._decode_all(prepared, call)):
            out[prepared.decoded[k]] = self._candidates(prepared, k, r)
        return out

    async def _decode_all(self, prepared: Prepared, call: Call) -> list[list[Hypothesis]]:
        """The n-best hypotheses of each of the prepared sources, decoded as one job."""
        if not prepared.sources:
            return []
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def listener(event: tuple[str, int, Any]) -> None:  # on the decoding thread
            if event[0] == "end":
                _call_soon(loop, _settle, ended)

        job = self._submit(prepared, call, stream=False, listener=listener)
        try:
            await ended
            return job.wait()  # at once: the job has ended
        finally:
            job.cancel()  # a no-op once finished; stops decoding if the task was cancelled
            _record(call, job)

    def translate_stream_async(
        self, texts: Sequence[str], options: RequestOptions, call: Call | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Text of each sentence as it becomes final, then its candidates once it is done. Checks
        and queues the request before returning, so errors raise here, not mid-stream."""
        call = call or Call()
        prepared = self.requests.sentences(texts, options)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
        job = None
        if prepared.sources:
            job = self._submit(prepared, call, stream=True,
                               listener=lambda event: _call_soon(loop, events.put_nowait, event))
        return self._stream_async(prepared, job, call, events)

    async def _stream_async(self, prepared: Prepared, job: Job | None, call: Call,
                            events: asyncio.Queue) -> AsyncIterator[StreamEvent]:
        decoded = set(prepared.decoded)
        text = _StreamedText(self, prepared)
        try:
            for i, unchanged in enumerate(prepared.texts):  # content-free texts: done at once
                if i not in decoded:
                    yield StreamEvent(i, unchanged, [Candidate(unchanged, 0.0)])
            while job is not None:
                kind, i, value = await events.get()
                if kind == "end":
                    job.wait()  # at once; raises the job's error, if it failed
                    return
                if event := text.event(kind, i, value):
                    yield dataclasses.replace(event, index=prepared.decoded[i])
        finally:
            if job is not None:
                job.cancel()
                _record(call, job)

    # -- documents: split into sentences, decoded as one job among other requests' sentences,
    # put back together (translator.document_requests) -------------------------------------------

    async def translate_documents_async(
        self, texts: Sequence[str], options: RequestOptions, document: DocumentRequest, call: Call | None = None
    ) -> list[DocumentResult]:
        """Each text translated as a document, its layout (and markup) kept."""
        call = call or Call()
        split, prepared = self.requests.documents(texts, options, document)
        raw = await self._decode_all(prepared, call)
        decoded = [self._piece(prepared, document, k, nbest) for k, nbest in enumerate(raw)]
        return split.results(piece_translations(prepared.texts, prepared.decoded, decoded, self._passed(document)))

    def translate_documents_stream_async(
        self, texts: Sequence[str], options: RequestOptions, document: DocumentRequest, call: Call | None = None
    ) -> AsyncIterator[DocumentEvent]:
        """Each document's sentences as they become final, in document order, then the whole
        document. Checks and queues the request before returning, so errors raise here."""
        call = call or Call()
        split, prepared = self.requests.documents(texts, options, document)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
        job = None
        if prepared.sources:
            job = self._submit(prepared, call, stream=False,
                               listener=lambda event: _call_soon(loop, events.put_nowait, event))
        return self._document_stream_async(split, prepared, document, job, call, events)

    async def _document_stream_async(self, split: SplitDocuments, prepared: Prepared, document: DocumentRequest,
                                     job: Job | None, call: Call, events: asyncio.Queue) -> AsyncIterator[DocumentEvent]:
        stream = DocumentStream(split, piece_translations(prepared.texts, prepared.decoded,
                                                          [None] * len(prepared.decoded), self._passed(document)))
        try:
            for event in stream.ready():  # documents with no sentence to decode: done at once
                yield event
            while job is not None:
                kind, k, value = await events.get()
                if kind == "end":
                    job.wait()  # at once; raises the job's error, if it failed
                    return
                for event in stream.add(prepared.decoded[k], self._piece(prepared, document, k, value)):
                    yield event
        finally:
            if job is not None:
                job.cancel()
                _record(call, job)

    def _piece(self, prepared: Prepared, document: DocumentRequest, k: int, nbest: list[Hypothesis]) -> PieceTranslation:
        """The translation of source k (a piece of the documents) from its n-best."""
        best, source = nbest[0], prepared.texts[prepared.decoded[k]]
        aligned = aligned_translation(self.tokenizer, source, best.tokens, best.alignment) if document.markup else None
        return PieceTranslation(self.tokenizer.decode([best.tokens])[0], aligned)

    def _passed(self, document: DocumentRequest) -> Callable[[str], PieceTranslation]:
        """A content-free piece's translation: itself."""
        return lambda source: PieceTranslation(
            source, passed_through(self.tokenizer, source) if document.markup else None)

    def _submit(self, prepared: Prepared, call: Call, stream: bool,
                listener: Callable[[tuple[str, int, Any]], None] | None = None) -> Job:
        call.sentences = len(prepared.sources)
        call.src_tokens = sum(len(s) for s in prepared.sources)
        job = Job(prepared.sources, prepared.batch_key(), cost=prepared.options.beam_size,
                  deadline=call.deadline, stream=stream, listener=listener)
        return self.batcher.submit(job)

    def _decode(self, batch: RunningBatch, key: DecodeOptions | Forced) -> Generator[None, None, list[Any]]:
        """The batcher's decode function: one search over the batch, a step at a time, split per
        sentence, through the Translator as offline (queued sentences join it between steps where
        they can)."""
        if isinstance(key, Forced):
            steps = self.translator.decode_steps(batch.sources, key.options, key.prefix, key.required(batch.sources),
                                                 batch)
        else:
            steps = self.translator.decode_steps(batch.sources, key, batch=batch)
        hyps = yield from steps
        return hyps.nbest

    def _candidates(self, prepared: Prepared, i: int, nbest: list[Hypothesis]) -> list[Candidate]:
        """Detokenized n-best of sentence i; alignments over its source pieces (EOS last)."""
        req = prepared.request
        texts = self.tokenizer.decode([h.tokens for h in nbest])
        out = []
        for text, h in zip(texts, nbest):
            alignment = None
            if req.return_alignments and h.alignment is not None:
                alignment = Alignment(self.tokenizer.pieces(prepared.sources[i]),
                                      self.tokenizer.pieces(h.tokens), h.alignment.tolist())
            unmet = tuple(prepared.terms[i][j] for j in h.unmet) if prepared.terms else ()
            out.append(Candidate(text, h.score if req.return_scores else 0.0, alignment, unmet))
        return out

    # -- lifecycle --------------------------------------------------------------------------

    def run_engine(self) -> None:
        """Decode on this thread until stop() (for a service made with engine_thread=False)."""
        self.batcher.run()

    def close(self) -> None:
        """Refuse new requests (ShuttingDown); admitted ones still finish."""
        self.batcher.close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self.batcher.wait_idle(timeout)

    def stop(self) -> None:
        self.batcher.stop()


class _StreamedText:
    """A streaming job's events as text: what became final of a sentence since it was last sent."""

    def __init__(self, service: TranslationService, prepared: Prepared) -> None:
        self.service = service
        self.prepared = prepared
        self.sent = [""] * len(prepared.sources)  # text streamed so far per sentence
        self.seen = [0] * len(prepared.sources)  # prefix length it was decoded from

    def event(self, kind: str, i: int, value: Any) -> StreamEvent | None:
        if kind == "prefix":
            if len(value) <= self.seen[i]:
                return None
            self.seen[i] = len(value)
            text = self.service.tokenizer.decode([value])[0]
            if not (text.startswith(self.sent[i]) and len(text) > len(self.sent[i])):
                return None
            new, self.sent[i] = text[len(self.sent[i]):], text
            return StreamEvent(i, new)
        result = self.service._candidates(self.prepared, i, value)
        best = result[0].text
        return StreamEvent(i, best[len(self.sent[i]):] if best.startswith(self.sent[i]) else "", result)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """fn(*args) on loop's thread, from any thread, in the order posted; dropped once the loop has
    closed."""
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = LoopMailbox(loop)
    box.post(fn, *args)


class LoopMailbox:
    """Calls posted to an event loop from other threads, run on the loop in order, with one
    wake-up of the loop for all the calls posted before it gets to run them.

    `loop.call_soon_threadsafe` writes to the loop's wake-up socket at every call: the engine
    thread, handing over each finished sentence (and each streamed prefix) one by one, made a
    system call and a wake-up of the loop thread per sentence, and a wake-up can take a core from
    the engine's threads mid-step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # weak: the mailbox is the value of a weak map keyed by its loop
        self._lock = threading.Lock()
        self._calls: deque[tuple[Callable[..., Any], tuple]] = deque()
        self._due = False  # a run is scheduled on the loop and has not yet taken the calls
        self.wakeups = 0

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            self._calls.append((fn, args))
            if self._due:
                return
            self._due = True
            self.wakeups += 1
        handover.wake(self._wake)  # from the decoding thread: while its next step runs natively

    def _wake(self) -> None:
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop has closed: nothing will run them
            with self._lock:
                self._calls.clear()
                self._due = False

    def _run(self) -> None:
        with self._lock:
            calls, self._calls, self._due = self._calls, deque(), False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - one failing call must not drop the others
                asyncio.get_running_loop().call_exception_handler({"message": f"posted call {fn!r} failed", "exception": e})


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _record(call: Call, job: Job) -> None:
    call.queue_ms, call.decode_ms, call.steps = job.stats.queue_ms, job.stats.decode_ms, job.stats.steps


def _check_queue(batching: BatcherConfig, limits: Limits) -> None:
    """The admission queue takes the largest request the limits allow."""
    for name, most, what in (("max_sentences", limits.max_sentences, "requests"),
                             ("max_document_sentences", limits.max_document_sentences, "documents")):
        if batching.max_queue_sentences < most:
            raise ConfigError(f"batching.max_queue_sentences ({batching.max_queue_sentences}) must be >= "
                              f"limits.{name} ({most}) or full {what} never fit")


def _load(path: Path, engine_process: bool) -> tuple[Checkpoint, EncoderDecoder]:
    """The checkpoint and its model; for the front end of an engine process, which decodes nothing,
    only the checkpoint's config and tokenizer, and the architecture on the meta device."""
    if not engine_process:
        ckpt = load_checkpoint(path)
        return ckpt, ckpt.build_model()
    ckpt = load_checkpoint_metadata(path)
    with torch.device("meta"):
        return ckpt, build_model(ckpt.model_config).eval()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
