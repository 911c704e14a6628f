"""Streaming a corpus larger than the batcher's buffer: every pair once per epoch, within the
token budget, replayable for an exact resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tests.conftest import tiny_overrides, toy_pairs, write_tsv
from training.config import load_config
from training.corpus import CorpusError
from training.data import keep_pair
from training.streaming import StreamingBatchSource, pair_columns, stream_pairs
from training.trainer import Trainer

BUFFER = 64
MAX_LEN, MAX_RATIO, MAX_TOKENS = 32, 3.0, 100


def source(spec: str, tokenizer) -> StreamingBatchSource:
    return StreamingBatchSource(
        stream_pairs(spec, "en", "de"), tokenizer, src_lang="en", tgt_lang="de", buffer=BUFFER,
        max_len=MAX_LEN, max_len_ratio=MAX_RATIO, max_tokens=MAX_TOKENS, seed=7, bos=1, eos=2, pad=0,
    )


def as_pairs(batches) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(tuple(s), tuple(t)) for src, tgt in batches for s, t in zip(src, tgt)]


@pytest.fixture
def corpus(tmp_path):
    pairs = toy_pairs(300, seed=5)
    return pairs, "file:" + str(write_tsv(tmp_path / "train.tsv", pairs))


def test_every_pair_is_seen_exactly_once_per_epoch(corpus, toy_tokenizer):
    pairs, spec = corpus
    enc_src = toy_tokenizer.encode([s for s, _ in pairs])
    enc_tgt = toy_tokenizer.encode([t for _, t in pairs])
    expected = Counter(
        (tuple(s), tuple(t)) for s, t in zip(enc_src, enc_tgt) if keep_pair(len(s), len(t), MAX_LEN, MAX_RATIO)
    )
    assert sum(expected.values()) > 3 * BUFFER  # the corpus does not fit the buffer
    src = source(spec, toy_tokenizer)
    for epoch in (0, 1):
        batches = list(src.epoch(epoch))
        assert Counter(as_pairs(batches)) == expected
        for b in batches:
            longest = max(max(len(s), len(t)) + 1 for s, t in zip(*b))
            assert len(b[0]) * longest <= MAX_TOKENS or len(b[0]) == 1


def test_an_epoch_replays_identically_and_the_next_is_shuffled_anew(corpus, toy_tokenizer):
    src = source(corpus[1], toy_tokenizer)
    first = list(src.epoch(0))
    assert list(src.epoch(0)) == first
    assert as_pairs(src.epoch(1)) != as_pairs(first)


def test_aligned_and_jsonl_files_stream_the_same_pairs_as_tsv(corpus, tmp_path):
    pairs, tsv = corpus
    (tmp_path / "train.en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (tmp_path / "train.de").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    with (tmp_path / "train.jsonl").open("w", encoding="utf-8") as f:
        for s, t in pairs:
            f.write(json.dumps({"translation": {"en": s, "de": t}}) + "\n")
    aligned = f"file:{tmp_path / 'train.en'},{tmp_path / 'train.de'}"
    for spec in (tsv, aligned, f"file:{tmp_path / 'train.jsonl'}"):
        rows = [pair_columns(block, "en", "de") for block in stream_pairs(spec, "en", "de").iter(batch_size=100)]
        assert [p for src, tgt in rows for p in zip(src, tgt)] == pairs, spec


def test_unequal_aligned_files_are_an_error_naming_them(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "a.de").write_text("eins\n", encoding="utf-8")
    stream = stream_pairs(f"file:{tmp_path / 'a.en'},{tmp_path / 'a.de'}", "en", "de")
    with pytest.raises(CorpusError, match="a.en and .*a.de differ in length"):
        list(stream)


def test_streaming_run_resumes_exactly(tmp_path, toy_corpus):
    extra = {"data.streaming": "true", "data.stream_buffer": BUFFER, "train.valid_every": 2}

    def run(out, steps):
        cfg = load_config("cpu", tiny_overrides(toy_corpus, **extra, **{"train.max_steps": steps}))
        return Trainer(cfg, out, log=lambda *_: None)

    straight = run(tmp_path / "straight", 4)
    straight.run()
    run(tmp_path / "resumed", 2).run()
    resumed = run(tmp_path / "resumed", 4)
    assert resumed.state.step == 2
    resumed.run()
    assert resumed.state == straight.state
    for name, w in straight.model.state_dict().items():
        assert torch.equal(w, resumed.model.state_dict()[name]), name
