"""Checkpoints: one file holding weights, resolved config, tokenizer, provenance and (optionally)
training state, with sha256 digests of its parts.

Written atomically (temp file in the same folder, fsync, rename) with the process umask, and read
with `torch.load(weights_only=True)`, so loading never unpickles arbitrary objects. Every load
checks the digests recorded at save, that the weights fit the stored model config and that they
are finite; what fails is a `CheckpointError` naming the file and the problem, on one line.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from translator.checkpoint_checks import CheckpointError, Parts, check_weights, decode_payload
from translator.config import ConfigError, from_dict
from translator.digest import bytes_sha256, tensors_sha256, text_sha256
from translator.model import EncoderDecoder, ModelConfig, build_model
from translator.provenance import Provenance
from translator.tokenizer import Tokenizer

# 1: no digests or provenance (still read, with a warning); 2: both.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "atomic_write", "load_checkpoint", "load_checkpoint_metadata",
           "save_checkpoint"]

log = logging.getLogger("translator.checkpoint")


@dataclass
class Checkpoint:
    """What a checkpoint file holds, decoded and checked."""

    config: dict[str, Any]  # the resolved experiment config; config["model"] rebuilds the model
    tokenizer: Tokenizer
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None
    metrics: dict[str, Any]
    provenance: Provenance = field(default_factory=Provenance)
    weights_sha256: str = ""  # the digest of model_state (translator.digest.tensors_sha256)
    verified: bool = True  # False: a format-1 file, whose contents carry no digest to check

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
    provenance: Provenance | None = None,
) -> None:
    """Atomically write a checkpoint: a crash at any point leaves the previous file intact."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    weights = {k: v.detach().cpu() for k, v in state.items()}
    prov = provenance or Provenance()
    texts = {"config": json.dumps(config), "metrics": json.dumps(metrics or {}),
             "provenance": json.dumps(prov.to_dict())}
    payload = {
        "format_version": FORMAT_VERSION,
        **texts,
        "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
        "model": weights,
        "train_state": train_state,
        "digests": {"weights": tensors_sha256(weights), "tokenizer": tokenizer.sha256,
                    **{k: text_sha256(v) for k, v in texts.items()}},
    }
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file beside path, fsync it, then rename it over path.

    The file gets mode 0666 less the process umask, as `open()` would give it. A temp file left by
    a killed writer (`.NAME.RANDOM.tmp`) is never read in place of `path`. A write that fails (a
    full disk, a folder that cannot be made) leaves path as it was and raises an OSError naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OSError(f"cannot write {path}: {path.parent} is, or lies in, a file rather than a folder") from None
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint file; errors name the file and what is wrong, on one line."""
    path = Path(path)
    payload = _read(path)
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}, expected {FORMAT_VERSION}")
    parts = decode_payload(path, payload, with_digests=version >= 2)
    weights_sha256 = tensors_sha256(parts.model_state)
    if version >= 2:
        _verify_digests(parts, weights_sha256)
    else:
        log.warning("checkpoint %s has format version 1, without digests: its contents cannot be verified",
                    path)
    ckpt = Checkpoint(config=parts.config, tokenizer=parts.tokenizer(), model_state=parts.model_state,
                      train_state=parts.train_state, metrics=parts.metrics, provenance=parts.provenance,
                      weights_sha256=weights_sha256, verified=version >= 2)
    check_weights(path, ckpt.config, ckpt.model_state, ckpt.tokenizer)
    return ckpt


def load_checkpoint_metadata(path: str | Path) -> Checkpoint:
    """What a checkpoint holds besides its weights (config, tokenizer, metrics, provenance and the
    weights' digest recorded at save), read and checked without reading the weights: the file is
    mapped, its tensors are left untouched, and `model_state` is empty. For a process that only
    tokenizes and checks requests while another loads, verifies and decodes with the weights
    (translator.engine_process). Errors as load_checkpoint's."""
    path = Path(path)
    payload = _read(path, mmap=True)
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}, expected {FORMAT_VERSION}")
    parts = decode_payload(path, payload, with_digests=version >= 2)
    if version >= 2:
        _verify_digests(parts)
        weights_sha256 = str(parts.digests.get("weights", ""))
    else:  # no digest recorded: computed over the mapped file
        weights_sha256 = tensors_sha256(parts.model_state)
    ckpt = Checkpoint(config=parts.config, tokenizer=parts.tokenizer(), model_state={}, train_state=None,
                      metrics=parts.metrics, provenance=parts.provenance, weights_sha256=weights_sha256,
                      verified=version >= 2)
    try:
        cfg = ckpt.model_config
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its model config is invalid: {e}") from None
    if ckpt.tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"checkpoint {path}: its tokenizer has {ckpt.tokenizer.vocab_size} pieces, more than "
                              f"the model's vocab_size {cfg.vocab_size}")
    return ckpt


def _verify_digests(parts: Parts, weights_sha256: str | None = None) -> None:
    """Each part's sha256 now equals the one recorded at save (the weights' unless None)."""
    computed = {"tokenizer": bytes_sha256(parts.tokenizer_bytes), **{k: text_sha256(v) for k, v in parts.texts.items()}}
    if weights_sha256 is not None:
        computed["weights"] = weights_sha256
    for part, digest in computed.items():
        recorded = parts.digests.get(part)
        if recorded != digest:
            raise CheckpointError(f"checkpoint {parts.path} is corrupt: {part} sha256 {digest[:12]}... differs "
                                  f"from the {str(recorded)[:12]}... recorded at save")


def _read(path: Path, mmap: bool = False) -> dict:
    """torch.load of a file that exists and is not empty; torch's errors become one line. mmap: the
    tensors are mapped from the file, read only where touched."""
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted write or copy?")
    with path.open("rb") as f:
        head = f.read(64)
    if not head.startswith((ZIP_MAGIC, PICKLE_PROTO)):
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint: {_what_it_is(head)}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on foreign files
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable: {_load_failure(e)}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not a checkpoint's mapping")
    return payload


# The first bytes of what torch.save writes: a zip archive, or (before torch 1.6, and with
# _use_new_zipfile_serialization=False) a pickle of protocol 2 or later.
ZIP_MAGIC, PICKLE_PROTO = b"PK\x03\x04", b"\x80"


def _what_it_is(head: bytes) -> str:
    """What a file that is neither a zip archive nor a pickle looks like, from its first bytes."""
    if head.startswith(b"\x1f\x8b"):
        return "it holds gzip-compressed data"
    text = head.decode("utf-8", "replace").rstrip("\ufffd")  # a character cut at the end
    if "\ufffd" not in text and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"it is text (it begins {first!r}): a config, vocabulary or corpus given as the checkpoint?"
    return f"it begins with bytes {head[:8]!r}, neither a zip archive nor a pickle"


def _load_failure(e: Exception) -> str:
    """What torch.load's exception means, in one line and without its advice to unpickle anyway."""
    text = str(e)
    if "Weights only load failed" in text:
        # Keep the line naming the object, not torch's advice on loading it anyway.
        lines = [line.strip() for line in text.splitlines() if line.strip() and not any(
            advice in line for advice in ("weights_only", "Weights only", "file an issue", "documentation"))]
        what = lines[0].partition(". ")[0].rstrip(".") if lines else "an object of a type it does not allow"
        return f"it holds pickled objects that are not tensors or plain data ({what}); refused"
    if "central directory" in text or "not a ZIP archive" in text or isinstance(e, EOFError):
        return "not a complete torch archive (truncated, or not a checkpoint)"
    if "not in a subdirectory" in text or "data.pkl" in text:
        return "a zip archive, but not one torch.save wrote"
    first = " ".join(text.split()) or type(e).__name__
    return first[:300]
