"""The source's markup placed in a translation through the cross-attention alignments.

`restore_markup` gives every target token the stack of the source token it is aligned to
(`translator.alignment`) and writes the output, opening and closing elements wherever the stack
changes: every element opened is closed, in order, so the output is well-formed whatever the
alignment. Markup without text goes before the first target token aligned at or after its source
position; a verbatim element is written whole in place of the target words it wraps, once.

Text is written with `&`, `<` and `>` escaped; start tags are written as they came, attributes and
their entities kept. An element split by the alignment (or by a sentence boundary) is written as
two elements with the same start tag. A translation's whitespace stays outside elements that open
or close at it; the source's whitespace between sentences is written inside the elements it stood
in, so the layout of a page's source is kept.
"""

from __future__ import annotations

import bisect
import html
from dataclasses import dataclass, field

from translator.alignment import hard_alignment, is_punctuation, target_stacks, word_ids
from translator.documents import Document, DocumentResult, Span, TranslatedSentence
from translator.markup import Element, Markup, Point, Stack, common_depth


@dataclass(frozen=True)
class AlignedTranslation:
    """One translated piece of a document, as `restore_markup` needs it.

    source_spans: the character span of each source token in the piece's text (EOS left out).
    target_pieces: the SentencePiece piece of each target token ("" for special tokens).
    alignment: (T, >= S) attention of each target token over the source tokens (extra columns,
    such as EOS, are ignored).
    target_log_probs: each target piece's log-probability under the tokenizer's unigram model, how
    common it is; empty where unknown (a BPE tokenizer), and attention alone then decides.
    """

    source_spans: list[Span]
    target_pieces: list[str]
    alignment: list[list[float]]
    target_log_probs: list[float] = field(default_factory=list)


@dataclass
class _Unit:
    """A run of output: plain text (escaped when written) or markup, inside the elements of `stack`."""

    text: str
    stack: Stack
    is_markup: bool = False
    sentence: int | None = None  # the sentence whose translation this is
    exact: bool = False  # source text kept as it is: its whitespace too is inside its elements


def restore_markup(markup: Markup, doc: Document, translations: list[AlignedTranslation]) -> DocumentResult:
    """The translated document with the source's markup placed through the alignments.

    `doc` is `split_document(markup.text, ..., breaks=markup.breaks)`; `translations` follow
    `doc.sources()`. The sentences' target spans are offsets in the returned (marked-up) text.
    """
    if len(translations) != len(doc.pieces):
        raise ValueError(f"{len(translations)} translations for {len(doc.pieces)} pieces")
    units: list[_Unit] = []
    begins: list[int] = []  # per sentence, the index in units of its first unit
    points = sorted(markup.points, key=position)
    cursor = k = i = 0  # points[i:] are those at or after the cursor
    for index, sentence in enumerate(doc.sentences):
        for j, (a, b) in enumerate(sentence.pieces):
            g = bisect.bisect_right(points, a, lo=i, key=position)
            gap = _source_units(markup, cursor, a, points[i:g])
            for unit in gap if j else ():  # the space between the pieces of a cut sentence is part of it
                unit.sentence = index
            units += gap
            if not j:
                begins.append(len(units))
            i = bisect.bisect_left(points, b, lo=g, key=position)
            units += _target_units(markup, (a, b), translations[k], points[g:i], index)
            cursor, k = b, k + 1
    units += _source_units(markup, cursor, len(markup.text), points[i:])
    units = _verbatim_once(_with_lost_elements(markup, doc, units, begins))
    text, spans = _write(units, len(doc.sentences))
    plain: list[list[str]] = [[] for _ in doc.sentences]
    for unit in units:
        if unit.sentence is not None and not unit.is_markup:
            verbatim = _verbatim(unit)
            plain[unit.sentence].append(unit.text if verbatim is None else _lead(unit.text) + verbatim.text)
    sentences = tuple(TranslatedSentence(markup.source_span(s.span), span, "".join(parts).strip())
                      for s, span, parts in zip(doc.sentences, spans, plain))
    return DocumentResult(text, sentences)


def _with_lost_elements(markup: Markup, doc: Document, units: list[_Unit], begins: list[int]) -> list[_Unit]:
    """`units` with each element that no unit holds (its sentence translated to nothing) written
    empty at the start of the sentence where it began (at index `begins[sentence]` of units),
    inside those of its outer elements that are written, so that none of the source's elements is
    lost."""
    held = {id(e) for unit in units for e in unit.stack}
    lost: dict[int, tuple[int, Element, Stack]] = {}  # by identity: its sentence, it, its outer elements
    for sentence, s in enumerate(doc.sentences):
        previous = None
        for stack in markup.stacks[s.span[0] : s.span[1]]:
            if stack is previous:
                continue
            previous = stack
            for depth, e in enumerate(stack):
                if id(e) not in held and id(e) not in lost:
                    lost[id(e)] = (sentence, e, tuple(x for x in stack[:depth] if id(x) in held))
    for sentence, e, outer in reversed(list(lost.values())):  # each goes before those after it
        units.insert(begins[sentence], _Unit(e.start_tag + e.end_tag, outer, is_markup=True, sentence=sentence))
    return units


def position(point: Point) -> int:
    return point.position


def _source_units(markup: Markup, start: int, end: int, points: list[Point]) -> list[_Unit]:
    """Source text kept as it is, in runs of one stack, with the points among it in place."""
    units: list[_Unit] = []
    points = sorted(points, key=lambda p: p.position)
    i = start
    while i < end or points:
        if points and points[0].position <= i:
            p = points.pop(0)
            units.append(_Unit(p.markup, p.stack, is_markup=True))
            continue
        stop = min(end, points[0].position if points else end)
        j = i + 1
        while j < stop and markup.stacks[j] is markup.stacks[i]:
            j += 1
        units.append(_Unit(markup.text[i:j], markup.stacks[i], exact=True))
        i = j
    return units


def _target_units(
    markup: Markup, piece: Span, tr: AlignedTranslation, points: list[Point], sentence: int
) -> list[_Unit]:
    """The target tokens of one piece, each with the stack of its aligned source token, and the
    points inside the piece before the first target token aligned at or after them. A verbatim
    element that no target word holds goes before the target word that attends most to it, or at
    the end when the translation is empty."""
    a, _ = piece
    tr = _source_words(markup, piece, tr, points)
    source_stacks = [_token_stack(markup, a + s, a + e) for s, e in tr.source_spans]
    starts = [_first_visible(markup.text, a + s, a + e) for s, e in tr.source_spans]
    texts = [markup.text[a + s : a + e] for s, e in tr.source_spans]
    links = hard_alignment(tr.target_pieces, tr.alignment, texts)
    stacks = target_stacks(source_stacks, links, tr.target_pieces, tr.alignment, [is_punctuation(t) for t in texts],
                           tr.target_log_probs)
    units: list[_Unit] = []
    at: dict[int, int] = {}  # target token -> index of its text in units
    pending = sorted(points, key=lambda p: p.position)
    for t, (piece_text, src, stack) in enumerate(zip(tr.target_pieces, links, stacks)):
        text = piece_text.replace("\u2581", " ")
        if not any(not u.is_markup for u in units):
            text = text.lstrip()
        due = [p for p in pending if src is not None and _token_index(starts, p.position) <= src]
        if due:  # markup goes after the space, before the word
            spaced = text[:1].isspace()
            text = text[1:] if spaced else text
            units += _point_units(due, units, spaced, source_stacks[src], sentence)
            if text and due[-1].spaced[1]:
                text = " " + text
        pending = [p for p in pending if p not in due]
        if text:
            at[t] = len(units)
            units.append(_Unit(text, stack if stack is not None else markup.stacks[a], sentence=sentence))
    units += _point_units(pending, units, False, markup.stacks[a] if markup.stacks else (), sentence)
    return _with_unheld_verbatim(markup, piece, source_stacks, tr, units, at, sentence)


def _source_words(markup: Markup, piece: Span, tr: AlignedTranslation, points: list[Point]) -> AlignedTranslation:
    """`tr` with the source tokens of each word (`word_ids`) in the same elements, and no markup
    between them, made one source token. The decoder reads a word's pieces in turn and the words
    after a translation attend to its last pieces ("in" to "mobil" of "Schneemobil" after
    "snowmobile"); as one token, the word has one head, the target word that attends to it most.
    A target token's attention to the word is the sum of its attention to the pieces less, for
    each piece after the first, its mean attention over the source tokens, so that a word cut
    into many pieces does not gather the spread-out attention of words that look at no word in
    particular."""
    a, _ = piece
    texts = [markup.text[a + s : a + e] for s, e in tr.source_spans]
    ids = word_ids(["\u2581" + t.lstrip() if t[:1].isspace() else t for t in texts])
    stacks = [_token_stack(markup, a + s, a + e) for s, e in tr.source_spans]
    inside = {p.position for p in points}
    groups: list[list[int]] = []
    for j, (s, _) in enumerate(tr.source_spans):
        if groups and ids[j] == ids[j - 1] and stacks[j] is stacks[j - 1] and a + s not in inside:
            groups[-1].append(j)
        else:
            groups.append([j])
    if len(groups) == len(texts):
        return tr
    n = len(texts)
    spans = [(tr.source_spans[g[0]][0], tr.source_spans[g[-1]][1]) for g in groups]
    alignment = [[max(0.0, sum(row[j] for j in g) - (len(g) - 1) * sum(row[:n]) / n) for g in groups] + list(row[n:])
                 for row in tr.alignment]
    return AlignedTranslation(spans, tr.target_pieces, alignment, tr.target_log_probs)


def _with_unheld_verbatim(markup: Markup, piece: Span, source_stacks: list[Stack], tr: AlignedTranslation,
                          units: list[_Unit], at: dict[int, int], sentence: int) -> list[_Unit]:
    """`units` of a piece (`at`: per target token, the index of its text) with each verbatim
    element with text in the piece that no target word of the piece holds: before the target word
    that attends most to it, with the source's spaces around it, or at the end when no word does
    (of an element across pieces, `_verbatim_once` keeps the first)."""
    a, b = piece
    held = {id(_verbatim(u)) for u in units if _verbatim(u) is not None and u.text.strip()}
    words = word_ids(tr.target_pieces)
    inserts: list[tuple[int, _Unit]] = []
    for i in range(a, b):
        stack = markup.stacks[i]
        if not stack or not stack[-1].verbatim or id(stack[-1]) in held or markup.text[i].isspace():
            continue
        held.add(id(stack[-1]))
        own = [j for j, st in enumerate(source_stacks) if st and st[-1] is stack[-1]]
        if not at or not own:
            units.append(_Unit(" " * any(not u.is_markup for u in units) + stack[-1].text, stack, sentence=sentence))
            continue
        best = max(at, key=lambda t: max(tr.alignment[t][j] for j in own))
        first = min(t for t in at if words[t] == words[best])
        word = units[at[first]]
        end = i + len(stack[-1].text.strip())  # the element's text, from its first visible character
        spaced = bool(_lead(word.text))
        before = (spaced or markup.text[i - 1 : i].isspace()) and any(not u.is_markup for u in units[: at[first]])
        inserts.append((at[first], _Unit(" " * before + stack[-1].text.strip(), stack, sentence=sentence)))
        word.text = " " * (spaced or markup.text[end : end + 1].isspace()) + word.text.lstrip()
    for index, unit in sorted(inserts, key=lambda iu: -iu[0]):
        units.insert(index, unit)
    return units


def _point_units(points: list[Point], units: list[_Unit], spaced: bool, stack: Stack, sentence: int) -> list[_Unit]:
    """The points before a target word (after `units`), behind a space when the word had one or
    the first point is a word copied as it stands with a space before it in the source; such
    points keep the space between them."""
    out = []
    for i, p in enumerate(points):
        if i and points[i - 1].spaced[1]:
            out.append(_Unit(" ", p.stack, sentence=sentence))
        out.append(_Unit(p.markup, p.stack, is_markup=True, sentence=sentence))
    wordy = any(not u.is_markup for u in units)
    if points and (spaced or (points[0].spaced[0] and wordy and not units[-1].text[-1:].isspace())):
        out.insert(0, _Unit(" ", stack, sentence=sentence))
    return out


def _token_index(starts: list[int], position: int) -> int:
    """The first source token starting at or after `position`."""
    return next((i for i, s in enumerate(starts) if s >= position), len(starts))


def _first_visible(text: str, start: int, end: int) -> int:
    """The first character of text[start:end] that is not whitespace (`start` when there is none)."""
    return next((i for i in range(start, end) if not text[i].isspace()), start)


def _token_stack(markup: Markup, start: int, end: int) -> Stack:
    """The stack of a source token: that of its first character that is not whitespace."""
    if not markup.stacks:
        return ()
    return markup.stacks[min(_first_visible(markup.text, start, end), len(markup.stacks) - 1)]


def _verbatim(unit: _Unit) -> Element | None:
    """The verbatim element whose text `unit` stands in for, if any."""
    inner = unit.stack[-1] if unit.stack and not unit.is_markup else None
    return inner if inner is not None and inner.verbatim else None


def _lead(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


def _verbatim_once(units: list[_Unit]) -> list[_Unit]:
    """`units` without those of a verbatim element after its first word: it is written whole there."""
    seen: set[int] = set()
    out = []
    for unit in units:
        element = _verbatim(unit)
        if element is not None and id(element) in seen:
            continue
        if element is not None and unit.text.strip():
            seen.add(id(element))
        out.append(unit)
    return out


def _write(units: list[_Unit], n_sentences: int) -> tuple[str, list[Span]]:
    """The marked-up text of `units` and each sentence's span in it."""
    out: list[str] = []
    length = 0
    spans: list[list[int]] = [[-1, -1] for _ in range(n_sentences)]
    open_: Stack = ()

    def emit(s: str) -> None:
        nonlocal length
        out.append(s)
        length += len(s)

    def begin(unit: _Unit) -> None:
        if unit.sentence is not None and spans[unit.sentence][0] < 0:
            spans[unit.sentence][0] = length

    for unit in units:
        body = unit.text if unit.is_markup else html.escape(unit.text, quote=False)
        lead = "" if unit.is_markup else _lead(body)
        body = body[len(lead):]
        common = common_depth(open_, unit.stack)
        for element in reversed(open_[common:]):
            emit(element.end_tag)
        open_ = open_[:common]
        exact = unit.exact and lead and _verbatim(unit) is None
        if not exact:  # a translation's space goes outside the elements that open at it
            emit(lead)
        if body or exact:  # whitespace alone opens nothing, unless it stood inside them
            for element in unit.stack[common:]:
                if element.verbatim:  # written whole in place of its words
                    begin(unit)
                emit(element.start_tag)
            open_ = unit.stack
            if exact:
                emit(lead)
        if body:
            if _verbatim(unit) is None:
                begin(unit)
                emit(body)
            if unit.sentence is not None:
                spans[unit.sentence][1] = length
    for element in reversed(open_):
        emit(element.end_tag)
    return "".join(out), [(s, e) if s >= 0 else (0, 0) for s, e in spans]
