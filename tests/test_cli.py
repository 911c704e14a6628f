"""The offline entry points return 0 on a tiny run and 2 with a named error on bad input."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import tiny_overrides
from training.cli import average_main, evaluate_main, plot_main, train_main
from training.corpus import load_pairs
from training.provenance import code_commit, pairs_sha256
from translator.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_train_evaluate_average_plot_on_a_tiny_run(tmp_path, toy_corpus, capsys):
    run = tmp_path / "run"
    overrides = tiny_overrides(toy_corpus, **{"train.max_steps": 20, "train.valid_every": 10})
    assert train_main(["--config", "cpu", "--out", str(run), *overrides]) == 0
    assert (run / "best.pt").exists() and (run / "tokenizer.model").exists()
    assert any(k.startswith("test_bleu:") for k in load_checkpoint(run / "best.pt").metrics)

    capsys.readouterr()
    assert evaluate_main([str(run / "best.pt"), "--beam-size", "1", "--output", str(tmp_path / "hyp.txt")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sentences"] == 20 and 0.0 <= result["bleu"] <= 100.0
    assert result["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert len((tmp_path / "hyp.txt").read_text().splitlines()) == 20

    assert average_main([str(run), "--last", "2", "--out", str(tmp_path / "avg.pt")]) == 0
    assert plot_main([str(run), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_train_with_a_bad_override_returns_2_and_names_the_key(tmp_path, capsys):
    assert train_main(["--out", str(tmp_path / "run"), "model.n_heads=7"]) == 2
    assert "model.n_heads" in capsys.readouterr().err


def test_an_output_under_a_file_returns_2_naming_it(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder would go")
    assert train_main(["--config", "cpu", "--out", str(blocker / "run")]) == 2
    assert capsys.readouterr().err == f"error: --out {blocker / 'run'} is, or lies in, a file rather than a folder\n"


def test_evaluate_with_a_missing_checkpoint_returns_2(tmp_path, capsys):
    assert evaluate_main([str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_plot_without_metrics_returns_2(tmp_path, capsys):
    assert plot_main([str(tmp_path)]) == 2
    assert "no metrics file" in capsys.readouterr().err


def test_every_checkpoint_of_a_run_records_its_provenance(tmp_path, toy_corpus, capsys):
    run = tmp_path / "run"
    overrides = tiny_overrides(toy_corpus, **{"train.max_steps": 20, "train.valid_every": 10})
    assert train_main(["--config", "cpu", "--out", str(run), *overrides]) == 0
    pairs = load_pairs(toy_corpus["train"], "en", "de")
    corpus_sha256 = pairs_sha256(pairs["src"], pairs["tgt"])
    commit, _ = code_commit(ROOT)
    steps = {}
    for path in [*sorted((run / "checkpoints").glob("step_*.pt")), run / "best.pt"]:
        ckpt = load_checkpoint(path)
        prov = ckpt.provenance
        assert ckpt.verified and prov.created and prov.code_commit == commit
        assert set(prov.versions) >= {"torch", "sentencepiece", "sacrebleu"}
        assert (prov.corpus, prov.corpus_sha256) == (toy_corpus["train"], corpus_sha256)
        assert prov.valid_bleu == ckpt.metrics["valid_bleu"]
        steps[path.name] = prov.step
    assert steps["step_0000010.pt"] == 10 and steps["step_0000020.pt"] == 20
    best = load_checkpoint(run / "best.pt")
    assert best.provenance.step in (10, 20)  # its own step, though it holds no training state
    assert best.provenance.valid_bleu == max(load_checkpoint(p).provenance.valid_bleu
                                             for p in (run / "checkpoints").glob("step_*.pt"))
    (score,) = best.provenance.test_scores  # nmt-train scores best.pt on data.test at the end
    assert score.test == toy_corpus["test"] and score.beam_size == 1 and score.bleu_signature

    assert evaluate_main([str(run / "best.pt"), "--beam-size", "2", "--record"]) == 0
    assert [s.beam_size for s in load_checkpoint(run / "best.pt").provenance.test_scores] == [1, 2]
    assert average_main([str(run), "--last", "2", "--out", str(tmp_path / "avg.pt")]) == 0
    avg = load_checkpoint(tmp_path / "avg.pt").provenance
    assert avg.step == 20 and avg.valid_bleu is None and not avg.test_scores
    assert [a.partition(":")[0] for a in avg.averaged_from] == ["step_0000010.pt@10", "step_0000020.pt@20"]
    assert avg.corpus_sha256 == corpus_sha256
