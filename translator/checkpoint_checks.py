"""What a loaded checkpoint payload must hold: the types of its parts, weights that fit the
stored model config, and finite values. Each failure is a one-line `CheckpointError` naming the
file and the problem."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from translator.config import ConfigError, from_dict
from translator.model import ModelConfig, build_model
from translator.provenance import Provenance
from translator.tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt or malformed; the message names it."""


@dataclass(frozen=True)
class Parts:
    """A payload's parts, of the right types but not yet checked against each other."""

    texts: dict[str, str]  # the JSON members as stored: config, metrics (and provenance)
    config: dict[str, Any]
    metrics: dict[str, Any]
    provenance: Provenance
    tokenizer_bytes: bytes
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None
    digests: dict[str, str]
    path: Path

    def tokenizer(self) -> Tokenizer:
        try:
            return Tokenizer(self.tokenizer_bytes)
        except (RuntimeError, ValueError, OSError) as e:
            raise CheckpointError(f"checkpoint {self.path}: its tokenizer is not a usable SentencePiece model "
                                  f"({' '.join(str(e).split())[:200]})") from None


def decode_payload(path: Path, payload: dict, with_digests: bool) -> Parts:
    """The parts of a format-1 (`with_digests` False) or format-2 payload, type-checked."""
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {what}")

    names = ("config", "metrics", "provenance") if with_digests else ("config", "metrics")
    texts, parsed = {}, {}
    for name in names:
        text = payload.get(name)
        if not isinstance(text, str):
            raise fail(f"its {name} is {_kind(text)}, expected JSON text")
        try:
            parsed[name] = json.loads(text)
        except json.JSONDecodeError as e:
            raise fail(f"its {name} is not valid JSON ({e})") from None
        if not isinstance(parsed[name], dict):
            raise fail(f"its {name} is {_kind(parsed[name])}, expected a mapping")
        texts[name] = text
    if not isinstance(parsed["config"].get("model"), dict):
        raise fail(f"its config's model section is {_kind(parsed['config'].get('model'))}, expected a mapping")
    tok = payload.get("tokenizer")
    if not (isinstance(tok, torch.Tensor) and tok.dtype == torch.uint8 and tok.dim() == 1):
        raise fail(f"its tokenizer is {_kind(tok)}, expected the SentencePiece model's bytes as a 1-D uint8 tensor")
    state = payload.get("model")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise fail(f"its model is {_kind(state)}, expected a mapping of names to tensors")
    train_state = payload.get("train_state")
    if train_state is not None and not isinstance(train_state, dict):
        raise fail(f"its train_state is {_kind(train_state)}, expected a mapping or None")
    digests = payload.get("digests") if with_digests else {}
    if not isinstance(digests, dict):
        raise fail(f"its digests are {_kind(digests)}, expected a mapping")
    try:
        provenance = Provenance.from_dict(parsed.get("provenance", {}))
    except TypeError as e:
        raise fail(f"its provenance is malformed ({e})") from None
    return Parts(texts, parsed["config"], parsed["metrics"], provenance, tok.numpy().tobytes(), state,
                 train_state, digests, path)


def check_weights(path: Path, config: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: Tokenizer) -> None:
    """The weights are exactly the tensors the model config builds, of the same shapes, all finite."""
    try:
        cfg = from_dict(ModelConfig, config["model"], "model.")
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its model config is invalid: {e}") from None
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    mismatch = "the model config does not match the weights"
    if missing := sorted(expected.keys() - state.keys()):
        raise CheckpointError(f"checkpoint {path}: {mismatch}: the config needs {missing[0]!r}, absent from the weights")
    if unknown := sorted(state.keys() - expected.keys()):
        raise CheckpointError(f"checkpoint {path}: {mismatch}: the weights hold {unknown[0]!r}, unknown to the config")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"checkpoint {path}: {mismatch}: {name!r} is {tuple(state[name].shape)} in the "
                                  f"weights, {shape} by the config")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"checkpoint {path}: its tokenizer has {tokenizer.vocab_size} pieces, more than the "
                              f"model's vocab_size {cfg.vocab_size}")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"checkpoint {path}: weight {name!r} holds NaN or infinite values; refused")


def _kind(value: object) -> str:
    if value is None:
        return "missing"
    article = "an" if type(value).__name__[0] in "aeiou" else "a"
    return f"{article} {type(value).__name__}"
