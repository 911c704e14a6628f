"""BLEU of document translation against sentence-by-sentence translation of the same sentences.

Takes the first `--sentences` lines of a test set, joins every `--paragraph` of them with a space
into a paragraph and the paragraphs with blank lines into one document, translates it with
`Translator.translate_document` (sentences split by sentencex, all in one batch) and the lines one
by one as a list with `Translator.translate`, with the same decoding options. The document's
output is split back into the test set's lines through the source spans the result carries: each
output sentence goes to the line its source starts in (when the splitter joins two lines, the
second gets nothing and counts as a miss). Prints both sacreBLEU scores and their difference.

A caption without closing punctuation (about 5% of Multi30K) runs into the next one in a paragraph;
with `--full-stops` (the default) such a line gets a full stop in the document, as it would have in
running text. The references are never changed.

Quick check:  python benchmarks/document_bleu.py CKPT --sentences 20 --beam-size 1
Full run:     python benchmarks/document_bleu.py CKPT --json document_bleu.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import sacrebleu

from translator.cli import add_decoding_flags, decoding_options
from translator.documents import DocumentLimits, Span
from translator.translate import Translator

DATA = Path("/work/shared/data/multi30k")
CLOSING = (".", "!", "?", '"', "'", ")")


def read_lines(path: Path, n: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.strip() for line, _ in zip(f, range(n))]


def build_document(lines: list[str], paragraph: int, full_stops: bool) -> tuple[str, list[Span]]:
    """The lines as paragraphs of `paragraph` sentences, and each line's span in the document."""
    text, spans = "", []
    for i, line in enumerate(lines):
        if full_stops and not line.endswith(CLOSING):
            line += "."
        if i:
            text += "\n\n" if i % paragraph == 0 else " "
        spans.append((len(text), len(text) + len(line)))
        text += line
    return text, spans


def resplit(sentences, line_spans: list[Span]) -> list[str]:
    """Each output sentence given to the line its source starts in."""
    out: list[list[str]] = [[] for _ in line_spans]
    for s in sentences:
        line = next(i for i, (a, b) in enumerate(line_spans) if a <= s.source[0] < b)
        out[line].append(s.text)
    return [" ".join(parts) for parts in out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--src", type=Path, default=DATA / "test_2016_flickr.en.gz")
    p.add_argument("--ref", type=Path, default=DATA / "test_2016_flickr.de.gz")
    p.add_argument("--lang", default="en", help="source language, for the sentence splitter")
    p.add_argument("--sentences", type=int, default=200)
    p.add_argument("--paragraph", type=int, default=5, help="sentences per paragraph")
    p.add_argument("--full-stops", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", type=Path, help="write the figures here")
    add_decoding_flags(p)
    args = p.parse_args(argv)
    from translator.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    translator = Translator(ckpt.build_model(), ckpt.tokenizer)
    opts = decoding_options(args)
    lines, refs = read_lines(args.src, args.sentences), read_lines(args.ref, args.sentences)
    by_sentence = [t.text for t in translator.translate(lines, opts)]
    text, line_spans = build_document(lines, args.paragraph, args.full_stops)
    result = translator.translate_document(text, opts, args.lang, DocumentLimits(max_chars=len(text) + 1,
                                                                                 max_sentences=10 * len(lines)))
    by_document = resplit(result.sentences, line_spans)
    sentence_bleu = sacrebleu.corpus_bleu(by_sentence, [refs]).score
    document_bleu = sacrebleu.corpus_bleu(by_document, [refs]).score
    figures = {
        "sentences": len(lines),
        "document_sentences": len(result.sentences),
        "lines_without_output": sum(not h for h in by_document),
        "identical_outputs": sum(a == b for a, b in zip(by_sentence, by_document)),
        "sentence_bleu": round(sentence_bleu, 2),
        "document_bleu": round(document_bleu, 2),
        "document_bleu_minus_sentence_bleu": round(document_bleu - sentence_bleu, 2),
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
