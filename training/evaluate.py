"""Score a checkpoint on a test set with sacreBLEU (BLEU and chrF, detokenized, cased)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import sacrebleu

from training.corpus import load_pairs
from translator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from translator.cli import TranslateBackend
from translator.decoding import DecodeOptions
from translator.provenance import TestScore, utc_now
from translator.translate import Translator

if TYPE_CHECKING:
    from translator.client import ServerBackend


def evaluate_checkpoint(
    path: Path,
    test: str | None = None,
    options: DecodeOptions | None = None,
    output: Path | None = None,
    record: bool = False,
) -> dict:
    """Translate the test set with `options` (default: DecodeOptions(), greedy) and score it.

    nmt-evaluate passes beam search (beam 5) unless told otherwise.
    """
    opts = options or DecodeOptions()
    ckpt = load_checkpoint(path)
    data = ckpt.config["data"]
    spec = test or data["test"]
    translator = Translator(ckpt.build_model(), ckpt.tokenizer, opts)
    result = evaluate(translator, spec, data["src_lang"], data["tgt_lang"], opts, output)
    if record:
        record_scores(path, ckpt, result)
        print(f"{spec}: BLEU {result['bleu']} chrF {result['chrf']} ({result['bleu_signature']})")
    return result


def record_scores(path: Path, ckpt: Checkpoint, result: dict) -> None:
    """Rewrite the checkpoint (atomically, digests renewed) with the scores in its metrics and
    provenance; a score of the same test set and beam size is replaced."""
    spec, beam = result["test"], result["beam_size"]
    metrics = {**ckpt.metrics, f"test_bleu:{spec}:beam{beam}": result["bleu"],
               f"test_chrf:{spec}:beam{beam}": result["chrf"]}
    score = TestScore(test=spec, bleu=result["bleu"], chrf=result["chrf"], beam_size=beam,
                      bleu_signature=result["bleu_signature"], date=utc_now())
    save_checkpoint(path, config=ckpt.config, tokenizer=ckpt.tokenizer, model=ckpt.model_state,
                    train_state=ckpt.train_state, metrics=metrics, provenance=ckpt.provenance.with_test_score(score))


def evaluate_server(backend: ServerBackend, test: str, options: DecodeOptions | None = None,
                    output: Path | None = None) -> dict:
    """Translate the test set through a running server and score it as `evaluate_checkpoint` does;
    the language pair is the one the server reports."""
    model = backend.info.model
    if not (model.source_language and model.target_language):
        raise ValueError("the server does not report its language pair (its checkpoint records none)")
    result = evaluate(backend, test, model.source_language, model.target_language, options or DecodeOptions(),
                      output)
    return {**result, "server_model": model.name, "server_checkpoint_sha256": model.checkpoint_sha256}


def evaluate(backend: TranslateBackend, spec: str, src_lang: str, tgt_lang: str, opts: DecodeOptions,
             output: Path | None) -> dict:
    """Translate test set `spec` with backend (a Translator or a server's) and score it with sacreBLEU."""
    pairs = load_pairs(spec, src_lang, tgt_lang)
    start = time.perf_counter()
    hyps = [t.text for t in backend.translate(list(pairs["src"]), opts)]
    seconds = time.perf_counter() - start
    refs = [list(pairs["tgt"])]
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hyps, refs), chrf.corpus_score(hyps, refs)
    if output:
        output.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    return {
        "test": spec,
        "direction": f"{src_lang}-{tgt_lang}",
        "beam_size": opts.beam_size,
        "decoding": dict(vars(opts)),
        "sentences": len(hyps),
        "bleu": round(b.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": round(c.score, 2),
        "chrf_signature": str(chrf.get_signature()),
        "translate_seconds": round(seconds, 2),
    }
