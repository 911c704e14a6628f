"""A request made ready to decode: its options checked (translator.request_options), its texts
tokenized and checked against the model by the Translator, its decoding work bounded, its glossary
terms placed; and the key its sentences are batched by. Errors are `InvalidArgument` naming the
field or the text."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from translator.decode_options import DecodeOptions
from translator.document_requests import DocumentRequest, SplitDocuments, split_documents
from translator.documents import DocumentLimitError
from translator.glossary import GlossaryError, GlossaryLimits, Term
from translator.length import output_budget
from translator.request_options import decode_options
from translator.requests import (
    InvalidArgument,
    Limits,
    RequestOptions,
    check_document_request,
    check_text,
    check_texts,
)
from translator.translate import Translator


@dataclass(frozen=True)
class Prepared:
    sources: list[list[int]]  # of the texts to decode (with content), EOS-terminated
    options: DecodeOptions
    request: RequestOptions
    texts: list[str]  # all of the request's
    decoded: list[int]  # the request index of each source
    prefix: tuple[int, ...] = ()  # forced target prefix
    terms: tuple[tuple[Term, ...], ...] = ()  # per source: the glossary terms that apply to it
    phrases: tuple[tuple[tuple[int, ...], ...], ...] = ()  # per source: those terms' target ids

    def batch_key(self) -> DecodeOptions | Forced:
        """What its sentences are batched by: their options, or those with what is forced on them."""
        phrases = tuple(zip(map(tuple, self.sources), self.phrases)) if any(self.phrases) else ()
        return Forced(self.options, self.prefix, phrases) if self.prefix or phrases else self.options


@dataclass(frozen=True)
class Forced:
    """What a request with a forced target prefix or glossary phrases is batched by: its options,
    the prefix's ids, and each source's required phrases (requests without either are batched by
    their DecodeOptions alone). Requests with equal keys share batches."""

    options: DecodeOptions
    prefix: tuple[int, ...]
    phrases: tuple[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]], ...] = ()  # (source ids, its phrases)

    def required(self, sources: list[list[int]]) -> list[list[list[int]]] | None:
        """Per source of a batch, the phrases its output must contain; None if none has any."""
        if not self.phrases:
            return None
        by_source = dict(self.phrases)
        return [[list(p) for p in by_source.get(tuple(s), ())] for s in sources]


class Preparer:
    """Checks and tokenizes requests for one Translator within the limits."""

    def __init__(self, translator: Translator, limits: Limits, source_language: str = "") -> None:
        self.translator = translator
        self.tokenizer = translator.tokenizer
        self.limits = limits
        self.source_language = source_language  # documents are split by its rules
        # The longest output served: the limit, or the model's positions if fewer.
        self.max_length = min(limits.max_length, translator.model.cfg.max_positions - 1)

    def sentences(self, texts: Sequence[str], options: RequestOptions) -> Prepared:
        """Check every limit and tokenize; raises InvalidArgument naming the first bad field."""
        check_texts(texts, self.limits)
        return self._prepared(list(texts), options, "texts[{}]")

    def documents(self, texts: Sequence[str], options: RequestOptions,
                  document: DocumentRequest) -> tuple[SplitDocuments, Prepared]:
        """Check the request, split its documents into the pieces the model takes and tokenize
        them; raises InvalidArgument naming the first bad field or limit."""
        check_document_request(texts, options, document, self.limits)
        lim, tr = self.limits, self.translator
        try:
            split = split_documents(texts, document, tr.count_tokens, tr.max_source_tokens,
                                    document.language or self.source_language or tr.src_lang,
                                    lim.max_document_chars, lim.max_document_sentences)
        except DocumentLimitError as e:
            raise InvalidArgument(str(e)) from None
        options = dataclasses.replace(options, n_best=1, return_alignments=document.markup)
        return split, self._prepared(split.sources(), options, "sentence piece {} of the documents")

    def _prepared(self, texts: list[str], options: RequestOptions, name: str) -> Prepared:
        """Decoding options checked and texts tokenized, content-free ones set aside; `name`
        formats a text's index as messages name it."""
        opts = decode_options(options, self.translator.options, self.limits, self.max_length)
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
        return Prepared(sources, opts, options, texts, decoded, tuple(prefix), terms, phrases)

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
        check_text(text, "options.target_prefix")
        return self.tokenizer.encode([text])[0]

    def request_cost(self, sources: list[list[int]], opts: DecodeOptions) -> int:
        """Source tokens x beam size x output budget, summed over sentences: a bound on the work
        of decoding them, known before any is done."""
        positions = self.translator.model.cfg.max_positions
        return opts.beam_size * sum(
            len(s) * output_budget(len(s), opts.max_len_a, opts.max_len_b, opts.max_len, positions) for s in sources
        )
