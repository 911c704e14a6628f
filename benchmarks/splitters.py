"""Sentence splitters compared: sentencex, pysbd and syntok on Multi30K sentences joined into paragraphs.

Takes the first `--sentences` lines of a Multi30K split per language, joins every `--paragraph`
consecutive sentences with one space into a paragraph, splits each paragraph with every splitter
and counts:
- boundaries: F1 of the predicted sentence starts inside paragraphs against the true ones;
- exact: the share of true sentences that come back as one segment, surrounding spaces aside;
- speed: sentences split per second (median of `--repeats` passes over all paragraphs).

Multi30K lines are image captions; about 5% end without a full stop, and no splitter can find the
boundary after those (they count against every splitter alike). Captions hold few abbreviations or
numbers, so a second set, `hard`, holds hand-written sentences with abbreviations, ordinals,
decimals, initials, quotes and ellipses (HARD below), joined into paragraphs the same way.

Quick check:  python benchmarks/splitters.py --sentences 50 --repeats 1
Full run:     python benchmarks/splitters.py --json splitters.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

Splitter = Callable[[str], list[tuple[int, int]]]
DATA = Path("/work/shared/data/multi30k")


def spans_of(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Character spans of `pieces` found in order in `text`, surrounding whitespace left out."""
    spans, cursor = [], 0
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        start = text.find(piece, cursor)
        if start < 0:  # a splitter that changed the text: the piece counts as wrong
            continue
        spans.append((start, start + len(piece)))
        cursor = start + len(piece)
    return spans


# Sentences a splitter can get wrong: abbreviations, ordinals, decimals, initials, quotes, ellipses.
HARD = {
    "en": [
        "Dr. Smith paid $3.50 for two apples at 5 p.m. yesterday.", "He left at once.",
        "The U.S. Army arrived on Jan. 5 with Gen. Patton.", "She said \"Stop!\" and ran.",
        "Wait... what happened next?", "Mr. and Mrs. J. R. Ewing live at No. 4 Elm St. in Dallas.",
        "Prices rose 2.5% in Q3, i.e. faster than expected.", "Why not?",
        "See Fig. 3 and Sec. 2.1 for details.", "It was approx. 10 km long.",
    ],
    "de": [
        "Er kam z. B. am 3. Mai um 10 Uhr an.", "Dr. Müller war auch da.",
        "Das kostet ca. 3,50 Euro, d. h. fast nichts.", "Sie rief: „Halt!“ und lief weg.",
        "Am 24. Dezember ist Heiligabend.", "Was nun?",
        "Die Firma Meier & Co. KG hat ihren Sitz in der Hauptstr. 5.", "Es war ein langer Tag...",
        "Prof. Dr. Schmidt hielt einen Vortrag.", "Das ist usw. bekannt.",
    ],
    "fr": [
        "M. Dupont est arrivé à 10 h 30.", "Il pleut depuis le 3 mai.",
        "« Bonjour ! » dit-il en entrant.", "Mme Durand a payé 3,50 € pour ces pommes.",
        "Voir p. 12 et suiv. pour les détails.", "Quoi ?",
        "Le Dr Martin travaille à l'hôpital St. Louis.", "C'était long... vraiment long.",
        "Le XIXe s. fut riche en inventions.", "Il est parti, etc. et nous sommes restés.",
    ],
}


def make_splitters(lang: str) -> dict[str, Splitter]:
    import pysbd
    import sentencex
    import syntok.segmenter as syntok_segmenter

    segmenter = pysbd.Segmenter(language=lang, clean=False)

    def syntok_split(text: str) -> list[str]:
        return ["".join(t.spacing + t.value for t in s) for p in syntok_segmenter.analyze(text) for s in p]

    return {
        "sentencex": lambda text: spans_of(text, list(sentencex.segment(lang, text))),
        "pysbd": lambda text: spans_of(text, segmenter.segment(text)),
        "syntok": lambda text: spans_of(text, syntok_split(text)),
    }


def paragraphs(lines: list[str], size: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """Paragraphs of `size` sentences joined by a space, each with its true sentence spans."""
    out = []
    for i in range(0, len(lines), size):
        text, spans = "", []
        for line in lines[i : i + size]:
            if text:
                text += " "
            spans.append((len(text), len(text) + len(line)))
            text += line
        out.append((text, spans))
    return out


def score(split: Splitter, paras: list[tuple[str, list[tuple[int, int]]]]) -> dict[str, float]:
    hits = predicted = true = exact = sentences = 0
    for text, gold in paras:
        spans = split(text)
        gold_starts = {s for s, _ in gold[1:]}
        pred_starts = {s for s, _ in spans[1:]}
        hits += len(gold_starts & pred_starts)
        predicted += len(pred_starts)
        true += len(gold_starts)
        exact += len(set(gold) & set(spans))
        sentences += len(gold)
    precision, recall = hits / max(predicted, 1), hits / max(true, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    return {"precision": precision, "recall": recall, "f1": f1, "exact": exact / sentences}


def speed(split: Splitter, paras: list[tuple[str, list[tuple[int, int]]]], repeats: int) -> float:
    sentences = sum(len(g) for _, g in paras)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for text, _ in paras:
            split(text)
        times.append(time.perf_counter() - start)
    return sentences / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--langs", default="en,de,fr")
    p.add_argument("--split", default="val", help="Multi30K split")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--sentences", type=int, default=300, help="sentences per language")
    p.add_argument("--paragraph", type=int, default=5, help="sentences per paragraph")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    rows = []
    print("| lang | set | splitter | boundary P | boundary R | boundary F1 | exact sentences | sentences/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for lang in args.langs.split(","):
        with gzip.open(args.data / f"{args.split}.{lang}.gz", "rt", encoding="utf-8") as f:
            lines = [line.strip() for line, _ in zip(f, range(args.sentences))]
        for corpus, paras in (("multi30k", paragraphs(lines, args.paragraph)),
                              ("hard", paragraphs(HARD[lang], args.paragraph))):
            for name, split in make_splitters(lang).items():
                row = {"lang": lang, "set": corpus, "splitter": name, **score(split, paras),
                       "sentences_per_s": speed(split, paras, args.repeats)}
                rows.append(row)
                print(f"| {lang} | {corpus} | {name} | {row['precision']:.3f} | {row['recall']:.3f} "
                      f"| {row['f1']:.3f} | {row['exact']:.3f} | {row['sentences_per_s']:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
