"""Checkpoints: one file holding weights, resolved config, tokenizer and (optionally) training state.

Written atomically (temp file in the same folder, fsync, rename) and read with
`torch.load(weights_only=True)`, so loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from translator.config import ConfigError, from_dict
from translator.model import EncoderDecoder, ModelConfig, build_model
from translator.tokenizer import Tokenizer

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or of another format; the message names it."""


@dataclass
class Checkpoint:
    """What a checkpoint file holds, decoded."""

    config: dict[str, Any]  # the resolved experiment config; config["model"] rebuilds the model
    tokenizer: Tokenizer
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None
    metrics: dict[str, Any]

    @property
    def model_config(self) -> ModelConfig:
        return from_dict(ModelConfig, self.config["model"], "model.")

    def build_model(self) -> EncoderDecoder:
        model = build_model(self.model_config)
        model.load_state_dict(self.model_state)
        return model.eval()


def save_checkpoint(
    path: str | Path,
    *,
    config: dict[str, Any],
    tokenizer: Tokenizer,
    model: torch.nn.Module | dict[str, torch.Tensor],
    train_state: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> None:
    """Atomically write a checkpoint: a crash at any point leaves the previous file intact."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    payload = {
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config),
        "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
        "model": {k: v.detach().cpu() for k, v in state.items()},
        "train_state": train_state,
        "metrics": json.dumps(metrics or {}),
    }
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file beside path, fsync it, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint file; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}, expected {FORMAT_VERSION}"
        )
    try:
        config = json.loads(payload["config"])
        ckpt = Checkpoint(
            config=config,
            tokenizer=Tokenizer(payload["tokenizer"].numpy().tobytes()),
            model_state=payload["model"],
            train_state=payload["train_state"],
            metrics=json.loads(payload["metrics"]),
        )
        ckpt.model_config  # noqa: B018 - validates the stored model config
    except (KeyError, ConfigError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is inconsistent: {e}") from None
    return ckpt
