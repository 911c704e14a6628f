"""Checkpoints: round trip, atomic writes, and loading without unpickling arbitrary objects."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model_config
from translator.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from translator.config import to_dict
from translator.model import build_model


def write(path: Path, tokenizer, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_model_config()
    model = build_model(cfg)
    save_checkpoint(path, config={"model": to_dict(cfg)}, tokenizer=tokenizer, model=model, **extra)
    return model


def test_checkpoint_alone_rebuilds_model_and_tokenizer(tmp_path, toy_tokenizer):
    model = write(tmp_path / "c.pt", toy_tokenizer, metrics={"valid_bleu": 12.5})
    ckpt = load_checkpoint(tmp_path / "c.pt")
    rebuilt = ckpt.build_model()
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name
    assert ckpt.tokenizer.model_bytes == toy_tokenizer.model_bytes
    assert ckpt.metrics == {"valid_bleu": 12.5}


def test_overwrite_killed_midway_leaves_previous_checkpoint_loadable(tmp_path, toy_tokenizer):
    """SIGKILL a process while it rewrites the file over and over; the file always loads."""
    path = tmp_path / "latest.pt"
    write(path, toy_tokenizer)
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from translator.checkpoint import load_checkpoint, save_checkpoint
ckpt = load_checkpoint({str(path)!r})
big = {{**ckpt.model_state, "ballast": torch.randn(4_000_000)}}  # ~16 MB: writes take a while
print("ready", flush=True)
while True:
    save_checkpoint({str(path)!r}, config=ckpt.config, tokenizer=ckpt.tokenizer, model=big)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    ckpt = load_checkpoint(path)  # a complete old or a complete new file, never a torn one
    assert ckpt.tokenizer.model_bytes == toy_tokenizer.model_bytes
    assert set(ckpt.model_state) - {"ballast"} == set(build_model(tiny_model_config()).state_dict())


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, toy_tokenizer):
    path = tmp_path / "c.pt"
    write(path, toy_tokenizer)
    before = path.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, config={"model": {}}, tokenizer=toy_tokenizer, model={},
                        train_state={"x": Unsaveable()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"format_version": 1, "x": Evil()}, f)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_missing_and_foreign_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "trunc.pt")
