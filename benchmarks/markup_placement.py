"""Markup placement on real sentences: cases printed for a person to judge, and automatic checks.

Takes `--sentences` lines of a test set (from `--start`), wraps one word of each (its longest
word, the first of equal length) in an element, `<b>`, `<i>` or `<a href="...">` in turn, and
translates each with `Translator.translate_document(..., markup=True)`. Prints every case as
`index | source | output` for a person to mark whether the element wraps the translation of
that word; counts automatically the outputs that parse as XML (well-formed) and those where the
element is present around some text. `--judgments FILE` (one line per case: its index and y or n)
adds the share judged right, `markup_tags_placed_rate`.

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
    p.add_argument("--judgments", type=Path, help="lines 'INDEX y|n': a person's verdict per case")
    p.add_argument("--json", type=Path, help="write the figures here")
    add_decoding_flags(p)
    args = p.parse_args(argv)
    from translator.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    translator = Translator(ckpt.build_model(), ckpt.tokenizer)
    opts = decoding_options(args)
    with gzip.open(args.src, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f][args.start : args.start + args.sentences]
    well_formed = placed = 0
    for i, line in enumerate(lines):
        source = wrap(line, i)
        output = translator.translate_document(source, opts, args.lang, markup=True).text
        inside = wrapped_text(output)
        well_formed += _parses(output)
        placed += inside is not None
        print(f"{i} | {source} | {output}")
    figures = {"cases": len(lines), "well_formed_rate": round(well_formed / len(lines), 3),
               "tag_around_text_rate": round(placed / len(lines), 3)}
    if args.judgments:
        verdicts = read_judgments(args.judgments)
        figures["judged"] = len(verdicts)
        figures["markup_tags_placed_rate"] = round(sum(verdicts.values()) / max(len(verdicts), 1), 3)
    for key, value in figures.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


def _parses(output: str) -> bool:
    try:
        ET.fromstring(f"<root>{output}</root>")
    except ET.ParseError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
