"""What the service says about the model it serves: its identity, architecture, limits, defaults
and the checkpoint's origin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from translator.decode_options import DecodeOptions
from translator.model import ModelConfig
from translator.provenance import Provenance
from translator.requests import Limits


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    checkpoint_sha256: str
    source_language: str
    target_language: str


@dataclass(frozen=True)
class CheckpointOrigin:
    """What the served checkpoint proves about itself: its weights' digest and its provenance."""

    weights_sha256: str
    verified: bool  # the digests recorded at save were checked on load
    provenance: Provenance
    training_config: dict[str, Any]


@dataclass(frozen=True)
class ModelInfo:
    identity: ModelIdentity
    vocabulary_size: int
    preset: str
    tokenizer_sha256: str
    architecture: ModelConfig
    limits: Limits
    max_source_tokens: int
    max_length: int
    defaults: DecodeOptions
    metrics: dict[str, float] = field(default_factory=dict)
    origin: CheckpointOrigin | None = None
