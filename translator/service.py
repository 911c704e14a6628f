"""The translation service: request limits, tokenization and dynamic batching around one Translator.

Everything a server does except speak gRPC: `translator.server` is a thin adapter over this.
Requests are checked against the limits before any work is queued; errors are `InvalidArgument`
(naming the field) or the batcher's `QueueFull`, `Cancelled`, `DeadlineExceeded`, `ShuttingDown`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import re
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from translator.batcher import Batcher, BatcherConfig, Job, RunningBatch
from translator.checkpoint import load_checkpoint, load_checkpoint_metadata
from translator.config import ConfigError
from translator.decoding import DecodeOptions
from translator.document_requests import (
    DocumentEvent,
    DocumentRequest,
    DocumentStream,
    PieceTranslation,
    SplitDocuments,
    check_language,
    piece_translations,
    split_documents,
)
from translator.documents import DocumentLimitError, DocumentResult
from translator.engine_process import EngineSpec, RemoteBatcher
from translator.glossary import GlossaryError, GlossaryLimits, Term
from translator.hypotheses import Hypothesis
from translator.length import output_budgets
from translator.model import ModelConfig, build_model
from translator.provenance import Provenance
from translator.shared_engine import Lane, SharedEngine
from translator.translate import Translator, aligned_translation, passed_through

# C0/C1 control characters other than tab, newline and carriage return, and lone surrogates.
FORBIDDEN_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
MAX_REQUEST_ID_CHARS = 128
# RequestOptions fields that replace the DecodeOptions field of the same name as they are.
PASSED_OPTIONS = ("max_len_a", "max_len_b", "length_penalty_form", "length_includes_eos", "no_repeat_ngram",
                  "sample", "top_k", "top_p", "temperature", "seed")


class InvalidArgument(ValueError):
    """A request field is out of its limits or malformed; the message names the field."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the model's positions cap source and output lengths further."""

    max_sentences: int = 64
    max_sentence_chars: int = 2000
    max_beam_size: int = 16
    max_length: int = 256
    max_message_bytes: int = 1 << 20
    # The decoding work one request may ask for, summed over its sentences: source tokens x beam
    # size x output budget (steps). 16 sentences of 1,000 characters at beam 16 with a 255-token
    # minimum come to ~16 million and held a decoder for 33 s; 64 sentences of 100 tokens at beam 5
    # to 5 million.
    max_request_cost: int = 8_000_000
    # A document request's characters (before markup is read) and sentences (counting each piece
    # of a sentence cut for the model), summed over its texts; max_sentence_chars does not apply.
    max_document_chars: int = 10_000
    max_document_sentences: int = 64
    max_terms: int = 64  # glossary terms per request
    max_term_chars: int = 200  # per source or target phrase of a term

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ConfigError(f"limits.{f.name} must be positive, got {getattr(self, f.name)}")


@dataclass(frozen=True)
class RequestOptions:
    """Decoding options as a client gave them; None takes the server's default."""

    beam_size: int | None = None
    length_penalty: float | None = None
    max_length: int | None = None
    n_best: int | None = None
    min_length: int | None = None
    return_scores: bool = False
    return_alignments: bool = False
    max_len_a: float | None = None
    max_len_b: int | None = None
    length_penalty_form: str | None = None
    length_includes_eos: bool | None = None
    no_repeat_ngram: int | None = None
    sample: bool | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    seed: int | None = None
    target_prefix: str = ""  # text every translation starts with
    terms: tuple[Term, ...] = ()  # glossary (translator.glossary)


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    checkpoint_sha256: str
    source_language: str
    target_language: str


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


@dataclass(frozen=True)
class ModelInfo:
    identity: ModelIdentity
    vocabulary_size: int
    preset: str
    tokenizer_sha256: str
    architecture: ModelConfig
    limits: Limits
    max_source_tokens: int
    max_length: int
    defaults: DecodeOptions
    metrics: dict[str, float] = field(default_factory=dict)
    origin: CheckpointOrigin | None = None


@dataclass(frozen=True)
class CheckpointOrigin:
    """What the served checkpoint proves about itself: its weights' digest and its provenance."""

    weights_sha256: str
    verified: bool  # the digests recorded at save were checked on load
    provenance: Provenance
    training_config: dict[str, Any]


@dataclass(frozen=True)
class _Prepared:
    sources: list[list[int]]  # of the texts to decode (with content), EOS-terminated
    options: DecodeOptions
    request: RequestOptions
    texts: list[str]  # all of the request's
    decoded: list[int]  # the request index of each source
    prefix: tuple[int, ...] = ()  # forced target prefix
    terms: tuple[tuple[Term, ...], ...] = ()  # per source: the glossary terms that apply to it
    phrases: tuple[tuple[tuple[int, ...], ...], ...] = ()  # per source: those terms' target ids


@dataclass(frozen=True)
class _Forced:
    """What a request with a forced target prefix or glossary phrases is batched by: its options,
    the prefix's ids, and each source's required phrases (requests without either are batched by
    their DecodeOptions alone). Requests with equal keys share batches."""

    options: DecodeOptions
    prefix: tuple[int, ...]
    phrases: tuple[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]], ...] = ()  # (source ids, its phrases)


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
        if batching.max_queue_sentences < self.limits.max_sentences:
            raise ConfigError(
                f"batching.max_queue_sentences ({batching.max_queue_sentences}) must be >= "
                f"limits.max_sentences ({self.limits.max_sentences}) or full requests never fit"
            )
        if batching.max_queue_sentences < self.limits.max_document_sentences:
            raise ConfigError(
                f"batching.max_queue_sentences ({batching.max_queue_sentences}) must be >= "
                f"limits.max_document_sentences ({self.limits.max_document_sentences}) or full documents never fit"
            )
        cfg = translator.model.cfg
        self.max_length = min(self.limits.max_length, cfg.max_positions - 1)
        self.info = ModelInfo(
            identity=identity,
            vocabulary_size=self.tokenizer.vocab_size,
            preset=str((checkpoint_config or {}).get("preset", "")),
            tokenizer_sha256=self.tokenizer.sha256,
            architecture=cfg,
            limits=self.limits,
            max_source_tokens=translator.max_source_tokens,
            max_length=self.max_length,
            defaults=translator.options,
            metrics={k: float(v) for k, v in (checkpoint_metrics or {}).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)},
            origin=origin,
        )
        self.batcher: Batcher | RemoteBatcher | Lane
        if engine is not None:
            self.batcher = engine.lane(self._decode)
        elif engine_process is not None:
            self.batcher = RemoteBatcher(engine_process)
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
        languages: tuple[str, str] = ("", ""),
    ) -> TranslationService:
        """Load the checkpoint (weights-only unpickling, verified: CheckpointError) and build the
        service around it; with engine, it decodes on that shared engine. With engine_process, an
        engine process loads the weights and decodes, and this one reads only the config and the
        tokenizer: its model is the architecture on the meta device, with no weights in memory.
        name: the model's name (default: the file's); languages: (source, target) to serve it as,
        each where the checkpoint's record is to be replaced."""
        path = Path(path)
        if engine_process:
            ckpt = load_checkpoint_metadata(path)
            with torch.device("meta"):
                model = build_model(ckpt.model_config).eval()
        else:
            ckpt = load_checkpoint(path)
            model = ckpt.build_model()
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        data = ckpt.config.get("data", {})
        identity = ModelIdentity(name or path.name, digest.hexdigest(), languages[0] or data.get("src_lang", ""),
                                 languages[1] or data.get("tgt_lang", ""))
        translator = Translator(model, ckpt.tokenizer, defaults)
        spec = EngineSpec(str(path), batching or BatcherConfig(), limits or Limits(), defaults, threads)
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
        prepared = self.prepare(texts, options)
        out = [[Candidate(text, 0.0)] for text in prepared.texts]
        for k, r in enumerate(await self._decode_all(prepared, call)):
            out[prepared.decoded[k]] = self._candidates(prepared, k, r)
        return out

    async def _decode_all(self, prepared: _Prepared, call: Call) -> list[list[Hypothesis]]:
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
        prepared = self.prepare(texts, options)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
        job = None
        if prepared.sources:
            job = self._submit(prepared, call, stream=True,
                               listener=lambda event: _call_soon(loop, events.put_nowait, event))
        return self._stream_async(prepared, job, call, events)

    async def _stream_async(self, prepared: _Prepared, job: Job | None, call: Call,
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
        split, prepared = self.prepare_documents(texts, options, document)
        raw = await self._decode_all(prepared, call)
        decoded = [self._piece(prepared, document, k, nbest) for k, nbest in enumerate(raw)]
        return split.results(piece_translations(prepared.texts, prepared.decoded, decoded, self._passed(document)))

    def translate_documents_stream_async(
        self, texts: Sequence[str], options: RequestOptions, document: DocumentRequest, call: Call | None = None
    ) -> AsyncIterator[DocumentEvent]:
        """Each document's sentences as they become final, in document order, then the whole
        document. Checks and queues the request before returning, so errors raise here."""
        call = call or Call()
        split, prepared = self.prepare_documents(texts, options, document)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
        job = None
        if prepared.sources:
            job = self._submit(prepared, call, stream=False,
                               listener=lambda event: _call_soon(loop, events.put_nowait, event))
        return self._document_stream_async(split, prepared, document, job, call, events)

    async def _document_stream_async(self, split: SplitDocuments, prepared: _Prepared, document: DocumentRequest,
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

    def prepare_documents(
        self, texts: Sequence[str], options: RequestOptions, document: DocumentRequest
    ) -> tuple[SplitDocuments, _Prepared]:
        """Check the request, split its documents into the pieces the model takes and tokenize
        them; raises InvalidArgument naming the first bad field or limit."""
        lim = self.limits
        if not texts:
            raise InvalidArgument("texts is empty: send at least one document")
        if len(texts) > lim.max_sentences:
            raise InvalidArgument(f"texts has {len(texts)} documents; at most {lim.max_sentences} per request")
        for name, given in (("n_best", (options.n_best or 1) > 1), ("return_scores", options.return_scores),
                            ("return_alignments", options.return_alignments),
                            ("target_prefix", bool(options.target_prefix))):
            if given:
                raise InvalidArgument(f"options.{name} applies to sentences; a document request returns one "
                                      f"translation per document")
        if options.terms:
            raise InvalidArgument("terms apply to sentence requests; a document request takes none")
        for i, text in enumerate(texts):
            _check_chars(text, i)
        try:
            check_language(document.language)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        try:
            split = split_documents(texts, document, self.translator.count_tokens, self.translator.max_source_tokens,
                                    document.language or self.identity.source_language or self.translator.src_lang,
                                    lim.max_document_chars, lim.max_document_sentences)
        except DocumentLimitError as e:
            raise InvalidArgument(str(e)) from None
        options = dataclasses.replace(options, n_best=1, return_alignments=document.markup)
        return split, self._prepared(split.sources(), options, "sentence piece {} of the documents")

    def _piece(self, prepared: _Prepared, document: DocumentRequest, k: int, nbest: list[Hypothesis]) -> PieceTranslation:
        """The translation of source k (a piece of the documents) from its n-best."""
        best, source = nbest[0], prepared.texts[prepared.decoded[k]]
        aligned = aligned_translation(self.tokenizer, source, best.tokens, best.alignment) if document.markup else None
        return PieceTranslation(self.tokenizer.decode([best.tokens])[0], aligned)

    def _passed(self, document: DocumentRequest) -> Callable[[str], PieceTranslation]:
        """A content-free piece's translation: itself."""
        return lambda source: PieceTranslation(
            source, passed_through(self.tokenizer, source) if document.markup else None)

    def prepare(self, texts: Sequence[str], options: RequestOptions) -> _Prepared:
        """Check every limit and tokenize; raises InvalidArgument naming the first bad field."""
        lim = self.limits
        if not texts:
            raise InvalidArgument("texts is empty: send at least one sentence")
        if len(texts) > lim.max_sentences:
            raise InvalidArgument(
                f"texts has {len(texts)} sentences; at most {lim.max_sentences} per request")
        for i, text in enumerate(texts):
            if len(text) > lim.max_sentence_chars:
                raise InvalidArgument(
                    f"texts[{i}] has {len(text)} characters; at most {lim.max_sentence_chars} per sentence"
                )
            if not text.strip():
                raise InvalidArgument(f"texts[{i}] is empty or only whitespace")
            _check_chars(text, i)
        return self._prepared(list(texts), options, "texts[{}]")

    def _prepared(self, texts: list[str], options: RequestOptions, name: str) -> _Prepared:
        """Decoding options checked and texts tokenized, content-free ones set aside; `name`
        formats a text's index as messages name it."""
        opts = self.decode_options(options)
        prefix = self._target_prefix(options.target_prefix)
        try:  # content-free texts are passed through unchanged
            sources, decoded = self.translator.checked_sources(texts, opts, len(prefix), name, "options.min_length",
                                                               "options.target_prefix")
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        cost = self.request_cost(sources, opts) if sources else 0
        if cost > self.limits.max_request_cost:
            raise InvalidArgument(
                f"the request asks for {cost:,} units of decoding (source tokens x options.beam_size x output "
                f"budget, summed over texts); at most {self.limits.max_request_cost:,}: send fewer or shorter texts, "
                f"or lower options.beam_size or options.max_length"
            )
        terms, phrases = self._glossary(texts, options.terms, decoded)
        return _Prepared(sources, opts, options, texts, decoded, tuple(prefix), terms, phrases)

    def _glossary(self, texts: Sequence[str], terms: Sequence[Term], decoded: list[int]) -> tuple[tuple, tuple]:
        """Per decoded text, the request's terms that apply to it and their target phrases' ids."""
        if not terms:
            return (), ()
        limits = GlossaryLimits(self.limits.max_terms, self.limits.max_term_chars)
        try:
            applied, phrases = self.translator.glossary_phrases([texts[i] for i in decoded], terms, limits)
        except GlossaryError as e:
            raise InvalidArgument(f"terms: {e}") from None
        return tuple(map(tuple, applied)), tuple(tuple(map(tuple, p)) for p in phrases)

    def _target_prefix(self, text: str) -> list[int]:
        """Token ids of a request's target prefix (none for empty text)."""
        if not text:
            return []
        if len(text) > self.limits.max_sentence_chars:
            raise InvalidArgument(f"options.target_prefix has {len(text)} characters; at most "
                                  f"{self.limits.max_sentence_chars}")
        if bad := FORBIDDEN_CHARS.search(text):
            raise InvalidArgument(f"options.target_prefix holds U+{ord(bad.group()):04X} at offset {bad.start()}: "
                                  f"control characters and unpaired surrogates are not text")
        return self.tokenizer.encode([text])[0]

    def request_cost(self, sources: list[list[int]], opts: DecodeOptions) -> int:
        """Source tokens x beam size x output budget, summed over sentences: a bound on the work
        of decoding them, known before any is done."""
        lengths = torch.tensor([len(s) for s in sources])
        budgets = output_budgets(lengths, opts.max_len_a, opts.max_len_b, opts.max_len,
                                 self.translator.model.cfg.max_positions)
        return int((lengths * budgets).sum()) * opts.beam_size

    def decode_options(self, req: RequestOptions) -> DecodeOptions:
        """The server's defaults overridden by the request's fields, each checked against the limits."""
        defaults = self.translator.options
        beam = _check_int("options.beam_size", req.beam_size, 1, self.limits.max_beam_size)
        beam = beam or (1 if req.sample else defaults.beam_size)  # sampling draws on one beam
        n_best = _check_int("options.n_best", req.n_best, 1, beam, "options.beam_size")
        max_len = _check_int("options.max_length", req.max_length, 1, self.max_length)
        max_len = min(max_len or defaults.max_len, self.max_length)
        changes: dict[str, Any] = {"beam_size": beam, "max_len": max_len}
        if n_best is not None:
            changes["n_best"] = n_best
        if req.min_length is not None:
            changes["min_len"] = _check_int("options.min_length", req.min_length, 0, max_len - 1,
                                            "options.max_length - 1")
        if req.length_penalty is not None:
            if not (math.isfinite(req.length_penalty) and 0.0 <= req.length_penalty <= 10.0):
                raise InvalidArgument(f"options.length_penalty must be in [0, 10], got {req.length_penalty}")
            changes["length_penalty"] = req.length_penalty
        if req.return_alignments:
            changes["alignment"] = True
        changes.update((name, getattr(req, name)) for name in PASSED_OPTIONS if getattr(req, name) is not None)
        try:
            return defaults.replace(**changes)
        except ValueError as e:  # a combination with the server's defaults, e.g. n_best > beam_size
            raise InvalidArgument(f"options.{e}") from None

    def _submit(self, prepared: _Prepared, call: Call, stream: bool,
                listener: Callable[[tuple[str, int, Any]], None] | None = None) -> Job:
        call.sentences = len(prepared.sources)
        call.src_tokens = sum(len(s) for s in prepared.sources)
        phrases = tuple(zip(map(tuple, prepared.sources), prepared.phrases)) if any(prepared.phrases) else ()
        key = _Forced(prepared.options, prepared.prefix, phrases) if prepared.prefix or phrases else prepared.options
        job = Job(prepared.sources, key, cost=prepared.options.beam_size,
                  deadline=call.deadline, stream=stream, listener=listener)
        return self.batcher.submit(job)

    def _decode(self, batch: RunningBatch, key: DecodeOptions | _Forced) -> Generator[None, None, list[Any]]:
        """The batcher's decode function: one search over the batch, a step at a time, split per
        sentence, through the Translator as offline (queued sentences join it between steps where
        they can)."""
        opts, prefix, phrases = key, (), None
        if isinstance(key, _Forced):
            opts, prefix = key.options, key.prefix
            required = dict(key.phrases)
            phrases = [[list(p) for p in required.get(tuple(s), ())] for s in batch.sources] if required else None
        hyps = yield from self.translator.decode_steps(batch.sources, opts, prefix, phrases, batch)
        return hyps.nbest

    def _candidates(self, prepared: _Prepared, i: int, nbest: list[Hypothesis]) -> list[Candidate]:
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


def check_request_id(request_id: str) -> None:
    """A client's request id is logged and echoed: short, and printable (no line breaks)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
    if not request_id.isprintable():
        bad = next(c for c in request_id if not c.isprintable())
        raise InvalidArgument(f"request_id holds U+{ord(bad):04X}: only printable characters are allowed")


def _check_chars(text: str, i: int) -> None:
    if bad := FORBIDDEN_CHARS.search(text):
        raise InvalidArgument(f"texts[{i}] holds U+{ord(bad.group()):04X} at offset {bad.start()}: control characters "
                              f"and unpaired surrogates are not text")


def _check_int(name: str, value: int | None, lo: int, hi: int, hi_name: str | None = None) -> int | None:
    if value is not None and not lo <= value <= hi:
        bound = f"{hi_name} ({hi})" if hi_name else str(hi)
        raise InvalidArgument(f"{name} must be between {lo} and {bound}, got {value}")
    return value


class _StreamedText:
    """A streaming job's events as text: what became final of a sentence since it was last sent."""

    def __init__(self, service: TranslationService, prepared: _Prepared) -> None:
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
    """fn(*args) on loop's thread, from any thread; dropped once the loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _record(call: Call, job: Job) -> None:
    call.queue_ms, call.decode_ms, call.steps = job.stats.queue_ms, job.stats.decode_ms, job.stats.steps
