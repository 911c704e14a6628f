"""Every corrupt or malformed checkpoint is refused by nmt-serve, nmt-translate and nmt-evaluate with
one line naming the file and the problem: no traceback, no torch advice, a non-zero exit."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model_config
from training.cli import evaluate_main
from translator.checkpoint import load_checkpoint, save_checkpoint
from translator.cli import translate_main
from translator.model import build_model
from translator.serve_cli import serve_main

ROOT = Path(__file__).resolve().parents[1]


def good_checkpoint(path: Path, tokenizer, corpus: dict[str, str], **model_changes) -> Path:
    torch.manual_seed(0)
    cfg = tiny_model_config()
    model = build_model(cfg)
    config = {"model": dataclasses.asdict(dataclasses.replace(cfg, **model_changes)),
              "data": {"test": corpus["test"], "src_lang": "en", "tgt_lang": "de"}}
    save_checkpoint(path, config=config, tokenizer=tokenizer, model=model)
    return path


def rewrite_payload(path: Path, **changes) -> None:
    """Replace members of a checkpoint's payload, digests left as they were."""
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, **changes}, path)


def truncated(path, tok, corpus):
    data = good_checkpoint(path, tok, corpus).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flipped_weight_byte(path, tok, corpus):
    good_checkpoint(path, tok, corpus)
    weight = load_checkpoint(path).model_state["embed.tokens.weight"]
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    data[at + weight.numel() * 2] ^= 0x01  # one bit of one value, mid-tensor: still a finite float
    path.write_bytes(bytes(data))


def nan_weights(path, tok, corpus):
    good_checkpoint(path, tok, corpus)
    ckpt = load_checkpoint(path)
    state = dict(ckpt.model_state)
    name = "encoder.layers.0.feed_forward.w_1.weight"
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    save_checkpoint(path, config=ckpt.config, tokenizer=ckpt.tokenizer, model=state)


def config_not_matching_weights(path, tok, corpus):
    good_checkpoint(path, tok, corpus, d_model=48, n_heads=4)


def config_a_list(path, tok, corpus):
    save_checkpoint(path, config=[1, 2, 3], tokenizer=tok, model=build_model(tiny_model_config()))


def tokenizer_as_text(path, tok, corpus):
    good_checkpoint(path, tok, corpus)
    rewrite_payload(path, tokenizer=tok.model_bytes.decode("latin-1"))


def empty_file(path, tok, corpus):
    path.write_bytes(b"")


def directory(path, tok, corpus):
    path.mkdir()


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def malicious_pickle(path, tok, corpus):
    torch.save({"format_version": 2, "config": "{}", "x": Evil()}, path)


def config_file(path, tok, corpus):
    path.write_text((ROOT / "training" / "configs" / "cpu.yaml").read_text())


def gzip_file(path, tok, corpus):
    path.write_bytes(gzip.compress(b"a man rides a horse .\n"))


def tokenizer_file(path, tok, corpus):
    path.write_bytes(tok.model_bytes)


def foreign_zip(path, tok, corpus):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")


# case -> (how to build the bad file, words the error must hold)
CASES = {
    "truncated": (truncated, "not a complete torch archive"),
    "flipped_weight_byte": (flipped_weight_byte, "is corrupt: weights sha256"),
    "nan_weights": (nan_weights, "'encoder.layers.0.feed_forward.w_1.weight' holds NaN"),
    "config_not_matching_weights": (config_not_matching_weights, "the model config does not match the weights"),
    "config_a_list": (config_a_list, "its config is a list, expected a mapping"),
    "tokenizer_as_text": (tokenizer_as_text, "its tokenizer is a str"),
    "empty_file": (empty_file, "is empty (0 bytes)"),
    "directory": (directory, "is a directory"),
    "malicious_pickle": (malicious_pickle, "pickled objects that are not tensors or plain data"),
    "config_file": (config_file, "is not a torch checkpoint: it is text (it begins '#"),
    "gzip_file": (gzip_file, "is not a torch checkpoint: it holds gzip-compressed data"),
    "tokenizer_file": (tokenizer_file, "is not a torch checkpoint: it begins with bytes b'\\n"),
    "foreign_zip": (foreign_zip, "a zip archive, but not one torch.save wrote"),
}


def run_serve(path: Path) -> int:
    return serve_main(["--checkpoint", str(path), "--port", "0"])


def run_translate(path: Path) -> int:
    return translate_main(["--checkpoint", str(path), "--beam-size", "1"])


def run_evaluate(path: Path) -> int:
    return evaluate_main([str(path), "--beam-size", "1"])


COMMANDS = {"nmt-serve": run_serve, "nmt-translate": run_translate, "nmt-evaluate": run_evaluate}


@pytest.fixture
def bad(request, tmp_path, toy_tokenizer, toy_corpus) -> tuple[Path, str]:
    build, words = CASES[request.param]
    path = tmp_path / f"{request.param}.pt"
    build(path, toy_tokenizer, toy_corpus)
    return path, words


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("bad", sorted(CASES), indirect=True)
def test_malformed_checkpoint_gives_one_line_error(bad, command, capsys, monkeypatch):
    path, words = bad
    monkeypatch.setattr(sys, "stdin", io.StringIO("the red dog runs\n"))
    rc = COMMANDS[command](path)
    err = capsys.readouterr().err
    assert rc != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert str(path) in errors[0] and words in errors[0], errors[0]
    assert "Traceback" not in err and "weights_only" not in err
    if command != "nmt-serve":  # nmt-serve logs its start-up at INFO before loading
        assert err.count("\n") == 1, err


def test_the_error_is_the_only_output_of_the_installed_command(tmp_path, toy_tokenizer, toy_corpus):
    """A fresh process: no torch warning or traceback reaches stderr beside the error."""
    path = tmp_path / "evil.pt"
    malicious_pickle(path, toy_tokenizer, toy_corpus)
    script = "import sys; from translator.cli import translate_main; sys.exit(translate_main())"
    proc = subprocess.run([sys.executable, "-c", script, "--checkpoint", str(path)], input="", text=True, check=False,
                          capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"error: checkpoint {path} is unreadable: it holds pickled objects that are not "
                           "tensors or plain data (") and line.endswith("); refused"), line
    assert "posix.system" in line and "weights_only" not in line
    assert proc.stdout == ""

