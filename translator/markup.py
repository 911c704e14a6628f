"""Inline markup (HTML or XML) read out of a text, to be carried through its translation.

`parse_markup` turns marked-up text into plain text in which every character knows the elements
around it (its stack, outermost first), plus the markup that holds no text (void and self-closing
elements such as `<br/>`, empty elements, comments) at its position. `translator.placement` puts
it back into the translation. The text of the attributes a reader sees (ATTRIBUTES: `alt`, `title`,
`placeholder`, `aria-label`, and `value` of a button) is translated too, each value on its own:
`Markup.attributes` lists them, `Markup.with_attributes` writes their translations in.

What is not prose stays as it is. Script, style, math and svg elements (NOT_PROSE) are markup
without text. Code, kbd, samp and var elements (VERBATIM), and any element marked `translate="no"`
(HTML's attribute) or of class `notranslate` (the page translators' convention), keep their text in
the sentence, so that the model translates the words around it as a whole; the element is placed
like any other and written as it stands in place of the target words it wraps.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from html.parser import HTMLParser

from translator.documents import Span

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
# Attributes whose text a reader sees; `value` only of an input that is a button.
ATTRIBUTES = frozenset({"alt", "aria-label", "placeholder", "title"})
BUTTONS = frozenset({"button", "reset", "submit"})
# An attribute of a start tag: its name and, when it has one, its value as written (quotes and all).
ATTRIBUTE = re.compile(r"""([^\s"'<>/=]+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s"'=<>`]+))?""")
# A character reference as html.unescape reads one.
CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


@dataclass(frozen=True, eq=False)
class Element:
    """An element of the source; each one is distinct, even when two are written alike."""

    start_tag: str  # as written: `<a href="x?a=1&amp;b=2">`; a verbatim element: all of it
    name: str  # as written, for the end tag
    verbatim: bool = False  # written whole, in place of its words, and holding nothing else
    text: str = ""  # a verbatim element's plain text
    at: int = -1  # where its start tag begins in the source (-1: not known)

    @property
    def end_tag(self) -> str:
        return "" if self.verbatim else f"</{self.name}>"


Stack = tuple[Element, ...]  # the elements around a character, outermost first


def common_depth(a: Stack, b: Stack) -> int:
    """How many elements, from the outermost, two stacks share."""
    n = 0
    while n < len(a) and n < len(b) and a[n] is b[n]:
        n += 1
    return n


@dataclass(frozen=True)
class Point:
    """Markup that holds no text, at a position of the plain text, inside the elements of `stack`.
    An element copied as it stands, a void element (`<img>`) or an empty one reads as a word:
    `spaced` says whether the source has whitespace before and after it, which the translation
    keeps."""

    position: int
    markup: str
    stack: Stack
    spaced: tuple[bool, bool] = (False, False)
    at: int = -1  # where its markup begins in the source (-1: not known)


@dataclass(frozen=True)
class Attribute:
    """The text of an attribute to translate: in the start tag that begins at `at` of the source,
    its value as written at `span` of that tag (quotes included), `text` once entities are read."""

    at: int
    span: Span
    text: str


@dataclass(frozen=True)
class Markup:
    text: str  # the plain text: tags removed, entities decoded
    stacks: tuple[Stack, ...]  # one per character of text
    points: tuple[Point, ...]  # in order of position
    breaks: tuple[int, ...] = ()  # where a block element begins or ends: split_document's breaks
    origins: tuple[Span, ...] = ()  # per character of text, the characters of the marked-up text it came from
    attributes: tuple[Attribute, ...] = ()  # in source order

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

    def with_attributes(self, texts: Sequence[str]) -> Markup:
        """This markup with the value of each of `attributes` replaced by the text of `texts` at
        its index (its translation), written in double quotes with `&`, `<`, `>` and quotes escaped."""
        if len(texts) != len(self.attributes):
            raise ValueError(f"{len(texts)} texts for {len(self.attributes)} attributes")
        if not texts:
            return self
        edits: dict[int, list[tuple[Span, str]]] = {}
        for attribute, text in zip(self.attributes, texts):
            edits.setdefault(attribute.at, []).append((attribute.span, f'"{html.escape(text)}"'))

        def retag(markup: str, at: int) -> str:
            for (a, b), value in sorted(edits.get(at, ()), reverse=True):
                markup = markup[:a] + value + markup[b:]
            return markup

        elements: dict[int, Element] = {}  # each edited element once, by identity
        stacks: dict[int, Stack] = {}  # by the identity of the old stack, which restore_markup compares

        def edited(e: Element) -> Element:
            if e.at in edits and id(e) not in elements:
                elements[id(e)] = replace(e, start_tag=retag(e.start_tag, e.at))
            return elements.get(id(e), e)

        def restack(stack: Stack) -> Stack:
            if id(stack) not in stacks:
                stacks[id(stack)] = tuple(edited(e) for e in stack)
            return stacks[id(stack)]

        return replace(self, stacks=tuple(restack(s) for s in self.stacks),
                       points=tuple(replace(p, markup=retag(p.markup, p.at), stack=restack(p.stack))
                                    for p in self.points))

    def source_span(self, span: Span) -> Span:
        """The span of the marked-up text that plain `span` came from (tags inside it included)."""
        a, b = span
        if a >= b or not self.origins:
            return span
        return self.origins[a][0], self.origins[b - 1][1]


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
        self.attributes: list[Attribute] = []

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

    def spaced(self, start: int, end: int) -> tuple[bool, bool]:
        """Whether the source has whitespace just before `start` and at `end`."""
        return self.source[start - 1 : start].isspace(), self.source[end : end + 1].isspace()

    def point(self, markup: str, spaced: tuple[bool, bool] = (False, False), at: int = -1) -> None:
        self.points.append(Point(len(self.chars), markup, self.stack, spaced, at))

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if self.verbatim:
            self.verbatim.depth += tag == self.verbatim.name and tag not in VOID
            return
        raw = self.get_starttag_text() or f"<{tag}>"
        self.block_edge(tag)
        at = self.here()
        if tag not in VOID and (tag in NOT_PROSE or tag in VERBATIM or untranslated(attrs)):
            self.verbatim = _Verbatim(tag, at, len(self.chars), prose=tag not in NOT_PROSE)
            return
        if not untranslated(attrs):
            self.attributes += translated_attributes(raw, at)
        if tag in VOID:
            self.point(raw, self.spaced(at, at + len(raw)), at)
            return
        match = TAG_NAME.match(raw)
        self.open.append((Element(raw, match.group(1) if match else tag, at=at), len(self.chars)))

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if self.verbatim:
            return
        self.block_edge(tag)
        raw, at = self.get_starttag_text() or f"<{tag}/>", self.here()
        if not untranslated(attrs):
            self.attributes += translated_attributes(raw, at)
        self.point(raw, self.spaced(at, at + len(raw)), at)

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
        end = self.source.find(">", self.here()) + 1 or len(self.source)
        while len(self.open) > depth:  # elements left open inside it end here
            element, opened = self.open.pop()
            if opened == len(self.chars):  # it held no text: keep it whole at its position
                self.point(element.start_tag + element.end_tag, self.spaced(element.at, end), element.at)

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
        self.point(raw, self.spaced(v.start, end))

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


def translated_attributes(start_tag: str, at: int) -> list[Attribute]:
    """The attributes of `start_tag` (at `at` of the source) whose text is to be translated: those
    of ATTRIBUTES, and `value` of an input button, with a value that has letters or digits. An
    attribute given twice counts once, as HTML reads it."""
    name = TAG_NAME.match(start_tag)
    found: dict[str, re.Match] = {}
    for m in ATTRIBUTE.finditer(start_tag, name.end() if name else 0):
        found.setdefault(m.group(1).lower(), m)
    tag = name.group(1).lower() if name else ""

    def value(m: re.Match | None) -> str:
        written = m.group(2) if m and m.group(2) else ""
        return html.unescape(written[1:-1] if written[:1] in ("'", '"') else written)

    button = tag == "input" and value(found.get("type")).strip().lower() in BUTTONS
    return [Attribute(at, m.span(2), value(m)) for key, m in found.items()
            if m.group(2) and (key in ATTRIBUTES or (key == "value" and button))
            and any(ch.isalnum() for ch in value(m))]


def parse_markup(text: str) -> Markup:
    """Plain text and markup of `text`; an end tag that closes nothing is dropped, and elements
    left open run to the end of the text (one copied as it stands takes the rest)."""
    parser = _Parser(text)
    parser.feed(text)
    parser.close()
    if parser.verbatim:
        parser.end_verbatim(len(text))
    return Markup("".join(parser.chars), tuple(parser.stacks), tuple(parser.points), tuple(parser.breaks),
                  tuple(parser.origins), tuple(parser.attributes))


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
