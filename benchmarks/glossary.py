"""Glossaries on Multi30K test_2016_flickr en->de: how often required terms appear, what they do to
BLEU, and what constrained beam search costs against plain beam search.

The glossary comes from the references by a fixed rule, one to two terms per sentence:
  1. the reference is forced through the model (a forced target prefix, with alignments), which
     gives each reference token's cross-attention over the source tokens;
  2. reference words (SentencePiece word pieces joined, punctuation stripped) of at least four
     letters that are not German stop words are ranked longest first (ties: first in the sentence);
     the first two are taken;
  3. each is aligned to the source word (its pieces joined) that its tokens attend to most, summed
     over the word's tokens and the source word's pieces; a term is kept when that source word has
     at least three letters, is not an English stop word, and no earlier term of the sentence has it.
Each term is (source word, reference word), and applies to its own sentence only (the same source
word may need different German forms in different captions). A term counts as used when its target
word occurs in the translation as a whole word, case-sensitively.

Figures (JSON with --json): glossary_term_use_rate (terms used / terms, constrained), the same
share for plain beam search, BLEU of both and glossary_bleu_delta (constrained - plain), and
glossary_speed_ratio: plain decoding time / constrained decoding time over all sentences, both at
--beam-size and in length-sorted batches of --batch-size (1.0: as fast as plain).

    python benchmarks/glossary.py runs/bench/best.pt --json glossary.json
    python benchmarks/glossary.py runs/bench/best.pt --limit 100        # a quick look
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import time
from pathlib import Path

import sacrebleu
import torch

from translator.checkpoint import load_checkpoint
from translator.decoding import DecodeOptions, search
from translator.glossary import Term
from translator.translate import Translator

DATA = Path("/work/shared/data/multi30k")
GERMAN_STOP = frozenset(["aber", "alle", "allem", "allen", "aller", "alles", "als", "also", "auch", "auf", "aus", "bei", "beim", "bin", "bis", "bist", "dabei", "dadurch", "damit", "dann", "darauf", "das", "dass", "dem", "den", "denen", "der", "des", "die", "dies", "diese", "diesem", "diesen", "dieser", "dieses", "doch", "dort", "durch", "ein", "eine", "einem", "einen", "einer", "eines", "einige", "einigen", "etwas", "euer", "für", "gegen", "gibt", "hat", "hatte", "hinter", "ich", "ihm", "ihn", "ihr", "ihre", "ihrem", "ihren", "ihrer", "im", "in", "ist", "jede", "jedem", "jeden", "jeder", "jedes", "kann", "kein", "keine", "mit", "nach", "neben", "nicht", "noch", "nur", "ob", "oder", "ohne", "sehr", "sein", "seine", "seinem", "seinen", "seiner", "sich", "sie", "sind", "so", "über", "um", "und", "uns", "unter", "viel", "vom", "von", "vor", "während", "was", "weil", "wenn", "wer", "wie", "wir", "wird", "wo", "zu", "zum", "zur", "zwei", "drei", "vier", "einem", "eines", "neben", "etwas", "gerade"])
ENGLISH_STOP = frozenset(["a", "about", "above", "after", "again", "against", "all", "an", "and", "any", "are", "as", "at", "be", "been", "before", "being", "below", "between", "both", "but", "by", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his", "how", "into", "is", "it", "its", "just", "more", "most", "near", "next", "nor", "not", "now", "of", "off", "on", "once", "only", "or", "other", "out", "over", "own", "same", "she", "so", "some", "such", "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with", "you", "your", "two", "three", "four", "one", "while"])


def read(name: str, limit: int | None) -> list[str]:
    with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return lines[:limit] if limit else lines


def words_of(pieces: list[str]) -> list[tuple[str, list[int]]]:
    """SentencePiece pieces grouped into words: (the word without punctuation, its piece positions)."""
    words: list[tuple[str, list[int]]] = []
    for i, piece in enumerate(pieces):
        if piece.startswith("▁") or not words:
            words.append(("", []))
        text, at = words[-1]
        words[-1] = (text + piece.lstrip("▁"), at + [i])
    return [(re.sub(r"\W", "", text), at) for text, at in words]


def glossaries(tr: Translator, sources: list[str], refs: list[str], batch_size: int) -> list[list[Term]]:
    """The rule of the module docstring: per sentence, its terms."""
    tok = tr.tokenizer
    src_ids, ref_ids = tr.encode_sources(sources), tok.encode(refs)
    opts = DecodeOptions(alignment=True, max_len=tr.model.cfg.max_positions - 1)
    out = []
    for start in range(0, len(sources), batch_size):
        rows = range(start, min(start + batch_size, len(sources)))
        hyps = search(tr.model, tr.source_batch([src_ids[i] for i in rows]), opts, prefix=[ref_ids[i] for i in rows])
        out += [sentence_terms(tok.pieces(src_ids[i][:-1]), tok.pieces(ref_ids[i]), nbest[0].alignment)
                for i, nbest in zip(rows, hyps.nbest)]
    return out


def sentence_terms(src_pieces: list[str], ref_pieces: list[str], attention: torch.Tensor) -> list[Term]:
    """Terms of one sentence from the reference's cross-attention (reference tokens, source tokens + EOS)."""
    src_words = words_of(src_pieces)
    ranked = sorted((w for w in words_of(ref_pieces) if len(w[0]) >= 4 and w[0].isalpha()
                     and w[0].lower() not in GERMAN_STOP), key=lambda w: -len(w[0]))
    terms: list[Term] = []
    for target, at in ranked[:2]:
        mass = attention[at].sum(dim=0)  # (source tokens + EOS,)
        source_word = max(src_words, key=lambda w: float(mass[w[1]].sum()))[0]
        taken = {t.source.lower() for t in terms}
        if len(source_word) >= 3 and source_word.isalpha() and source_word.lower() not in ENGLISH_STOP | taken:
            terms.append(Term(source_word, target))
    return terms


def decode(tr: Translator, sources: list[str], opts: DecodeOptions, batch_size: int,
           phrases: list[list[list[int]]] | None) -> tuple[list[str], float]:
    """Translations of sources in length-sorted batches, and the seconds the searches took."""
    ids = tr.encode_sources(sources)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    seconds = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        begin = time.perf_counter()
        hyps = tr.decode([ids[i] for i in batch], opts, (), [phrases[i] for i in batch] if phrases else None)
        seconds += time.perf_counter() - begin
        for i, text in zip(batch, tr.tokenizer.decode(hyps.tokens)):
            out[i] = text
    return out, seconds


def use_rate(outputs: list[str], terms: list[list[Term]]) -> float:
    used = [re.search(rf"(?<!\w){re.escape(t.target)}(?!\w)", out) is not None
            for out, ts in zip(outputs, terms) for t in ts]
    return sum(used) / max(1, len(used))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, help="the first N sentences only")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    tr = Translator(ckpt.build_model(), ckpt.tokenizer)
    sources, refs = read("test_2016_flickr.en.gz", args.limit), read("test_2016_flickr.de.gz", args.limit)
    terms = glossaries(tr, sources, refs, args.batch_size)
    phrases = [tr.tokenizer.encode([t.target for t in ts]) if ts else [] for ts in terms]
    opts = DecodeOptions(beam_size=args.beam_size)
    decode(tr, sources[: args.batch_size], opts, args.batch_size, None)  # warm-up
    plain, plain_s = decode(tr, sources, opts, args.batch_size, None)
    glossed, glossed_s = decode(tr, sources, opts, args.batch_size, phrases)
    bleu = [sacrebleu.corpus_bleu(out, [refs]).score for out in (plain, glossed)]
    figures = {
        "sentences": len(sources), "terms": sum(map(len, terms)),
        "glossary_term_use_rate": round(use_rate(glossed, terms), 4),
        "plain_term_use_rate": round(use_rate(plain, terms), 4),
        "bleu_plain": round(bleu[0], 2), "bleu_glossary": round(bleu[1], 2),
        "glossary_bleu_delta": round(bleu[1] - bleu[0], 2),
        "plain_seconds": round(plain_s, 2), "glossary_seconds": round(glossed_s, 2),
        "glossary_speed_ratio": round(plain_s / glossed_s, 3),
        "beam_size": args.beam_size, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "examples": [{"source": s, "terms": [[t.source, t.target] for t in ts], "plain": a, "glossary": b}
                     for s, ts, a, b in list(zip(sources, terms, plain, glossed))[:5]],
    }
    text = json.dumps(figures, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
