"""The experiment config: model, data and training sections, from YAML plus dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from translator.config import ConfigError, apply_overrides, apply_values, from_dict, load_yaml
from translator.model import ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    """Where the corpus comes from and how it is tokenized and filtered.

    Splits are corpus specs (see training.corpus): `multi30k:train`, `hub:wmt14/de-en:train`,
    `file:train.tsv`, `file:train.jsonl`, `file:train.en,train.de`.
    """

    src_lang: str = "en"
    tgt_lang: str = "de"
    train: str = "multi30k:train"
    valid: str = "multi30k:val"
    test: str = "multi30k:test_2016_flickr"
    vocab_size: int = 8000
    spm_model_type: Literal["unigram", "bpe"] = "unigram"
    max_len: int = 128
    max_len_ratio: float = 3.0
    # Subword regularization: > 0 segments the train split anew each epoch, drawn by SentencePiece
    # (unigram: segmentations weighted by P^alpha, smaller is more random; bpe: each merge dropped
    # with probability alpha); 0 = always the best segmentation.
    subword_alpha: float = 0.0
    # Stream the train split (see training.streaming) instead of loading it into memory.
    streaming: bool = False
    stream_buffer: int = 100_000  # pairs held at once: the shuffle buffer and each length-bucketed chunk

    def __post_init__(self) -> None:
        if self.src_lang == self.tgt_lang:
            raise ConfigError(f"data.src_lang and data.tgt_lang are both {self.src_lang!r}")
        for name in ("vocab_size", "max_len", "stream_buffer"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.max_len_ratio < 1.0:
            raise ConfigError(f"data.max_len_ratio must be >= 1, got {self.max_len_ratio}")
        if self.subword_alpha < 0 or (self.spm_model_type == "bpe" and self.subword_alpha >= 1):
            bound = "in [0, 1) for a bpe model (a dropout probability)" if self.spm_model_type == "bpe" else ">= 0"
            raise ConfigError(f"data.subword_alpha must be {bound}, got {self.subword_alpha}")
        if self.subword_alpha and self.streaming:
            raise ConfigError("data.subword_alpha needs the train split in memory: it cannot be used with data.streaming")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, validation and checkpointing."""

    max_tokens: int = 4096  # per batch: sentences x longest side, padding included
    accum_steps: int = 1
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    warmup_steps: int = 4000
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    max_steps: int = 0  # 0 = no limit
    max_epochs: int = 0  # 0 = no limit
    max_minutes: float = 0.0  # wall-clock budget; 0 = no limit
    max_target_tokens: int = 0  # budget in target tokens trained on, whatever the machine's speed; 0 = no limit
    valid_every: int = 1000
    valid_bleu_sentences: int = 0  # 0 = the whole validation split
    patience: int = 0  # validations without a better BLEU before stopping; 0 = never stop early
    keep_last: int = 5
    log_every: int = 50
    seed: int = 1
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # fp32, bf16 autocast, or fp16 autocast with loss scaling (GPUs only); auto: bf16 where a
    # probe at start measures its matmuls of this run's shapes faster than fp32's, else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the loss's forward and backward (falls back if it fails)
    fused_adam: bool = True  # torch's fused Adam kernel where this torch has it for the device
    # inverse_sqrt: warmup, then peak * sqrt(warmup / step). wsd: warmup, the peak held, then a
    # decay to 0 over the last decay_fraction of the steps that max_steps, max_minutes or
    # max_target_tokens allow.
    schedule: Literal["inverse_sqrt", "wsd"] = "inverse_sqrt"
    decay_fraction: float = 0.2
    decay_shape: Literal["linear", "cosine"] = "linear"

    def __post_init__(self) -> None:
        for name in ("max_tokens", "accum_steps", "valid_every", "log_every", "keep_last"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "max_epochs", "max_minutes", "max_target_tokens", "patience", "warmup_steps", "threads",
                     "valid_bleu_sentences", "weight_decay", "clip_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be in [0, 1), got {self.betas}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.schedule == "wsd" and not (self.max_steps or self.max_minutes or self.max_target_tokens):
            raise ConfigError(
                "train.schedule=wsd needs train.max_steps, train.max_minutes (--max-minutes) or "
                "train.max_target_tokens (--max-target-tokens): the decay must know where the run ends"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.vocab_size != self.data.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({self.model.vocab_size}) must equal data.vocab_size "
                f"({self.data.vocab_size}): the model is sized to the tokenizer"
            )
        if self.data.max_len + 1 > self.model.max_positions:
            raise ConfigError(
                f"data.max_len ({self.data.max_len}) + 1 must fit model.max_positions "
                f"({self.model.max_positions})"
            )


def resolve_config_path(name_or_path: str) -> Path:
    """A shipped preset name (`cpu`, `base`, `big`) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no config file {name_or_path!r} and no preset of that name ({shipped})")
    return preset


def load_config(name_or_path: str, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or preset), set `values` (dotted key -> value, from flags: never parsed),
    apply `key.sub=value` overrides (YAML scalars), check everything."""
    data = load_yaml(str(resolve_config_path(name_or_path)))
    data = apply_overrides(apply_values(data, values or {}), overrides or [])
    # The vocabulary size is set once, in data; the model follows it unless given explicitly.
    model = data.setdefault("model", {})
    if isinstance(model, dict) and "vocab_size" not in model:
        vocab = data.get("data", {}).get("vocab_size", DataConfig.vocab_size)
        model["vocab_size"] = vocab
    return from_dict(ExperimentConfig, data)
