"""Shared fixtures: a toy parallel corpus, a tokenizer trained on it in memory, tiny model configs, and
a real server in both engine layouts."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from translator.model import ModelConfig
from translator.tokenizer import Tokenizer, train_tokenizer

# A word-for-word "language pair": learnable in seconds, so overfitting is a real check.
LEXICON = {
    "red": "rot", "blue": "blau", "green": "gruen", "big": "gross", "small": "klein",
    "dog": "hund", "cat": "katze", "man": "mann", "woman": "frau", "child": "kind",
    "runs": "rennt", "sleeps": "schlaeft", "eats": "isst", "sees": "sieht", "jumps": "springt",
    "the": "der", "a": "ein", "and": "und", "on": "auf", "street": "strasse",
}


def toy_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = sorted(LEXICON)
    pairs = []
    for _ in range(n):
        src = [rng.choice(words) for _ in range(rng.randint(2, 7))]
        pairs.append((" ".join(src), " ".join(LEXICON[w] for w in src)))
    return pairs


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


TOY_VOCAB = 64


@pytest.fixture(scope="session")
def toy_tokenizer() -> Tokenizer:
    pairs = toy_pairs(400)
    return train_tokenizer([s for p in pairs for s in p], TOY_VOCAB)


def tiny_model_config(**overrides) -> ModelConfig:
    base = {"vocab_size": TOY_VOCAB, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, "dropout": 0.0,
            "max_positions": 64}
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def toy_corpus(tmp_path: Path) -> dict[str, str]:
    """Corpus specs for train/valid/test TSV files of the toy pair."""
    return {
        "train": "file:" + str(write_tsv(tmp_path / "train.tsv", toy_pairs(400, seed=1))),
        "valid": "file:" + str(write_tsv(tmp_path / "valid.tsv", toy_pairs(20, seed=2))),
        "test": "file:" + str(write_tsv(tmp_path / "test.tsv", toy_pairs(20, seed=3))),
    }


def tiny_overrides(corpus: dict[str, str], **extra: object) -> list[str]:
    """Dotted overrides turning the cpu preset into a seconds-long run on the toy corpus."""
    items = {
        "data.train": corpus["train"], "data.valid": corpus["valid"], "data.test": corpus["test"],
        "data.vocab_size": TOY_VOCAB, "model.d_model": 32, "model.n_heads": 4, "model.n_layers": 2,
        "model.d_ff": 64, "model.max_positions": 64, "data.max_len": 32, "train.max_tokens": 400,
        "train.warmup_steps": 10, "train.valid_every": 10, "train.log_every": 5, "train.threads": 1,
        "train.precision": "fp32",  # not the probe's choice, which timing noise may change
        # the preset's two-hour recipe regularizes for many epochs; a toy run needs neither
        "model.dropout": 0.1, "model.attention_dropout": 0.0, "model.activation_dropout": 0.0,
        "train.schedule": "inverse_sqrt", "train.max_minutes": 0,
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module", params=[False, True], ids=["engine-thread", "engine-process"])
def server(server_settings, request):
    """A real server on port 0 built from the module's `server_settings` fixture (a ServerConfig), in
    both layouts: the engine on a thread of the server's process, and in a process of its own
    (translator.engine_process). Yields (server, port)."""
    from translator.server import create_server  # grpc only for the modules that serve

    srv, port = create_server(dataclasses.replace(server_settings, engine_process=request.param))
    srv.start()
    yield srv, port
    srv.stop()
