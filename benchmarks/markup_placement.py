"""Markup placement on real sentences: cases printed for a person to judge, and automatic checks.

Takes `--sentences` lines of a test set (from `--start`), wraps one word of each (its longest
word, the first of equal length) in an element, `<b>`, `<i>` or `<a href="...">` in turn, and
translates each with `Translator.translate_document(..., markup=True)`. Prints every case as
`index | source | output` for a person to mark whether the element wraps the translation of
that word; counts automatically the outputs that parse as XML (well-formed) and those where the
element is present around some text.

Two ways to add the share placed right, `markup_tags_placed_rate`:
- `--sheet FILE` writes `index | source | translation` with the translation's tags taken out, for
  a person who has not seen where the service put them; they add a fourth column, the words of
  that translation they would wrap (`a || b` for either, `-` where no words render the wrapped
  ones; the source column may be dropped once filled in), and `--reference FILE [FILE ...]` compares the service's element with theirs, one
  share per person and their mean. A case whose translation is no longer the one judged is
  counted as stale, not judged.
- `--judgments FILE` (one line per case: its index and y or n): a person's verdict on each
  printed case.

Quick check:  python benchmarks/markup_placement.py CKPT --sentences 5 --beam-size 1
Full run:     python benchmarks/markup_placement.py CKPT --json markup.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from translator.cli import add_decoding_flags, decoding_options
from translator.translate import Translator

DATA = Path("/work/shared/data/multi30k")
ELEMENTS = [("<b>", "</b>"), ("<i>", "</i>"), ('<a href="https://example.com/?q=1&amp;r=2">', "</a>")]


def wrap(line: str, index: int) -> str:
    """`line` with its longest word wrapped in the element for case `index`."""
    word = max(re.finditer(r"[^\W\d_]+", line), key=lambda m: len(m.group()))
    start, end = ELEMENTS[index % len(ELEMENTS)]
    return line[: word.start()] + start + word.group() + end + line[word.end():]


def wrapped_text(output: str) -> str | None:
    """The text inside the output's element, None when the output is not well-formed XML or
    holds no element with text."""
    try:
        root = ET.fromstring(f"<root>{output}</root>")
    except ET.ParseError:
        return None
    texts = ["".join(e.itertext()).strip() for e in root if e.tag in ("b", "i", "a")]
    return " | ".join(t for t in texts if t) or None


def plain_text(output: str) -> str:
    """The output with its markup taken out (entities decoded), as a reader sees it."""
    try:
        return "".join(ET.fromstring(f"<root>{output}</root>").itertext())
    except ET.ParseError:
        return output


def words(text: str) -> str:
    """`text` compared by its words: case folded, punctuation around words dropped."""
    return " ".join(w for w in (t.strip(".,;:!?\"'„“”‚‘’«»()") for t in text.casefold().split()) if w)


def read_reference(path: Path) -> dict[int, tuple[str, list[str]]]:
    """Case index -> (the translation judged, the word spans a person would wrap; [] for none),
    from lines `index | source | translation | words` or `index | translation | words`."""
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(" | ")]
        if len(fields) not in (3, 4) or not fields[0].isdigit() or not fields[-1]:
            raise SystemExit(f"{path}:{number}: expected 'index | [source |] translation | words', got {line!r}")
        spans = [] if fields[-1] == "-" else [words(s) for s in fields[-1].split("||")]
        out[int(fields[0])] = (fields[-2], spans)
    return out


def matches_reference(output: str, judged: tuple[str, list[str]]) -> bool | None:
    """Whether the output's element wraps words a person chose; None when the translation is not
    the one they judged."""
    translation, spans = judged
    if plain_text(output).strip() != translation:
        return None
    inside = wrapped_text(output)
    return inside is not None and words(inside) in spans


def read_judgments(path: Path) -> dict[int, bool]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            index, verdict = line.split()[:2]
            out[int(index)] = verdict.lower().startswith("y")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--src", type=Path, default=DATA / "test_2016_flickr.en.gz")
    p.add_argument("--lang", default="en", help="source language, for the sentence splitter")
    p.add_argument("--start", type=int, default=0, help="first line used")
    p.add_argument("--sentences", type=int, default=50)
    verdict_source = p.add_mutually_exclusive_group()
    verdict_source.add_argument("--judgments", type=Path, help="lines 'INDEX y|n': a person's verdict per case")
    verdict_source.add_argument("--reference", type=Path, nargs="+", help="filled-in --sheet files, one per person")
    p.add_argument("--sheet", type=Path, help="write the cases, translations without tags, for a person")
    p.add_argument("--json", type=Path, help="write the figures here")
    add_decoding_flags(p)
    args = p.parse_args(argv)
    from translator.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    translator = Translator(ckpt.build_model(), ckpt.tokenizer)
    opts = decoding_options(args)
    with gzip.open(args.src, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f][args.start : args.start + args.sentences]
    references = {path.name: read_reference(path) for path in args.reference or ()}
    well_formed = placed = 0
    sheet, verdicts = [], {name: {} for name in references}
    for i, line in enumerate(lines):
        source = wrap(line, i)
        output = translator.translate_document(source, opts, args.lang, markup=True).text
        inside = wrapped_text(output)
        well_formed += _parses(output)
        placed += inside is not None
        sheet.append(f"{i} | {source} | {plain_text(output).strip()} | ")
        marks = []
        for name, reference in references.items():
            if i in reference:
                verdicts[name][i] = matches_reference(output, reference[i])
                marks.append(f"{name}: {_VERDICT[verdicts[name][i]]}")
        print(" | ".join([f"{i} | {source} | {output}", *marks]))
    if args.sheet:
        args.sheet.write_text("\n".join(sheet) + "\n", encoding="utf-8")
    figures = {"cases": len(lines), "well_formed_rate": round(well_formed / len(lines), 3),
               "tag_around_text_rate": round(placed / len(lines), 3)}
    if args.judgments:
        verdicts = {args.judgments.name: read_judgments(args.judgments)}
    if verdicts:
        rates = {}
        for name, marks in verdicts.items():
            judged = [v for v in marks.values() if v is not None]
            figures[f"{name}: judged"] = len(judged)
            figures[f"{name}: stale"] = len(marks) - len(judged)
            rates[name] = sum(judged) / max(len(judged), 1)
            figures[f"{name}: placed_rate"] = round(rates[name], 3)
        figures["markup_tags_placed_rate"] = round(sum(rates.values()) / len(rates), 3)
    for key, value in figures.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


_VERDICT = {True: "as judged", False: "NOT as judged", None: "stale: not the translation judged"}


def _parses(output: str) -> bool:
    try:
        ET.fromstring(f"<root>{output}</root>")
    except ET.ParseError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
