"""Inline markup (HTML or XML) carried through translation by the cross-attention alignments.

`parse_markup` turns marked-up text into plain text in which every character knows the elements
around it (its stack, outermost first), plus the markup that holds no text (void and self-closing
elements such as `<br/>`, empty elements, comments) at its position. After translation,
`restore_markup` gives every target token the stack of the source token it is aligned to and writes
the output, opening and closing elements wherever the stack changes: every element opened is
closed, in order, so the output is well-formed whatever the alignment. This follows Bergamot's
HTML translation (bergamot-translator's html.cpp): a hard alignment per target token (the source
token with the most attention, end-of-sentence left out), shared by all tokens of a target word;
markup without text goes before the first target token aligned at or after its source position.

What is not prose stays as it is. Script, style, math and svg elements (NOT_PROSE) are markup
without text. Code, kbd, samp and var elements (VERBATIM), and any element marked `translate="no"`
(HTML's attribute) or of class `notranslate` (the page translators' convention), keep their text in
the sentence, so that the model translates the words around it as a whole; the element is placed
like any other and written as it stands in place of the target words it wraps.

Text is written with `&`, `<` and `>` escaped; start tags are written as they came, attributes and
their entities kept. An element split by the alignment (or by a sentence boundary) is written as
two elements with the same start tag. A translation's whitespace stays outside elements that open
or close at it; the source's whitespace between sentences is written inside the elements it stood
in, so the layout of a page's source is kept.
"""

from __future__ import annotations

import bisect
import html
import re
from dataclasses import dataclass
from html.parser import HTMLParser

from translator.documents import Document, DocumentResult, Span, TranslatedSentence

# HTML elements with no end tag (the HTML standard's void elements).
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
                  "source", "track", "wbr"})
# Elements that begin and end a block of text: no sentence runs across their tags.
BLOCK = frozenset({"address", "article", "aside", "blockquote", "br", "caption", "dd", "div", "dl", "dt",
                   "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
                   "header", "hr", "li", "main", "nav", "ol", "option", "p", "pre", "section", "table",
                   "tbody", "td", "tfoot", "th", "thead", "title", "tr", "ul"})
# Elements whose content is copied as it stands (Bergamot's ignored tags): not text at all, or
# text that is not to be translated.
NOT_PROSE = frozenset({"math", "script", "style", "svg"})
VERBATIM = frozenset({"code", "kbd", "samp", "var"})
# Elements inside which a line break is one; elsewhere HTML renders it as a space.
PREFORMATTED = frozenset({"listing", "plaintext", "pre", "textarea", "xmp"})
LINE_BREAK = re.compile(r"\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")  # as str.splitlines breaks
TAG_NAME = re.compile(r"<\s*([^\s/>]+)")
# A character reference as html.unescape reads one.
CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


@dataclass(frozen=True, eq=False)
class Element:
    """An element of the source; each one is distinct, even when two are written alike."""

    start_tag: str  # as written: `<a href="x?a=1&amp;b=2">`; a verbatim element: all of it
    name: str  # as written, for the end tag
    verbatim: bool = False  # written whole, in place of its words, and holding nothing else
    text: str = ""  # a verbatim element's plain text

    @property
    def end_tag(self) -> str:
        return "" if self.verbatim else f"</{self.name}>"


Stack = tuple[Element, ...]  # the elements around a character, outermost first


@dataclass(frozen=True)
class Point:
    """Markup that holds no text, at a position of the plain text, inside the elements of `stack`.
    An element copied as it stands reads as a word: `spaced` says whether the source has
    whitespace before and after it, which the translation keeps."""

    position: int
    markup: str
    stack: Stack
    spaced: tuple[bool, bool] = (False, False)


@dataclass(frozen=True)
class Markup:
    text: str  # the plain text: tags removed, entities decoded
    stacks: tuple[Stack, ...]  # one per character of text
    points: tuple[Point, ...]  # in order of position
    breaks: tuple[int, ...] = ()  # where a block element begins or ends: split_document's breaks
    origins: tuple[Span, ...] = ()  # per character of text, the characters of the marked-up text it came from

    @property
    def flowing(self) -> str:
        """`text` as split_document should read it: a lone line break in whitespace outside a
        preformatted element as spaces (HTML renders it as a space, so a sentence wrapped over
        lines of the source is one sentence); blank lines still part paragraphs. Same length."""
        chars = list(self.text)
        for gap in re.finditer(r"\s+", self.text):
            breaks = list(LINE_BREAK.finditer(gap.group()))
            if len(breaks) == 1 and not any(e.name.lower() in PREFORMATTED for e in self.stacks[gap.start()]):
                a, b = breaks[0].span()
                chars[gap.start() + a : gap.start() + b] = " " * (b - a)
        return "".join(chars)

    def source_span(self, span: Span) -> Span:
        """The span of the marked-up text that plain `span` came from (tags inside it included)."""
        a, b = span
        if a >= b or not self.origins:
            return span
        return self.origins[a][0], self.origins[b - 1][1]


@dataclass(frozen=True)
class AlignedTranslation:
    """One translated piece of a document, as `restore_markup` needs it.

    source_spans: the character span of each source token in the piece's text (EOS left out).
    target_pieces: the SentencePiece piece of each target token ("" for special tokens).
    alignment: (T, >= S) attention of each target token over the source tokens (extra columns,
    such as EOS, are ignored).
    """

    source_spans: list[Span]
    target_pieces: list[str]
    alignment: list[list[float]]


class _Parser(HTMLParser):
    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.source = source
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", source)]  # getpos() counts "\n" only
        self.origins: list[Span] = []
        self.chars: list[str] = []
        self.stacks: list[Stack] = []
        self.points: list[Point] = []
        self.open: list[tuple[Element, int]] = []  # element, length of the text when it opened
        self.breaks: list[int] = []
        self.verbatim: _Verbatim | None = None  # the element being copied as it stands

    def here(self) -> int:
        """Where in the source the construct being handled begins."""
        line, column = self.getpos()
        return self.line_starts[line - 1] + column

    def block_edge(self, tag: str) -> None:
        if tag in BLOCK:
            self.breaks.append(len(self.chars))

    @property
    def stack(self) -> Stack:
        return tuple(e for e, _ in self.open)

    def point(self, markup: str, spaced: tuple[bool, bool] = (False, False)) -> None:
        self.points.append(Point(len(self.chars), markup, self.stack, spaced))

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if self.verbatim:
            self.verbatim.depth += tag == self.verbatim.name and tag not in VOID
            return
        raw = self.get_starttag_text() or f"<{tag}>"
        self.block_edge(tag)
        if tag in VOID:
            self.point(raw)
            return
        if tag in NOT_PROSE or tag in VERBATIM or untranslated(attrs):
            self.verbatim = _Verbatim(tag, self.here(), len(self.chars), prose=tag not in NOT_PROSE)
            return
        match = TAG_NAME.match(raw)
        self.open.append((Element(raw, match.group(1) if match else tag), len(self.chars)))

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if self.verbatim:
            return
        self.block_edge(tag)
        self.point(self.get_starttag_text() or f"<{tag}/>")

    def handle_endtag(self, tag: str) -> None:
        if self.verbatim:
            self.verbatim.depth -= tag == self.verbatim.name
            if not self.verbatim.depth:
                end = self.source.find(">", self.here())
                self.end_verbatim(end + 1 if end >= 0 else len(self.source))
            return
        names = [e.name.lower() for e, _ in self.open]
        if tag not in names:
            return  # an end tag that closes nothing is dropped
        self.block_edge(tag)
        depth = len(names) - 1 - names[::-1].index(tag)
        while len(self.open) > depth:  # elements left open inside it end here
            element, opened = self.open.pop()
            if opened == len(self.chars):  # it held no text: keep it whole at its position
                self.point(element.start_tag + element.end_tag)

    def end_verbatim(self, end: int) -> None:
        """The element being copied ends at `end` of the source: its text, when it has some that is
        not whitespace, goes inside it; else it is a point."""
        v, self.verbatim = self.verbatim, None
        raw, text = self.source[v.start : end], "".join(self.chars[v.opened:])
        if text.strip():
            stack = self.stack + (Element(raw, v.name, verbatim=True, text=text),)
            self.stacks[v.opened:] = [stack] * len(text)
            return
        del self.chars[v.opened:], self.stacks[v.opened:], self.origins[v.opened:]
        self.point(raw, (self.source[v.start - 1 : v.start].isspace(), self.source[end : end + 1].isspace()))

    def handle_data(self, data: str) -> None:
        if self.verbatim and not self.verbatim.prose:
            return
        stack = self.stack
        self.chars.extend(data)
        self.stacks.extend([stack] * len(data))
        line, column = self.getpos()
        self.origins.extend(origins(self.source, self.line_starts[line - 1] + column, data))

    def raw(self, closer: str) -> str:
        """The source of the construct being handled, to the first `closer` after its start."""
        start = self.here()
        end = self.source.find(closer, start + 2)
        return self.source[start : end + len(closer)] if end >= 0 else self.source[start:]

    def handle_comment(self, data: str) -> None:
        if not self.verbatim:  # a bogus comment (`<!ELEMENT a>`, `<?x>` in HTML) as it was written
            self.point(f"<!--{data}-->" if self.source.startswith("<!--", self.here()) else self.raw(">"))

    def unknown_decl(self, data: str) -> None:  # a marked section: `<![CDATA[x < y]]>`, `<![if IE]>`
        if not self.verbatim:
            self.point(self.raw("]]>" if data.startswith("CDATA[") else "]>"))

    def handle_decl(self, decl: str) -> None:
        if not self.verbatim:
            self.point(f"<!{decl}>")

    def handle_pi(self, data: str) -> None:
        if not self.verbatim:
            self.point(f"<?{data}>")


@dataclass
class _Verbatim:
    """An element copied as it stands: its name, where it began in the source and in the plain
    text, whether its text is read, and how many elements of its name are open."""

    name: str
    start: int
    opened: int
    prose: bool
    depth: int = 1


def untranslated(attrs: list[tuple[str, str | None]]) -> bool:
    """Whether a start tag's attributes mark its content as not to be translated."""
    return any((name == "translate" and (value or "").strip().lower() == "no")
               or (name == "class" and "notranslate" in (value or "").split()) for name, value in attrs)


def parse_markup(text: str) -> Markup:
    """Plain text and markup of `text`; an end tag that closes nothing is dropped, and elements
    left open run to the end of the text (one copied as it stands takes the rest)."""
    parser = _Parser(text)
    parser.feed(text)
    parser.close()
    if parser.verbatim:
        parser.end_verbatim(len(text))
    return Markup("".join(parser.chars), tuple(parser.stacks), tuple(parser.points), tuple(parser.breaks),
                  tuple(parser.origins))


def origins(source: str, start: int, data: str) -> list[Span]:
    """Per character of `data`, read from `source` at `start`, the span of `source` it came from:
    itself, or the character reference that decodes to it (all of whose characters share it)."""
    out: list[Span] = []
    i = start
    while len(out) < len(data):
        k = len(out)
        ref = CHARREF.match(source, i) if source[i : i + 1] == "&" else None
        decoded = html.unescape(ref.group()) if ref else ""
        if ref and not data.startswith(ref.group(), k) and decoded and data.startswith(decoded, k):
            out += [(i, ref.end())] * len(decoded)
            i = ref.end()
        else:
            out.append((i, min(i + 1, len(source))))
            i += 1
    return out


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
    points = sorted(markup.points, key=position)
    cursor = k = i = 0  # points[i:] are those at or after the cursor
    for index, sentence in enumerate(doc.sentences):
        for j, (a, b) in enumerate(sentence.pieces):
            g = bisect.bisect_right(points, a, lo=i, key=position)
            gap = _source_units(markup, cursor, a, points[i:g])
            for unit in gap if j else ():  # the space between the pieces of a cut sentence is part of it
                unit.sentence = index
            units += gap
            i = bisect.bisect_left(points, b, lo=g, key=position)
            units += _target_units(markup, (a, b), translations[k], points[g:i], index)
            cursor, k = b, k + 1
    units += _source_units(markup, cursor, len(markup.text), points[i:])
    units = _verbatim_once(units)
    text, spans = _write(units, len(doc.sentences))
    plain: list[list[str]] = [[] for _ in doc.sentences]
    for unit in units:
        if unit.sentence is not None and not unit.is_markup:
            verbatim = _verbatim(unit)
            plain[unit.sentence].append(unit.text if verbatim is None else _lead(unit.text) + verbatim.text)
    sentences = tuple(TranslatedSentence(markup.source_span(s.span), span, "".join(parts).strip())
                      for s, span, parts in zip(doc.sentences, spans, plain))
    return DocumentResult(text, sentences)


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
    source_stacks = [_token_stack(markup, a + s, a + e) for s, e in tr.source_spans]
    starts = [_first_visible(markup.text, a + s, a + e) for s, e in tr.source_spans]
    texts = [markup.text[a + s : a + e] for s, e in tr.source_spans]
    links = hard_alignment(tr.target_pieces, tr.alignment, texts)
    stacks = target_stacks(source_stacks, links, tr.target_pieces, tr.alignment, [_is_punctuation(t) for t in texts])
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


def word_ids(target_pieces: list[str]) -> list[int]:
    """Per target token, the index of its word (see starts_word)."""
    ids, word = [], -1
    for t, piece in enumerate(target_pieces):
        word += t == 0 or starts_word(target_pieces[t - 1], piece)
        ids.append(word)
    return ids


def confident(
    words: list[int], alignment: list[list[float]], links: list[int | None], eligible: list[bool]
) -> list[bool]:
    """Per target token, whether its word is also the target word its source token attends to
    most (the alignment holds both ways), among the `eligible` tokens. An article attends to its
    noun, but the noun's source word attends most to the noun: the article is not confident."""
    best: dict[int, tuple[float, int]] = {}  # source token -> (attention, target word) at its most
    for t, src in enumerate(links):
        if src is not None and eligible[t] and alignment[t][src] > best.get(src, (-1.0, -1))[0]:
            best[src] = (alignment[t][src], words[t])
    return [src is not None and eligible[t] and best[src][1] == words[t] for t, src in enumerate(links)]


# A word next to a sure word of the same source token is a further part of its translation when it
# attends to that token at least this much, and this many times more than to any source token
# outside the token's elements (chosen on 50 lines of Multi30K val, docs/RESULTS.md).
FURTHER_PART_ATTENTION = 0.4
FURTHER_PART_MARGIN = 2.0


def further_parts(
    words: list[int], sure: list[bool], links: list[int | None], alignment: list[list[float]], source_stacks: list[Stack],
    lettered: list[bool],
) -> list[bool]:
    """`sure` with the further words of one source word's translation added ("Bauarbeiter":
    "construction workers", "Baseballschläger": "baseball bat"): a word of letters or digits right
    after a sure word aligned to the same source token that attends to that token strongly
    (FURTHER_PART_ATTENTION) and clearly more than to any token of another stack
    (FURTHER_PART_MARGIN), so that a preposition that half attends to the noun before it ("a
    snowmobile in") stays outside. Only to the right: the words before a translation's head that
    attend to it are, in the languages of Multi30K, its articles, prepositions and auxiliaries."""
    held = list(sure)
    grown = True
    while grown:
        grown = False
        for t, s in enumerate(links):
            if held[t] or s is None or not lettered[t]:
                continue
            if not any(held[i] and links[i] == s and words[t] - words[i] == 1 for i in range(len(links))):
                continue  # no sure word of the same source token just before it
            part = [i for i in range(len(links)) if words[i] == words[t]]
            own = max(alignment[i][s] for i in part)
            rival = max((alignment[i][j] for i in part for j in range(len(source_stacks))
                         if source_stacks[j] != source_stacks[s]), default=0.0)
            if own >= FURTHER_PART_ATTENTION and own >= FURTHER_PART_MARGIN * rival:
                for i in part:
                    held[i] = True
                grown = True
    return held


def target_stacks(
    source_stacks: list[Stack], links: list[int | None], target_pieces: list[str], alignment: list[list[float]],
    source_punctuation: list[bool],
) -> list[Stack | None]:
    """Per target token, its aligned source token's stack when the alignment is confident; else
    only the elements it shares with the confident tokens on both sides (the piece's outer
    elements at its ends), so that an element does not spread onto an article or a repetition.
    A word of punctuation alone holds only the element of source punctuation
    (`source_punctuation`, per source token): a comma the translation adds where the source has
    none attends to the word that called for it, but a person leaves it outside that word's
    element. An element that no token holds then goes onto the target word (of letters or
    digits, where there is one) that attends most to it through any of its pieces; a verbatim
    one, which would replace that word, is left to `_target_units`."""
    words = word_ids(target_pieces)
    texts: dict[int, str] = {}
    for w, piece in zip(words, target_pieces):
        texts[w] = texts.get(w, "") + piece
    lettered = [any(ch.isalnum() for ch in texts[w]) for w in words]  # per token: its word has letters or digits
    eligible = [has or (s is not None and source_punctuation[s]) for has, s in zip(lettered, links)]
    sure = further_parts(words, confident(words, alignment, links, eligible), links, alignment, source_stacks, lettered)
    own = [source_stacks[s] if s is not None else None for s in links]
    outer = _prefix(source_stacks) if source_stacks else ()
    out: list[Stack | None] = []
    for t, stack in enumerate(own):
        if stack is None or sure[t]:
            out.append(stack)
            continue
        before = next((own[i] for i in range(t - 1, -1, -1) if sure[i]), outer)
        after = next((own[i] for i in range(t + 1, len(own)) if sure[i]), outer)
        out.append(_prefix([stack, before or (), after or ()]))
    kept = {id(e) for stack in out if stack for e in stack}
    for element in {id(e): e for stack in source_stacks for e in stack}.values():
        if id(element) in kept or not out or element.verbatim:  # a verbatim one replaces no word
            continue
        holders = [s for s, stack in enumerate(source_stacks) if any(e is element for e in stack)]
        wordy = [t for t, has in enumerate(lettered) if has]  # every piece of a word, its bare "▁" too
        pairs = [(t, s) for t in (wordy or range(len(out))) for s in holders]
        t, s = max(pairs, key=lambda ts: alignment[ts[0]][ts[1]])
        for i in (i for i in range(len(out)) if words[i] == words[t]):
            out[i] = source_stacks[s]
        kept |= {id(e) for e in source_stacks[s]}
    return out


def _prefix(stacks: list[Stack]) -> Stack:
    """The elements all `stacks` share, outermost first."""
    n = min(len(s) for s in stacks)
    for other in stacks[1:]:
        n = min(n, _common(stacks[0], other))
    return stacks[0][:n]


def hard_alignment(target_pieces: list[str], alignment: list[list[float]], source: list[str]) -> list[int | None]:
    """Per target token, the source token (of the texts `source`) it is aligned to: the likeliest
    one over all the tokens of its word, so a word keeps its markup whole. A word of punctuation
    alone goes with the likeliest punctuation of the source when there is some: attention puts a
    full stop on the word before it, which would pull the stop into that word's element.
    None when there are no source tokens."""
    n = len(source)
    if n == 0:
        return [None] * len(target_pieces)
    marks = [i for i, text in enumerate(source) if _is_punctuation(text)]
    links: list[int | None] = [None] * len(target_pieces)
    word_start = 0
    for t in range(1, len(target_pieces) + 1):
        if t < len(target_pieces) and not starts_word(target_pieces[t - 1], target_pieces[t]):
            continue
        word = range(word_start, t)
        punctuation = marks and _is_punctuation("".join(target_pieces[i] for i in word))
        candidates = marks if punctuation else range(n)
        _, best = max(((i, s) for i in word for s in candidates), key=lambda pair: alignment[pair[0]][pair[1]])
        for i in word:
            links[i] = best
        word_start = t
    return links


def _is_punctuation(text: str) -> bool:
    text = text.replace("\u2581", "").strip()
    return bool(text) and not any(ch.isalnum() for ch in text)


def starts_word(previous: str, piece: str) -> bool:
    """Whether a target piece begins a word: after a space ('\u2581'), or where a letter or digit
    meets anything else, so that punctuation is a word of its own (as Bergamot's delimiters do)."""
    if previous == "\u2581":  # a space piece alone begins the word of the piece after it
        return False
    if piece.startswith("\u2581") or not previous or not piece:
        return True
    return not (previous[-1].isalnum() and piece[0].isalnum())


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
        common = _common(open_, unit.stack)
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


def _common(a: Stack, b: Stack) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] is b[n]:
        n += 1
    return n
