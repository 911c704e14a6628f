"""How to search: one frozen, validated options object shared by every sentence of a batch."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from translator.config import ConfigError
from translator.length import PENALTY_FORMS, PenaltyForm, output_budgets


class DecodeOptionError(ConfigError):
    """A decoding option is out of range; the message starts with the option's name."""


@dataclass(frozen=True)
class DecodeOptions:
    """Search settings. Lengths count target tokens; a sentence's budget is
    min(max_len_a * source_length + max_len_b, max_len) steps, EOS included, where the source
    length counts its EOS. A hypothesis still running at its budget ends there without EOS.
    """

    beam_size: int = 1
    n_best: int = 1  # hypotheses returned per sentence, best first (<= beam_size)
    max_len_a: float = 1.5
    max_len_b: int = 10
    max_len: int = 200  # hard cap on every sentence's budget
    min_len: int = 0  # EOS is forbidden before this many tokens (the budget still wins)
    length_penalty: float = 1.0  # alpha; 0 ranks by summed log-probability
    length_penalty_form: PenaltyForm = "power"  # "power": len**alpha, "gnmt": ((5 + len) / 6)**alpha
    length_includes_eos: bool = True  # whether EOS counts in the penalty's len
    no_repeat_ngram: int = 0  # forbid repeating any n-gram of this size (0: off)
    sample: bool = False  # draw each token instead of taking the best (beam_size 1 only)
    top_k: int = 0  # sample among the k likeliest tokens (0: all)
    top_p: float = 1.0  # sample among the smallest set holding this probability mass
    temperature: float = 1.0  # divides the logits before sampling
    seed: int | None = None  # sampling seed; None draws a fresh one per call
    alignment: bool = False  # return cross-attention alignments (one row per output token)

    def __post_init__(self) -> None:
        for name in ("beam_size", "n_best", "max_len_b", "max_len", "min_len", "no_repeat_ngram", "top_k"):
            _require_int(name, getattr(self, name))
        for name in ("max_len_a", "length_penalty", "top_p", "temperature"):
            _require_number(name, getattr(self, name))
        for name in ("length_includes_eos", "sample", "alignment"):
            if not isinstance(getattr(self, name), bool):
                raise DecodeOptionError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check("beam_size", self.beam_size >= 1, "must be >= 1", self.beam_size)
        _check("n_best", 1 <= self.n_best <= self.beam_size, f"must be in [1, beam_size={self.beam_size}]",
               self.n_best)
        _check("max_len_a", self.max_len_a >= 0, "must be >= 0", self.max_len_a)
        _check("max_len_b", self.max_len_b >= 0, "must be >= 0", self.max_len_b)
        _check("max_len", self.max_len >= 1, "must be >= 1", self.max_len)
        _check("min_len", 0 <= self.min_len < self.max_len, f"must be in [0, max_len={self.max_len})",
               self.min_len)
        _check("length_penalty_form", self.length_penalty_form in PENALTY_FORMS,
               f"must be one of {PENALTY_FORMS}", self.length_penalty_form)
        _check("no_repeat_ngram", self.no_repeat_ngram >= 0, "must be >= 0", self.no_repeat_ngram)
        _check("top_k", self.top_k >= 0, "must be >= 0", self.top_k)
        _check("top_p", 0 < self.top_p <= 1, "must be in (0, 1]", self.top_p)
        _check("temperature", self.temperature > 0, "must be > 0", self.temperature)
        if self.seed is not None:
            _require_int("seed", self.seed)
        if not self.sample:
            for name, off in (("top_k", 0), ("top_p", 1.0), ("temperature", 1.0), ("seed", None)):
                _check(name, getattr(self, name) == off, "applies only with sample=True", getattr(self, name))
        _check("sample", not (self.sample and self.beam_size > 1), "needs beam_size 1", self.beam_size)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DecodeOptions:
        """Options reproducing a toolkit's length conventions; keyword overrides win."""
        if name not in PRESETS:
            raise DecodeOptionError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> DecodeOptions:
        return dataclasses.replace(self, **changes)


def check_budgets(opts: DecodeOptions, src_lengths: Mapping[int, int], max_positions: int, prefix_len: int = 0,
                  min_len_name: str = "min_len", sentence: str = "sentence {}",
                  prefix_name: str = "target_prefix") -> None:
    """Refuse what the per-sentence output budgets would otherwise quietly override: a forced target
    prefix with no room left for EOS, or a min_len at or past a sentence's budget (its EOS could
    never come). src_lengths: sentence index -> its source tokens, EOS included; the names say which
    flag or field min_len and the prefix are, and how a sentence is named (`sentence.format(index)`)."""
    cap = min(opts.max_len, max_positions - 1)
    if prefix_len >= cap:
        raise DecodeOptionError(
            f"{prefix_name} has {prefix_len} tokens; at most {cap - 1} fit before EOS in the output cap "
            f"of {cap} tokens")
    if not opts.min_len or not src_lengths:
        return
    index = list(src_lengths)
    lengths = torch.tensor([src_lengths[i] for i in index])  # (B,)
    budgets = output_budgets(lengths, opts.max_len_a, opts.max_len_b, opts.max_len, max_positions,
                             floor=torch.full_like(lengths, prefix_len + 1))  # (B,)
    short = (budgets <= opts.min_len).nonzero()
    if short.numel():
        i = int(short[0])
        raise DecodeOptionError(
            f"{min_len_name} {opts.min_len} is beyond the length budget of {sentence.format(index[i])}: "
            f"{int(budgets[i])} tokens, EOS included (max_len_a {opts.max_len_a:g} x {int(lengths[i])} source "
            f"tokens + max_len_b {opts.max_len_b}, at most {cap}); lower {min_len_name} or raise the budget")


# Length conventions of other toolkits, in this package's terms.
PRESETS: dict[str, dict[str, Any]] = {
    # fairseq-generate: beam 5, score / len**lenpen with len counting EOS, max_len_a 0 / max_len_b 200,
    # min_len 1. (fairseq allows 200 tokens plus EOS: a budget of 201 steps here.)
    "fairseq": {"beam_size": 5, "length_penalty": 1.0, "length_penalty_form": "power",
                "length_includes_eos": True, "max_len_a": 0.0, "max_len_b": 201, "max_len": 201, "min_len": 1},
    # CTranslate2 translate_batch: beam 2, score / len**length_penalty with len excluding EOS,
    # max_decoding_length 256 steps (EOS included), min_decoding_length 0.
    "ctranslate2": {"beam_size": 2, "length_penalty": 1.0, "length_penalty_form": "power",
                    "length_includes_eos": False, "max_len_a": 0.0, "max_len_b": 256, "max_len": 256, "min_len": 0},
    # GNMT (Wu et al. 2016) as in OpenNMT-py's "wu" penalty and JoeyNMT: ((5 + len) / 6)**alpha.
    "gnmt": {"beam_size": 5, "length_penalty": 0.6, "length_penalty_form": "gnmt", "length_includes_eos": True},
}


def _check(name: str, ok: bool, requirement: str, value: Any) -> None:
    if not ok:
        raise DecodeOptionError(f"{name} {requirement}, got {value!r}")


def _require_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DecodeOptionError(f"{name} must be an integer, got {value!r}")


def _require_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DecodeOptionError(f"{name} must be a finite number, got {value!r}")
