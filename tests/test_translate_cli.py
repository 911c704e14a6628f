"""nmt-translate and the decoding flags of nmt-evaluate, on a tiny checkpoint saved in the test."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model_config, toy_pairs
from training.cli import evaluate_main
from translator.checkpoint import save_checkpoint
from translator.cli import translate_main
from translator.decoding import DecodeOptions
from translator.model import build_model
from translator.translate import Translator

LINES = ["the red dog runs", "a small cat sleeps on the street", "the man sees"]


@pytest.fixture
def checkpoint(tmp_path: Path, toy_tokenizer, toy_corpus) -> Path:
    torch.manual_seed(0)
    cfg = tiny_model_config()
    config = {"model": dataclasses.asdict(cfg), "data": {"test": toy_corpus["test"], "src_lang": "en",
                                                         "tgt_lang": "de"}}
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, config=config, tokenizer=toy_tokenizer, model=build_model(cfg))
    return path


def translator_of(path: Path) -> Translator:
    from translator.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    return Translator(ckpt.build_model(), ckpt.tokenizer)


def test_file_mode_writes_one_translation_per_line(checkpoint, tmp_path):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    assert translate_main(["--checkpoint", str(checkpoint), "--input", str(src), "--output", str(out),
                           "--beam-size", "3", "--length-penalty", "0.6"]) == 0
    expected = translator_of(checkpoint).translate(LINES, DecodeOptions(beam_size=3, length_penalty=0.6))
    assert out.read_text(encoding="utf-8").splitlines() == [t.text for t in expected]


def test_a_gzip_file_is_read_through_gzip(checkpoint, tmp_path, capsys):
    plain, packed = tmp_path / "in.txt", tmp_path / "in.txt.gz"
    plain.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    outputs = []
    for src in (plain, packed):
        assert translate_main(["--checkpoint", str(checkpoint), "--input", str(src), "--beam-size", "1"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == len(LINES)


class BytesStdin(io.TextIOWrapper):
    """stdin as a terminal or pipe gives it: bytes underneath."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")


@pytest.mark.parametrize("mode", [[], ["--document"]])
def test_input_that_is_not_utf8_is_refused_naming_where(checkpoint, tmp_path, monkeypatch, capsys, mode):
    data = b"the red dog runs\nthe man \xe9 sees\n"
    src = tmp_path / "latin1.txt"
    src.write_bytes(data)
    assert translate_main(["--checkpoint", str(checkpoint), "--input", str(src), *mode]) == 2
    assert capsys.readouterr().err == f"error: {src} is not UTF-8 text: byte 0xe9 at line 2, column 9\n"
    monkeypatch.setattr(sys, "stdin", BytesStdin(data))
    assert translate_main(["--checkpoint", str(checkpoint), *mode]) == 2
    assert capsys.readouterr().err == "error: stdin is not UTF-8 text: byte 0xe9 at line 2, column 9\n"


def test_a_gzip_file_cut_short_is_refused(checkpoint, tmp_path, capsys):
    src = tmp_path / "in.txt.gz"
    src.write_bytes(gzip.compress(("the red dog runs\n" * 500).encode())[:40])
    assert translate_main(["--checkpoint", str(checkpoint), "--input", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src} is not a complete gzip file: ") and err.count("\n") == 1


def test_stdin_mode_writes_to_stdout(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(LINES) + "\n"))
    assert translate_main(["--checkpoint", str(checkpoint), "--beam-size", "1", "--scores"]) == 0
    expected = translator_of(checkpoint).translate(LINES, DecodeOptions())
    got = capsys.readouterr().out.splitlines()
    assert [line.split("\t", 1)[1] for line in got] == [t.text for t in expected]
    assert [float(line.split("\t", 1)[0]) for line in got] == pytest.approx([t.score for t in expected], abs=1e-3)


def test_nbest_output_lists_each_sentence_n_times_best_first(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(LINES)))
    assert translate_main(["--checkpoint", str(checkpoint), "--beam-size", "3", "--n-best", "2"]) == 0
    rows = [line.split(" ||| ") for line in capsys.readouterr().out.splitlines()]
    assert [int(r[0]) for r in rows] == [0, 0, 1, 1, 2, 2]
    for first, second in zip(rows[::2], rows[1::2]):
        assert float(first[2]) >= float(second[2])


def test_attention_picture_is_saved_as_png(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(LINES[0] + "\n"))
    png = tmp_path / "attention.png"
    assert translate_main(["--checkpoint", str(checkpoint), "--max-len-b", "4", "--attention-png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("flags", "name"),
    [(["--beam-size", "0"], "beam_size"), (["--beam-size", "2", "--n-best", "3"], "n_best"),
     (["--length-penalty", "nan"], "length_penalty"), (["--max-len", "-3"], "max_len")],
)
def test_bad_decoding_flags_exit_2_naming_the_option(checkpoint, monkeypatch, capsys, flags, name):
    monkeypatch.setattr(sys, "stdin", io.StringIO(LINES[0]))
    assert translate_main(["--checkpoint", str(checkpoint), *flags]) == 2
    assert capsys.readouterr().err.startswith(f"error: {name} ")


def test_empty_input_gives_empty_output(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert translate_main(["--checkpoint", str(checkpoint)]) == 0
    assert capsys.readouterr().out == ""
    assert translator_of(checkpoint).translate([]) == []


def test_translator_returns_nbest_lists(checkpoint):
    results = translator_of(checkpoint).translate(LINES, DecodeOptions(beam_size=3, n_best=3))
    for r in results:
        assert len(r.nbest) == 3
        assert (r.nbest[0].text, r.nbest[0].score) == (r.text, r.score)
        assert [t.score for t in r.nbest] == sorted((t.score for t in r.nbest), reverse=True)


def test_evaluate_uses_beam_search_by_default(checkpoint, capsys):
    assert evaluate_main([str(checkpoint)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["beam_size"] == 5 and result["sentences"] == len(toy_pairs(20, seed=3))
    assert evaluate_main([str(checkpoint), "--beam-size", "1", "--min-len", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["decoding"]["min_len"] == 2


def test_translations_on_two_workers_equal_one(checkpoint):
    lines = LINES * 5
    one = translator_of(checkpoint)
    one.max_batch_tokens = 24  # several batches
    two = translator_of(checkpoint)
    two.max_batch_tokens, two.workers = 24, 2
    assert len(list(one.batches(one.encode_sources(lines), 3))) > 2
    opts = DecodeOptions(beam_size=3)
    expected, got = one.translate(lines, opts), two.translate(lines, opts)
    assert [t.text for t in got] == [t.text for t in expected]
    assert [t.score for t in got] == pytest.approx([t.score for t in expected], abs=1e-5)


def test_workers_flag_translates_a_file_and_is_checked(checkpoint, tmp_path, capsys):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("\n".join(LINES * 4) + "\n", encoding="utf-8")
    threads = torch.get_num_threads()
    try:
        assert translate_main(["--checkpoint", str(checkpoint), "--input", str(src), "--output", str(out),
                               "--workers", "2", "--max-batch-tokens", "30", "--beam-size", "2"]) == 0
    finally:
        torch.set_num_threads(threads)  # the command divides the process' threads among its workers
    expected = translator_of(checkpoint).translate(LINES * 4, DecodeOptions(beam_size=2))
    assert out.read_text(encoding="utf-8").splitlines() == [t.text for t in expected]
    assert translate_main(["--checkpoint", str(checkpoint), "--input", str(src), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_translator_rejects_zero_workers(checkpoint):
    from translator.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="workers"):
        Translator(ckpt.build_model(), ckpt.tokenizer, workers=0)


CONTENT_FREE = ["\u200b", "\ufeff", "🐕 🙂", "\u0301\u0308", "...!?", "\u200d — ·", ""]


def test_content_free_lines_pass_through_unchanged(checkpoint, tmp_path):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    lines = [LINES[0], *CONTENT_FREE, LINES[1]]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert translate_main(["--checkpoint", str(checkpoint), "--input", str(src), "--output", str(out),
                           "--beam-size", "2", "--n-best", "2", "--min-len", "3"]) == 0
    got = out.read_text(encoding="utf-8").splitlines()
    assert [line for line in got if line.startswith(("1 |||", "7 |||"))] == ["1 ||| \u200b ||| 0.0000",
                                                                            "7 |||  ||| 0.0000"]
    results = translator_of(checkpoint).translate(lines, DecodeOptions(beam_size=2, n_best=2, min_len=3))
    assert [r.text for r in results[1:-1]] == CONTENT_FREE
    assert all(len(r.nbest) == 1 and r.score == 0.0 and r.tokens == [] for r in results[1:-1])
    assert [r.text for r in results[::len(lines) - 1]] == [
        t.text for t in translator_of(checkpoint).translate([LINES[0], LINES[1]], DecodeOptions(beam_size=2))]


def test_target_prefix_flag_starts_every_translation(checkpoint, tmp_path):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    assert translate_main(["--checkpoint", str(checkpoint), "--input", str(src), "--output", str(out),
                           "--beam-size", "2", "--target-prefix", "der hund"]) == 0
    got = out.read_text(encoding="utf-8").splitlines()
    want = translator_of(checkpoint).translate(LINES, DecodeOptions(beam_size=2), target_prefix="der hund")
    assert got == [t.text for t in want] and all(line.startswith("der hund") for line in got)


DOCUMENT = "the red dog runs. a small cat sleeps!\r\n\r\n  the man sees the woman.\n\nthe child eats\n"


def test_document_mode_keeps_the_layout_of_the_file(checkpoint, tmp_path):
    src, out = tmp_path / "doc.txt", tmp_path / "out.txt"
    src.write_bytes(DOCUMENT.encode("utf-8"))
    assert translate_main(["--checkpoint", str(checkpoint), "--input", str(src), "--output", str(out),
                           "--document", "--beam-size", "2"]) == 0
    expected = translator_of(checkpoint).translate_document(DOCUMENT, DecodeOptions(beam_size=2))
    got = out.read_bytes().decode("utf-8")
    assert got == expected.text
    assert got.count("\r\n\r\n  ") == 1 and got.endswith("\n") and len(expected.sentences) == 4


def test_markup_mode_writes_well_formed_markup(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("<p>the <b>red</b> dog runs.<br/>a cat sleeps.</p>"))
    assert translate_main(["--checkpoint", str(checkpoint), "--markup", "--beam-size", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<p>") and out.endswith("</p>") and out.count("<br/>") == 1
    import xml.etree.ElementTree as ET

    ET.fromstring(out)


@pytest.mark.parametrize("flags, message", [
    (["--n-best", "2", "--beam-size", "2"], "--n-best"),
    (["--scores"], "--scores"),
    (["--target-prefix", "ein"], "--target-prefix"),
])
def test_document_mode_refuses_line_flags(checkpoint, flags, message, capsys):
    assert translate_main(["--checkpoint", str(checkpoint), "--document", *flags]) == 2
    assert message in capsys.readouterr().err
