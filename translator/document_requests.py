"""Document requests of the translation service: documents split into the pieces the model takes,
checked against the request's limits, and put back together from the pieces' translations, all at
once or sentence by sentence as they become final (translator.documents, translator.markup,
translator.placement).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from translator.documents import (
    CountTokens,
    Document,
    DocumentLimitError,
    DocumentLimits,
    DocumentResult,
    Span,
    join_pieces,
    reassemble,
    split_document,
)
from translator.markup import Markup, parse_markup
from translator.placement import AlignedTranslation, restore_markup

# A language tag as BCP 47 spells one ("en", "pt-BR", "zh-Hant"): what the splitter is given.
LANGUAGE = re.compile(r"[A-Za-z]{1,8}(?:[-_][A-Za-z0-9]{1,8}){0,4}")


@dataclass(frozen=True)
class DocumentRequest:
    """How a request's texts are documents: with inline markup or not, in which language."""

    markup: bool = False
    language: str = ""  # for the sentence splitter; "" = the model's source language


@dataclass(frozen=True)
class PieceTranslation:
    """One piece's translation: its text and, for markup, what restore_markup needs of it."""

    text: str
    aligned: AlignedTranslation | None = None


@dataclass(frozen=True)
class SentenceDone:
    """A sentence of a document, final: its source span, its span in the translated document
    (None with markup, whose tags are placed once the whole document is translated), its text."""

    source: Span
    target: Span | None
    text: str


@dataclass(frozen=True)
class DocumentEvent:
    """Document `index` of a request, streamed: `text` to append to it, the sentence that became
    final; in its last event, `result`, the whole document."""

    index: int
    text: str
    sentence: SentenceDone | None = None
    result: DocumentResult | None = None


@dataclass(frozen=True)
class SplitDocuments:
    """A request's documents as the pieces the model takes (in `sources()` order): first those of
    the documents, then those of the attribute texts of their markup (Markup.attributes), each
    attribute split as a document of its own."""

    docs: list[Document]  # the request's documents, then the attribute texts
    markups: list[Markup | None]
    starts: list[int]  # index of each document's first piece among all the request's pieces
    attributes: list[range]  # per document of the request, the indices in `docs` of its attribute texts

    def sources(self) -> list[str]:
        return [source for doc in self.docs for source in doc.sources()]

    def own(self, j: int, pieces: Sequence[PieceTranslation | None]) -> Sequence[PieceTranslation | None]:
        """The translations of the pieces of docs[j] among those of all the request's pieces."""
        return pieces[self.starts[j] : self.starts[j] + len(self.docs[j].pieces)]

    def owner(self, j: int) -> int:
        """The document of the request whose text (or attribute text) docs[j] is."""
        return j if j < len(self.attributes) else next(i for i, held in enumerate(self.attributes) if j in held)

    def results(self, pieces: Sequence[PieceTranslation]) -> list[DocumentResult]:
        """Every document put back together from the translations of all the request's pieces."""
        return [self.result(i, pieces) for i in range(len(self.attributes))]

    def result(self, i: int, pieces: Sequence[PieceTranslation]) -> DocumentResult:
        doc, markup, own = self.docs[i], self.markups[i], self.own(i, pieces)
        if markup is None:
            return reassemble(doc, [p.text for p in own])
        texts = [reassemble(self.docs[j], [p.text for p in self.own(j, pieces)]).text for j in self.attributes[i]]
        return restore_markup(markup.with_attributes(texts), doc, [p.aligned for p in own if p.aligned is not None])


def check_language(language: str) -> None:
    """A ValueError unless `language` is empty or a language tag."""
    if language and not (len(language) <= 35 and LANGUAGE.fullmatch(language)):
        shown = language if len(language) <= 40 else language[:40] + "..."
        raise ValueError(f"document.language must be a language code such as 'en' or 'pt-BR', got {shown!r}")


def split_documents(
    texts: Sequence[str], request: DocumentRequest, count_tokens: CountTokens, max_tokens: int,
    language: str, max_chars: int, max_sentences: int,
) -> SplitDocuments:
    """The request's documents split into sentences in `language` and pieces of at most
    `max_tokens` tokens, then the attribute texts of their markup. Characters (before markup is
    read), sentences (an attribute's among them) and pieces are summed over the texts and checked
    against the limits as soon as each is known; over one, DocumentLimitError naming the limit."""
    chars = sum(len(t) for t in texts)
    if chars > max_chars:
        raise DocumentLimitError(
            f"the documents have {chars:,} characters; max_document_chars allows {max_chars:,} per request")
    docs: list[Document] = []
    starts: list[int] = []
    sentences = pieces = 0

    def add(plain: str, breaks: Sequence[int] = ()) -> None:
        nonlocal sentences, pieces
        left = DocumentLimits(max_chars=max(len(plain), 1), max_sentences=max(max_sentences - sentences, 1))
        try:
            doc = split_document(plain, count_tokens, max_tokens, language, left, breaks)
        except DocumentLimitError:
            doc = None
        if doc is None or sentences + len(doc.sentences) > max_sentences:
            raise DocumentLimitError(
                f"the documents have more than {max_sentences} sentences; max_document_sentences allows "
                f"{max_sentences} per request")
        docs.append(doc)
        starts.append(pieces)
        sentences += len(doc.sentences)
        pieces += len(doc.pieces)

    markups = [parse_markup(text) if request.markup else None for text in texts]
    for text, markup in zip(texts, markups):
        if markup is None:
            add(text)
        else:
            add(markup.flowing, markup.breaks)
    attributes = []
    for markup in markups:
        first = len(docs)
        for attribute in markup.attributes if markup else ():
            add(attribute.text)
        attributes.append(range(first, len(docs)))
    if pieces > max_sentences:
        raise DocumentLimitError(
            f"the documents' {sentences} sentences are {pieces} pieces once those longer than the model takes are "
            f"cut; max_document_sentences allows {max_sentences} per request")
    return SplitDocuments(docs, markups + [None] * (len(docs) - len(texts)), starts, attributes)


class DocumentStream:
    """Sentences of a request's documents in document order as their pieces' translations come
    in, in any order: `add` gives the events that a piece's translation makes final."""

    def __init__(self, split: SplitDocuments, pieces: list[PieceTranslation | None]) -> None:
        self.split = split
        self.pieces = pieces  # per piece of the request; None until translated
        n = len(split.attributes)
        self.next = [0] * n  # per document, its first sentence not yet sent
        self.length = [0] * n  # per document, the length of the text sent
        self.ended = [False] * n

    def add(self, k: int, piece: PieceTranslation) -> list[DocumentEvent]:
        self.pieces[k] = piece
        return self._document(self.split.owner(bisect.bisect_right(self.split.starts, k) - 1))

    def ready(self) -> list[DocumentEvent]:
        """The events of every sentence now final and not yet sent, and the last event of every
        document now complete."""
        events: list[DocumentEvent] = []
        for i in range(len(self.split.attributes)):
            events += self._document(i)
        return events

    def _document(self, i: int) -> list[DocumentEvent]:
        doc, start, markup = self.split.docs[i], self.split.starts[i], self.split.markups[i]
        plain = markup is None
        events = []
        first = start + sum(len(s.pieces) for s in doc.sentences[: self.next[i]])
        while self.next[i] < len(doc.sentences):
            sentence = doc.sentences[self.next[i]]
            own = self.pieces[first : first + len(sentence.pieces)]
            if any(p is None for p in own):
                return events
            text = join_pieces(doc.text, sentence, [p.text for p in own if p is not None])
            previous_end = doc.sentences[self.next[i] - 1].span[1] if self.next[i] else 0
            gap = doc.text[previous_end : sentence.span[0]] if plain else ""
            target = (self.length[i] + len(gap), self.length[i] + len(gap) + len(text)) if plain else None
            source = markup.source_span(sentence.span) if markup else sentence.span
            events.append(DocumentEvent(i, gap + text, SentenceDone(source, target, text)))
            self.length[i] += len(gap) + len(text)
            self.next[i] += 1
            first += len(sentence.pieces)
        if any(p is None for j in self.split.attributes[i] for p in self.split.own(j, self.pieces)):
            return events  # its attribute texts are not all translated yet
        if not self.ended[i]:
            self.ended[i] = True
            result = self.split.result(i, self.pieces)  # type: ignore[arg-type]  # all translated now
            tail = result.text[self.length[i] :] if plain else ""
            events.append(DocumentEvent(i, tail, result=result))
        return events


def piece_translations(
    sources: Sequence[str], decoded: Sequence[int], translated: Sequence[PieceTranslation | None],
    passed: Callable[[str], PieceTranslation],
) -> list[Any]:
    """Every piece's translation: the decoded ones (`decoded[k]` is the piece of `translated[k]`;
    None for one not translated yet), the others (content-free) passed through by `passed`."""
    todo = dict(zip(decoded, translated))
    return [todo[i] if i in todo else passed(source) for i, source in enumerate(sources)]
