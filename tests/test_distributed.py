"""Data-parallel training: two gloo processes under torchrun train exactly like one process on
their combined batches, and a two-process run resumes exactly, with two processes or with one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides
from training.config import load_config
from training.distributed import local_launch_command, world_from_env
from training.trainer import Trainer
from translator.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 600  # a launch needs ~20 s of CPU, but a busy 2-core machine may take minutes


def run_overrides(corpus: dict[str, str], **extra: object) -> list[str]:
    # No dropout: the processes draw different masks, which would make the runs differ.
    return tiny_overrides(corpus, **{
        "model.n_layers": 1, "model.dropout": 0.0, "train.max_tokens": 150, "train.valid_every": 1,
        "train.valid_bleu_sentences": 4, "train.keep_last": 10, **extra,
    })


def torchrun(out: Path, overrides: list[str], nproc: int = 2) -> None:
    """`nmt-train` in `nproc` gloo processes on the CPU; fails the test with their output."""
    cmd = local_launch_command(nproc, ["--config", "cpu", "--out", str(out), "--no-test", *overrides])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    try:
        done = subprocess.run(
            cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S}s:\n{e.stdout}\n{e.stderr}")
    if done.returncode:
        pytest.fail(f"torchrun exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


def train_in_process(out: Path, overrides: list[str]) -> None:
    Trainer(load_config("cpu", overrides), out, log=lambda *_: None).run()


def checkpoint(run: Path, step: int):
    return load_checkpoint(run / "checkpoints" / f"step_{step:07d}.pt")


def assert_same_training(a: Path, b: Path, step: int) -> None:
    ca, cb = checkpoint(a, step), checkpoint(b, step)
    position = ("step", "epoch", "batch_in_epoch", "tokens_seen")
    assert [ca.train_state["state"][k] for k in position] == [cb.train_state["state"][k] for k in position]
    for name, wa in ca.model_state.items():
        torch.testing.assert_close(wa, cb.model_state[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_corpus_module):
    """A two-process run of 2 steps (then a copy of it), and one process accumulating 2 batches
    a step for 3 steps: the same global batches and the same effective batch."""
    base = tmp_path_factory.mktemp("ddp")
    ddp, ref = base / "ddp", base / "reference"
    torchrun(ddp, run_overrides(toy_corpus_module, **{"train.max_steps": 2}))
    shutil.copytree(ddp, base / "ddp-copy")
    train_in_process(ref, run_overrides(toy_corpus_module, **{"train.max_steps": 3, "train.accum_steps": 2}))
    return {"ddp": ddp, "copy": base / "ddp-copy", "ref": ref, "corpus": toy_corpus_module}


@pytest.fixture(scope="module")
def toy_corpus_module(tmp_path_factory):
    from tests.conftest import toy_pairs, write_tsv

    d = tmp_path_factory.mktemp("corpus")
    return {
        "train": "file:" + str(write_tsv(d / "train.tsv", toy_pairs(400, seed=1))),
        "valid": "file:" + str(write_tsv(d / "valid.tsv", toy_pairs(20, seed=2))),
        "test": "file:" + str(write_tsv(d / "test.tsv", toy_pairs(20, seed=3))),
    }


def test_two_process_step_equals_one_process_step_on_the_combined_batch(runs):
    assert_same_training(runs["ddp"], runs["ref"], step=1)
    assert_same_training(runs["ddp"], runs["ref"], step=2)
    ts = checkpoint(runs["ddp"], 2).train_state
    assert len(ts["rank_rngs"]) == 2  # each process's dropout stream, for an exact resume


def test_two_process_run_resumes_exactly(runs):
    torchrun(runs["ddp"], run_overrides(runs["corpus"], **{"train.max_steps": 3}))
    assert_same_training(runs["ddp"], runs["ref"], step=3)


def test_two_process_checkpoint_resumes_in_one_process(runs):
    # The data position counts batches of all processes, so one process accumulating two
    # batches a step carries on where two processes stopped.
    train_in_process(runs["copy"], run_overrides(runs["corpus"], **{"train.max_steps": 3, "train.accum_steps": 2}))
    assert_same_training(runs["copy"], runs["ref"], step=3)


def test_only_rank_zero_writes_metrics(runs):
    records = [json.loads(line) for line in (runs["ddp"] / "metrics.jsonl").read_text().splitlines()]
    valid_steps = [r["step"] for r in records if "valid_bleu" in r]
    assert valid_steps[:2] == [1, 2] and len(valid_steps) == len(set(valid_steps))


def test_a_process_without_torchrun_is_a_world_of_one():
    world = world_from_env({})
    assert (world.rank, world.size, world.is_main) == (0, 1, True)
    assert world.all_sum([1.0, 2.5]) == [1.0, 2.5]
    assert world.broadcast("x") == "x" and world.gather("x") == ["x"]


def test_torchrun_environment_gives_rank_and_size():
    world = world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (world.rank, world.local_rank, world.size, world.is_main) == (3, 1, 4, False)
    with pytest.raises(ValueError, match="RANK=4"):
        world_from_env({"WORLD_SIZE": "4", "RANK": "4"})
