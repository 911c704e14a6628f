"""The training loop: batching, schedule, overfitting a toy task, exact resume, averaging."""

from __future__ import annotations

import json

import datasets
import pytest
import sacrebleu
import torch

from tests.conftest import tiny_overrides, toy_pairs
from training.average import average_run
from training.config import load_config
from training.data import BatchSource, SubwordSampling, collate, token_batches
from training.trainer import Trainer
from translator.checkpoint import CheckpointError, load_checkpoint
from translator.translate import Translator


def test_token_batches_cover_each_pair_once_within_budget():
    lens = [3, 9, 4, 12, 7, 7, 2, 15, 5, 8] * 20
    batches = token_batches(lens, lens[::-1], max_tokens=60, seed=3, epoch=0)
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(len(lens)))
    for b in batches:
        assert len(b) * max(max(lens[i], lens[::-1][i]) + 1 for i in b) <= 60 or len(b) == 1


def test_token_batches_of_equal_longest_sides_group_target_lengths():
    """Where the longest side ties, batches hold targets of one length: the least padding."""
    tgt = [1 + i % 10 for i in range(40)]
    batches = token_batches([10] * 40, tgt, max_tokens=44, seed=0, epoch=0)  # 4 pairs of 11 tokens a batch
    assert all(len({tgt[i] for i in b}) == 1 for b in batches)


def test_token_batches_depend_only_on_seed_and_epoch():
    lens = list(range(1, 50))
    assert token_batches(lens, lens, 40, 1, 2) == token_batches(lens, lens, 40, 1, 2)
    assert token_batches(lens, lens, 40, 1, 2) != token_batches(lens, lens, 40, 1, 3)


def toy_split(tokenizer, n=200):
    """A training split as `training.data.tokenize` makes it: text and best-segmentation ids."""
    pairs = toy_pairs(n, seed=1)
    src, tgt = [s for s, _ in pairs], [t for _, t in pairs]
    return datasets.Dataset.from_dict({
        "src": src, "tgt": tgt, "src_ids": tokenizer.encode(src), "tgt_ids": tokenizer.encode(tgt),
    })


def sampled_source(tokenizer, ds, alpha=0.1, max_len=128):
    return BatchSource(ds, 200, seed=1, bos=1, eos=2, pad=0, sampling=SubwordSampling(tokenizer, alpha, max_len, 3.0))


def test_subword_sampling_segments_each_epoch_anew_and_the_same_after_a_restart(toy_tokenizer):
    ds = toy_split(toy_tokenizer)
    source = sampled_source(toy_tokenizer, ds)
    batches0, ids0 = source.epoch(0), (source.src_ids, source.tgt_ids)
    batches1, ids1 = source.epoch(1), (source.src_ids, source.tgt_ids)
    assert ids0 != ids1 and ids0[1] != ds["tgt_ids"]  # another draw each epoch, not the best segmentation
    for src_ids, tgt_ids in (ids0, ids1):  # every draw spells the same text
        assert toy_tokenizer.decode(src_ids) == ds["src"] and toy_tokenizer.decode(tgt_ids) == ds["tgt"]
    restarted = sampled_source(toy_tokenizer, ds)  # a resumed run asks for epoch 1 first
    assert restarted.epoch(1) == batches1 and (restarted.src_ids, restarted.tgt_ids) == ids1
    first = batches1[0]  # collated from the segmentation of the epoch asked for
    want = collate([ids1[0][i] for i in first], [ids1[1][i] for i in first], 1, 2, 0)
    assert restarted.collate(first).tgt_out.tolist() == want.tgt_out.tolist()
    assert restarted.epoch(0) == batches0 and (restarted.src_ids, restarted.tgt_ids) == ids0


def test_subword_sampling_keeps_the_best_segmentation_of_a_pair_whose_draw_is_too_long(toy_tokenizer):
    ds = toy_split(toy_tokenizer)
    longest = max(len(x) for side in ("src_ids", "tgt_ids") for x in ds[side])
    source = sampled_source(toy_tokenizer, ds, alpha=0.05, max_len=longest)
    source.epoch(0)
    kept = [i for i in range(len(ds)) if (source.src_ids[i], source.tgt_ids[i]) == (ds["src_ids"][i], ds["tgt_ids"][i])]
    assert 0 < len(kept) < len(ds)
    assert max(map(len, source.src_ids + source.tgt_ids)) <= longest


def test_teacher_forcing_shifts_target_by_the_start_token():
    b = collate([[5, 6]], [[7, 8, 9]], bos=1, eos=2, pad=0)
    assert b.src.tolist() == [[5, 6, 2]]
    assert b.tgt_in.tolist() == [[1, 7, 8, 9]]
    assert b.tgt_out.tolist() == [[7, 8, 9, 2]]
    assert b.n_tokens == 4


def train(out, corpus, **extra):
    cfg = load_config("cpu", tiny_overrides(corpus, **extra))
    trainer = Trainer(cfg, out, log=lambda *_: None)
    trainer.run()
    return trainer


def test_overfits_a_toy_word_for_word_task(tmp_path, toy_corpus):
    trainer = train(tmp_path / "run", toy_corpus, **{
        "train.max_steps": 300, "train.lr": 3e-3, "train.valid_every": 100, "model.dropout": 0.0,
        "model.d_model": 64, "model.d_ff": 128, "train.label_smoothing": 0.0,
    })
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_nll"] for r in records if "train_nll" in r]
    assert losses[-1] < 0.2 < losses[0]
    pairs = toy_pairs(400, seed=1)[:50]  # the start of the training split
    hyps = [t.text for t in Translator(trainer.model, trainer.tokenizer).translate([s for s, _ in pairs])]
    assert sacrebleu.corpus_bleu(hyps, [[t for _, t in pairs]]).score > 80


@pytest.mark.parametrize("data", [{}, {"data.subword_alpha": 0.1}], ids=["best segmentation", "subword sampling"])
def test_resume_continues_exactly(tmp_path, toy_corpus, data):
    """N steps, stop, resume to 2N gives the same weights as 2N steps in one go (dropout on; with
    subword sampling, across an epoch's new segmentation)."""
    common = {"model.dropout": 0.2, "train.valid_every": 100, **data}
    straight = train(tmp_path / "straight", toy_corpus, **common, **{"train.max_steps": 24})
    train(tmp_path / "split", toy_corpus, **common, **{"train.max_steps": 12})
    resumed = train(tmp_path / "split", toy_corpus, **common, **{"train.max_steps": 24})
    assert resumed.state.step == 24
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_a_changed_model(tmp_path, toy_corpus):
    train(tmp_path / "run", toy_corpus, **{"train.max_steps": 3})
    with pytest.raises(CheckpointError, match="model.d_ff differs"):
        train(tmp_path / "run", toy_corpus, **{"train.max_steps": 6, "model.d_ff": 32})


def test_keeps_last_k_and_best(tmp_path, toy_corpus):
    train(tmp_path / "run", toy_corpus, **{"train.max_steps": 25, "train.valid_every": 5, "train.keep_last": 2})
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_0000020.pt", "step_0000025.pt"]
    assert load_checkpoint(tmp_path / "run" / "best.pt").train_state is None


def test_average_of_checkpoints_is_their_mean(tmp_path, toy_corpus):
    train(tmp_path / "run", toy_corpus, **{"train.max_steps": 10, "train.valid_every": 5})
    paths = average_run(tmp_path / "run", 2, tmp_path / "avg.pt")
    a, b = (load_checkpoint(p).model_state for p in paths)
    avg = load_checkpoint(tmp_path / "avg.pt").model_state
    key = "encoder.layers.0.feed_forward.w_1.weight"
    torch.testing.assert_close(avg[key], (a[key] + b[key]) / 2)


def test_missing_corpus_file_fails_at_start_naming_it(tmp_path, toy_corpus):
    corpus = {**toy_corpus, "train": f"file:{tmp_path / 'missing.tsv'}"}
    with pytest.raises(Exception, match="missing.tsv"):
        train(tmp_path / "run", corpus, **{"train.max_steps": 1})
