"""Documents: text split into sentences the model can take, and translations put back in their place.

Every character outside a sentence (paragraph breaks, line breaks, the whitespace around and between
sentences) is copied to the output as it is, so `reassemble(split_document(text, ...), translations)`
keeps the document's layout. Lines (and the blocks between `breaks`, such as the paragraphs of
markup) are split into sentences by sentencex; a sentence with more
tokens than the model takes is cut into pieces (at clause punctuation, then into windows of words,
then of characters) whose translations are joined back with the whitespace that separated them.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sentencex

Span = tuple[int, int]  # [start, end) character offsets into a text
CountTokens = Callable[[str], int]

LINE = re.compile(r"[^\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+")  # the characters str.splitlines breaks at
# A clause ends after one of these marks (Latin, CJK and full-width forms) and the whitespace after it.
CLAUSE_END = re.compile(r"[,;:\u2013\u2014\u3001\uff0c\uff1b\uff1a]\s*")
WORD = re.compile(r"\S+\s*")


class DocumentLimitError(ValueError):
    """A document is over one of its request's limits; the message names the limit."""


@dataclass(frozen=True)
class DocumentLimits:
    """Per-request limits, checked before any translation."""

    max_chars: int = 100_000
    max_sentences: int = 1_000

    def __post_init__(self) -> None:
        for name in ("max_chars", "max_sentences"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


DEFAULT_LIMITS = DocumentLimits()


@dataclass(frozen=True)
class Sentence:
    """One sentence of a document: its span (surrounding whitespace left out) and the spans that
    go to the model, one when the sentence fits, several when it was cut."""

    span: Span
    pieces: tuple[Span, ...]


@dataclass(frozen=True)
class Document:
    text: str
    sentences: tuple[Sentence, ...]

    @property
    def pieces(self) -> list[Span]:
        return [piece for s in self.sentences for piece in s.pieces]

    def sources(self) -> list[str]:
        """The texts to translate, in document order: one per piece."""
        return [self.text[a:b] for a, b in self.pieces]


@dataclass(frozen=True)
class TranslatedSentence:
    source: Span  # the sentence in the source document
    target: Span  # its translation in the output text
    text: str  # the translation


@dataclass(frozen=True)
class DocumentResult:
    text: str
    sentences: tuple[TranslatedSentence, ...]


def check_chars(text: str, limits: DocumentLimits) -> None:
    if len(text) > limits.max_chars:
        raise DocumentLimitError(f"the text has {len(text)} characters; the limit is max_chars={limits.max_chars}")


def split_document(
    text: str,
    count_tokens: CountTokens,
    max_tokens: int,
    lang: str = "en",
    limits: DocumentLimits = DEFAULT_LIMITS,
    breaks: Sequence[int] = (),
) -> Document:
    """Sentences of `text` in `lang`, cut into pieces of at most `max_tokens` tokens each; no
    sentence runs across a line break or a position of `breaks`.

    The character limit is checked before the text is read, the sentence limit before any
    sentence is measured in tokens; both raise DocumentLimitError.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    check_chars(text, limits)
    spans = sentence_spans(text, lang, breaks)
    if len(spans) > limits.max_sentences:
        raise DocumentLimitError(
            f"the text has {len(spans)} sentences; the limit is max_sentences={limits.max_sentences}"
        )
    return Document(text, tuple(Sentence(s, tuple(fit(text, s, count_tokens, max_tokens))) for s in spans))


def blocks(text: str, breaks: Sequence[int]) -> list[Span]:
    """The lines of `text`, cut again at the positions of `breaks`."""
    cuts = sorted(set(breaks))
    out = []
    for line in LINE.finditer(text):
        a, b = line.span()
        for cut in cuts[bisect.bisect_right(cuts, a) : bisect.bisect_left(cuts, b)]:
            out.append((a, cut))
            a = cut
        out.append((a, b))
    return out


def sentence_spans(text: str, lang: str, breaks: Sequence[int] = ()) -> list[Span]:
    """Spans of the sentences of every block of `text`, surrounding whitespace left out."""
    spans = []
    for a, b in blocks(text, breaks):
        block, start = text[a:b], a
        sentences = list(sentencex.segment(lang, block))
        if "".join(sentences) != block:  # the splitter changed the text: keep the block whole
            sentences = [block]
        for sentence in sentences:
            end = start + len(sentence)
            span = strip(text, (start, end))
            if span[0] < span[1]:
                spans.append(span)
            start = end
    return spans


def strip(text: str, span: Span) -> Span:
    """`span` without its leading and trailing whitespace and invisible format characters (zero-width
    spaces and joiners, byte-order marks: Unicode category Cf), which stay in the layout around
    the sentence rather than go to the model, which drops them; empty when nothing else is left."""
    a, b = span
    while a < b and _blank(text[a]):
        a += 1
    while b > a and _blank(text[b - 1]):
        b -= 1
    return a, b


def _blank(char: str) -> bool:
    return char.isspace() or unicodedata.category(char) == "Cf"


def fit(text: str, span: Span, count_tokens: CountTokens, max_tokens: int) -> list[Span]:
    """`span` as pieces of at most `max_tokens` tokens: itself when it fits, else clauses, else
    windows of words, else of characters. Pieces are stripped; the gaps between them are whitespace."""
    a, b = span
    if count_tokens(text[a:b]) <= max_tokens:
        return [span]
    for parts in (CLAUSE_END, WORD):
        cuts = [a] + [m.end() + a for m in parts.finditer(text[a:b]) if m.end() + a < b] + [b]
        if len(cuts) > 2:
            return pack(text, cuts, count_tokens, max_tokens)
    return characters(text, span, count_tokens, max_tokens)


def pack(text: str, cuts: list[int], count_tokens: CountTokens, max_tokens: int) -> list[Span]:
    """Consecutive parts between `cuts` merged greedily while they fit; a part that does not fit
    alone is cut further by `fit`."""
    pieces: list[Span] = []
    start = cuts[0]
    for i in range(1, len(cuts)):
        end = cuts[i]
        if i + 1 < len(cuts) and count_tokens(text[start : cuts[i + 1]].strip()) <= max_tokens:
            continue  # the next part fits beside this one
        pieces.extend(fit(text, strip(text, (start, end)), count_tokens, max_tokens))
        start = end
    return pieces


def characters(text: str, span: Span, count_tokens: CountTokens, max_tokens: int) -> list[Span]:
    """A run without whitespace cut into the longest prefixes that fit (at least one character)."""
    a, b = span
    pieces = []
    while a < b:
        lo, hi = a + 1, b  # the longest end in [lo, hi] that fits; a + 1 is taken even when it does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(text[a:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        pieces.append((a, lo))
        a = lo
    return pieces


def reassemble(doc: Document, translations: list[str]) -> DocumentResult:
    """The document with each piece replaced by its translation (in `doc.sources()` order).

    Text outside the sentences is kept as is; the pieces of a cut sentence are joined with the
    source's whitespace between them.
    """
    if len(translations) != len(doc.pieces):
        raise ValueError(f"{len(translations)} translations for {len(doc.pieces)} pieces")
    out: list[str] = []
    length = cursor = k = 0
    sentences = []
    for sentence in doc.sentences:
        gap = doc.text[cursor : sentence.span[0]]
        out.append(gap)
        length += len(gap)
        translated = join_pieces(doc.text, sentence, translations[k : k + len(sentence.pieces)])
        k += len(sentence.pieces)
        out.append(translated)
        sentences.append(TranslatedSentence(sentence.span, (length, length + len(translated)), translated))
        length += len(translated)
        cursor = sentence.span[1]
    out.append(doc.text[cursor:])
    return DocumentResult("".join(out), tuple(sentences))


def join_pieces(text: str, sentence: Sentence, translations: Sequence[str]) -> str:
    """A sentence's translation: its pieces' translations joined with the source's whitespace
    between the pieces."""
    parts = []
    for i, (a, _) in enumerate(sentence.pieces):
        if i:
            parts.append(text[sentence.pieces[i - 1][1] : a])
        parts.append(translations[i].strip())
    return "".join(parts)
