"""A run's life: stopping on patience, the best checkpoint, reruns, interrupts and resumes, the
files a killed write leaves, and the checkpoints a wsd run averages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sacrebleu

from tests.conftest import tiny_overrides
from training.average import average_run
from training.checkpoints import CheckpointDir
from training.config import load_config
from training.trainer import Trainer
from translator.checkpoint import CheckpointError, load_checkpoint
from translator.translate import Translator

ROOT = Path(__file__).resolve().parents[1]


def train(out, corpus, logs: list | None = None, **extra) -> Trainer:
    cfg = load_config("cpu", tiny_overrides(corpus, **extra))
    trainer = Trainer(cfg, out, log=logs.append if logs is not None else lambda *_: None)
    trainer.run()
    return trainer


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_patience_stops_the_run(tmp_path, toy_corpus):
    # A learning rate too small to change a translation: no validation after the first is better.
    tr = train(tmp_path / "run", toy_corpus, **{"train.lr": 1e-9, "train.valid_every": 3, "train.patience": 2,
                                                "train.max_steps": 100})
    assert tr.state.step == 9 and tr.state.bad_validations == 2 and tr.state.best_step == 3


def test_best_checkpoint_holds_the_best_validation_bleu(tmp_path, toy_corpus):
    run = tmp_path / "run"
    tr = train(run, toy_corpus, **{"train.lr": 3e-3, "train.valid_every": 10, "train.max_steps": 60})
    valid = [r for r in records(run) if "valid_bleu" in r]
    best = max(valid, key=lambda r: r["valid_bleu"])
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt.metrics["valid_bleu"] == best["valid_bleu"] == tr.state.best_bleu
    # Its weights translate the validation split to that score.
    srcs, refs = list(tr.valid_data["src"]), list(tr.valid_data["tgt"])
    hyps = [t.text for t in Translator(ckpt.build_model(), ckpt.tokenizer).translate(srcs)]
    assert sacrebleu.corpus_bleu(hyps, [refs]).score == best["valid_bleu"]


def test_rerunning_a_finished_run_is_a_no_op(tmp_path, toy_corpus):
    run = tmp_path / "run"
    train(run, toy_corpus, **{"train.max_steps": 12, "train.valid_every": 5})
    before = snapshot(run)
    logs: list[str] = []
    again = train(run, toy_corpus, logs, **{"train.max_steps": 12, "train.valid_every": 5})
    assert again.steps_run == 0 and again.state.step == 12
    assert any("nothing to do" in line for line in logs)
    assert snapshot(run) == before


def test_a_spent_time_budget_stays_spent_on_a_rerun(tmp_path, toy_corpus):
    run = tmp_path / "run"
    first = train(run, toy_corpus, **{"train.max_minutes": 0.01, "train.valid_every": 1000})
    assert first.steps_run > 0 and first.state.elapsed_s >= 0.6
    again = train(run, toy_corpus, **{"train.max_minutes": 0.01, "train.valid_every": 1000})
    assert again.steps_run == 0


def test_a_resume_logs_no_step_twice_and_removes_partial_writes(tmp_path, toy_corpus):
    run = tmp_path / "run"
    common = {"train.valid_every": 10, "train.log_every": 1}
    train(run, toy_corpus, **common, **{"train.max_steps": 14})
    # As if killed after step 14 was logged but before its checkpoint was complete.
    (run / "checkpoints" / "step_0000014.pt").rename(run / "checkpoints" / ".step_0000014.pt.k2j4x9q_.tmp")
    (run / ".best.pt.ab12cd34.tmp").write_bytes(b"half a checkpoint")
    (run / "notes.tmp").write_text("not ours")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 15, "train_lo')  # a line cut short
    logs: list[str] = []
    tr = train(run, toy_corpus, logs, **common, **{"train.max_steps": 16})
    assert any("resumed from" in line and "at step 10" in line for line in logs)
    assert tr.state.step == 16
    assert not list(run.rglob(".*.tmp")) and (run / "notes.tmp").exists()
    steps = [r["step"] for r in records(run) if "train_loss" in r]
    assert steps == list(range(1, 17))
    assert [r["step"] for r in records(run) if "valid_bleu" in r] == [10, 16]


def test_a_corrupt_newest_checkpoint_is_passed_over_for_the_one_before(tmp_path, toy_corpus):
    run = tmp_path / "run"
    common = {"train.valid_every": 5, "train.log_every": 1}
    train(run, toy_corpus, **common, **{"train.max_steps": 14})
    newest = run / "checkpoints" / "step_0000014.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the middle of the weights
    newest.write_bytes(bytes(data))
    logs: list[str] = []
    tr = train(run, toy_corpus, logs, **common, **{"train.max_steps": 16})
    assert any(line.startswith("cannot resume from step_0000014.pt: ") and "is corrupt" in line
               and "set aside as step_0000014.pt.unreadable" in line for line in logs), logs
    assert any("resumed from" in line and "at step 10" in line for line in logs)
    assert tr.state.step == 16
    assert (run / "checkpoints" / "step_0000014.pt.unreadable").read_bytes() == bytes(data)
    assert [p.name for p in CheckpointDir(run, 5).steps()][-2:] == ["step_0000015.pt", "step_0000016.pt"]
    assert [r["step"] for r in records(run) if "train_loss" in r] == list(range(1, 17))


def test_a_run_whose_step_checkpoints_are_all_unreadable_is_an_error_naming_them(tmp_path, toy_corpus):
    run = tmp_path / "run"
    train(run, toy_corpus, **{"train.valid_every": 5, "train.max_steps": 10})
    for p in CheckpointDir(run, 5).steps():
        p.write_bytes(b"PK\x03\x04 not any more")
    with pytest.raises(CheckpointError, match=r"none of the 2 step checkpoints under .* can be read \(each set aside"):
        train(run, toy_corpus, **{"train.valid_every": 5, "train.max_steps": 12})
    assert not CheckpointDir(run, 5).steps() and len(list((run / "checkpoints").glob("*.unreadable"))) == 2


def test_sigterm_saves_the_state_and_the_run_resumes_from_there(tmp_path, toy_corpus):
    run = tmp_path / "run"
    args = ["--out", str(run), "--no-test", *tiny_overrides(toy_corpus, **{
        "train.max_steps": 100_000, "train.valid_every": 1000, "train.log_every": 1})]
    code = "import sys; from training.cli import train_main; sys.exit(train_main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and sum("train_loss" in x for x in (run / "metrics.jsonl").open()) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted at step" in err
    last = max(r["step"] for r in records(run))
    saved = CheckpointDir(run, 5).latest()
    assert saved is not None and load_checkpoint(saved).train_state["state"]["step"] == last >= 3
    logs: list[str] = []
    tr = train(run, toy_corpus, logs, **{"train.max_steps": last + 2, "train.valid_every": 1000})
    assert any(f"at step {last}" in line for line in logs) and tr.steps_run == 2


def test_a_token_budget_ends_the_run_annealed_once_that_many_target_tokens_are_trained_on(tmp_path, toy_corpus):
    run = tmp_path / "run"
    logs: list[str] = []
    first = train(run, toy_corpus, logs, **{"train.schedule": "wsd", "train.max_target_tokens": 6000, "train.warmup_steps": 2,
                                            "train.valid_every": 1000, "train.log_every": 1})
    st = first.state
    per_step = st.tokens_seen / st.step
    assert 6000 <= st.tokens_seen < 6000 + 2 * per_step  # stops at the first step past the budget
    assert any("reached train.max_target_tokens=6000" in line for line in logs)
    lrs = [r["lr"] for r in records(run) if "train_loss" in r]
    assert lrs[-1] < 0.1 * max(lrs)  # the decay knew where the run would end
    again = train(run, toy_corpus, **{"train.schedule": "wsd", "train.max_target_tokens": 6000})
    assert again.steps_run == 0


def test_a_wsd_run_averages_the_checkpoints_of_its_decay_phase(tmp_path, toy_corpus):
    run = tmp_path / "run"
    train(run, toy_corpus, **{"train.schedule": "wsd", "train.max_steps": 40, "train.decay_fraction": 0.2,
                              "train.valid_every": 10, "train.keep_last": 10, "train.log_every": 1})
    lrs = {r["step"]: r["lr"] for r in records(run) if "train_loss" in r}
    assert lrs[20] == lrs[32] == 1e-3 and lrs[36] < lrs[34] < 1e-3 and lrs[40] == 0.0
    saved = {int(p.stem[5:]): load_checkpoint(p).metrics["decay"] for p in CheckpointDir(run, 10).steps()}
    # Validations at 20 and 30; in the decay (steps 33-40) a checkpoint a step, to fill keep_last.
    assert saved == {20: False, 30: False, **{s: True for s in range(33, 41)}}
    averaged = average_run(run, 10, tmp_path / "avg.pt")
    assert [int(p.stem[5:]) for p in averaged] == list(range(33, 41))
