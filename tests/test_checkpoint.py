"""Checkpoints: round trip, digests, provenance, file modes, atomic writes, and loading without
unpickling arbitrary objects."""

from __future__ import annotations

import errno
import json
import logging
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
from training.checkpoints import CheckpointDir
from translator import provenance
from translator.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_checkpoint_metadata,
    save_checkpoint,
)
from translator.config import to_dict
from translator.digest import tensors_sha256
from translator.info_cli import info_main
from translator.model import build_model
from translator.provenance import Provenance


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


def test_metadata_equals_the_full_load_without_the_weights(tmp_path, toy_tokenizer):
    write(tmp_path / "c.pt", toy_tokenizer, metrics={"valid_bleu": 12.5})
    full, meta = load_checkpoint(tmp_path / "c.pt"), load_checkpoint_metadata(tmp_path / "c.pt")
    assert meta.model_state == {} and meta.train_state is None
    assert (meta.config, meta.metrics, meta.provenance, meta.weights_sha256, meta.verified) == (
        full.config, full.metrics, full.provenance, full.weights_sha256, full.verified)
    assert meta.tokenizer.model_bytes == full.tokenizer.model_bytes


def test_metadata_refuses_a_changed_part_as_the_full_load_does(tmp_path, toy_tokenizer):
    path = tmp_path / "c.pt"
    write(path, toy_tokenizer)
    payload = torch.load(path, weights_only=True)
    for part, value in (("config", payload["config"].replace("32", "33", 1)),
                        ("tokenizer", payload["tokenizer"].clone().flip(0))):
        torch.save({**payload, part: value}, path)
        with pytest.raises(CheckpointError, match=f"is corrupt: {part} sha256"):
            load_checkpoint_metadata(path)


def test_overwrite_killed_midway_leaves_previous_checkpoint_loadable(tmp_path, toy_tokenizer):
    """SIGKILL a process while it rewrites the file over and over; the file always loads."""
    path = tmp_path / "latest.pt"
    write(path, toy_tokenizer)
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from translator.checkpoint import load_checkpoint, save_checkpoint
ckpt = load_checkpoint({str(path)!r})
ballast = {{"ballast": torch.randn(4_000_000)}}  # ~16 MB: writes take a while
print("ready", flush=True)
while True:
    save_checkpoint({str(path)!r}, config=ckpt.config, tokenizer=ckpt.tokenizer, model=ckpt.model_state,
                    train_state=ballast)
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
    assert set(ckpt.model_state) == set(build_model(tiny_model_config()).state_dict())


def test_a_temp_file_left_by_a_killed_save_changes_nothing(tmp_path, toy_tokenizer):
    """What a save killed mid-write leaves: a partial `.NAME.RANDOM.tmp` beside the checkpoints."""
    run = CheckpointDir(tmp_path, keep_last=2)
    write(run.dir / "step_0000010.pt", toy_tokenizer)
    whole = (run.dir / "step_0000010.pt").read_bytes()
    for name in (".step_0000020.pt.0123456789ab.tmp", ".best.pt.0123456789ab.tmp"):
        (run.dir / name).write_bytes(whole[: len(whole) // 3])
    assert run.latest() == run.dir / "step_0000010.pt"
    load_checkpoint(run.latest())
    write(run.dir / "step_0000010.pt", toy_tokenizer, seed=1)  # the next save of the same name
    assert load_checkpoint(run.latest()).train_state is None


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


def test_a_full_disk_keeps_the_previous_file_and_names_the_one_it_could_not_write(tmp_path, toy_tokenizer):
    path = tmp_path / "c.pt"
    write(path, toy_tokenizer)
    before = path.read_bytes()

    def fill_the_disk(f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as e:
        atomic_write(path, fill_the_disk)
    assert str(e.value) == f"cannot write {path}: {os.strerror(errno.ENOSPC)}"
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    with pytest.raises(OSError, match=f"cannot write {path}/x.pt: {path} is, or lies in, a file rather than a folder"):
        atomic_write(path / "x.pt", fill_the_disk)


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


def test_weights_digest_depends_on_values_names_and_shapes_not_storage():
    a = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(4)}
    same = {"b": torch.zeros(8)[:4], "w": torch.arange(12.0).reshape(4, 3).t().contiguous().t().reshape(3, 4)}
    assert tensors_sha256(a) == tensors_sha256(same)
    assert tensors_sha256(a) == tensors_sha256({"w": a["w"].t().contiguous().t(), "b": a["b"]})
    changed = {**a, "w": a["w"].clone()}
    changed["w"][2, 3] = 11.000001
    renamed = {"w2": a["w"], "b": a["b"]}
    reshaped = {**a, "w": a["w"].reshape(4, 3)}
    retyped = {**a, "b": torch.zeros(4, dtype=torch.float64)}
    digests = {tensors_sha256(d) for d in (a, changed, renamed, reshaped, retyped)}
    assert len(digests) == 5


def test_any_changed_part_is_reported_as_corrupt(tmp_path, toy_tokenizer):
    """A part rewritten behind the digests' back: the error names the part."""
    path = tmp_path / "c.pt"
    write(path, toy_tokenizer, metrics={"valid_bleu": 12.5})
    payload = torch.load(path, weights_only=True)
    for part, value in (("metrics", '{"valid_bleu": 99.0}'), ("config", payload["config"].replace("32", "33", 1)),
                        ("tokenizer", payload["tokenizer"].clone().flip(0))):
        torch.save({**payload, part: value}, path)
        with pytest.raises(CheckpointError, match=f"is corrupt: {part} sha256"):
            load_checkpoint(path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_take_the_process_umask(tmp_path, toy_tokenizer, umask, mode):
    old = os.umask(umask)
    try:
        write(tmp_path / "c.pt", toy_tokenizer)
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == mode


def test_provenance_round_trips_and_is_covered_by_the_digests(tmp_path, toy_tokenizer):
    prov = Provenance(step=40, created="2026-01-02T03:04:05+00:00", code_commit="a" * 40, code_dirty=False,
                      versions={"torch": "2.13.0"}, corpus="file:train.tsv", corpus_sha256="b" * 64,
                      valid_bleu=21.5, test_scores=(provenance.TestScore("file:test.tsv", 20.1, 45.2, 5, "nrefs:1"),))
    write(tmp_path / "c.pt", toy_tokenizer, provenance=prov)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt.provenance == prov and ckpt.verified
    assert ckpt.weights_sha256 == tensors_sha256(ckpt.model_state)
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    torch.save({**payload, "provenance": payload["provenance"].replace("40", "41")}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="provenance sha256"):
        load_checkpoint(tmp_path / "c.pt")


def test_format1_checkpoint_without_digests_loads_with_a_warning(tmp_path, toy_tokenizer, caplog):
    """The layout written before digests and provenance: still served, flagged as unverified."""
    torch.manual_seed(0)
    cfg = tiny_model_config()
    model = build_model(cfg)
    payload = {"format_version": 1, "config": json.dumps({"model": to_dict(cfg)}),
               "tokenizer": torch.frombuffer(bytearray(toy_tokenizer.model_bytes), dtype=torch.uint8),
               "model": model.state_dict(), "train_state": None, "metrics": "{}"}
    torch.save(payload, tmp_path / "old.pt")
    with caplog.at_level(logging.WARNING, logger="translator.checkpoint"):
        ckpt = load_checkpoint(tmp_path / "old.pt")
    assert not ckpt.verified and ckpt.provenance == Provenance()
    assert "without digests" in caplog.text
    model_state = ckpt.build_model().state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in model.state_dict().items())


def test_nmt_info_prints_the_verified_provenance(tmp_path, toy_tokenizer, capsys):
    write(tmp_path / "c.pt", toy_tokenizer, provenance=Provenance(step=7, corpus="file:x.tsv"))
    assert info_main([str(tmp_path / "c.pt")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] and out["provenance"] == {"step": 7, "corpus": "file:x.tsv"}
    assert out["tokenizer_sha256"] == toy_tokenizer.sha256
    assert info_main([str(tmp_path / "none.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")
