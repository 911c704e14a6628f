"""Autoregressive search over the model's incremental decoder: pure functions, tensors in and out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from translator.model import EncoderDecoder


@dataclass(frozen=True)
class DecodeOptions:
    """How to search. Output length is capped at max_len_a * source_length + max_len_b and max_len."""

    beam_size: int = 1
    max_len_a: float = 1.5
    max_len_b: int = 10
    max_len: int = 200

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if not (math.isfinite(self.max_len_a) and self.max_len_a >= 0):
            raise ValueError(f"max_len_a must be a finite number >= 0, got {self.max_len_a}")
        if self.max_len_b < 0:
            raise ValueError(f"max_len_b must be >= 0, got {self.max_len_b}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")


@dataclass
class Hypotheses:
    """Search output: per sentence, token ids (without BOS/EOS) and total log-probability."""

    tokens: list[list[int]]
    scores: list[float]


def max_lengths(src: Tensor, pad_id: int, opts: DecodeOptions, max_positions: int) -> Tensor:
    """Per-sentence output budget (B,) in tokens, EOS included."""
    src_len = (src != pad_id).sum(dim=1)  # (B,)
    limit = (src_len.float() * opts.max_len_a + opts.max_len_b).floor().long()
    return limit.clamp(min=1, max=min(opts.max_len, max_positions - 1))


@torch.inference_mode()
def greedy_search(model: EncoderDecoder, src: Tensor, opts: DecodeOptions) -> Hypotheses:
    """Greedy decoding of src (B, S); finished sentences leave the batch and stop costing compute."""
    cfg = model.cfg
    B = src.size(0)
    memory, src_mask = model.encode(src)  # (B, S, D)
    cache = model.init_cache(memory, src_mask)
    budget = max_lengths(src, cfg.pad_id, opts, cfg.max_positions)  # (B,)
    alive = torch.arange(B)  # original row of each active row
    last = torch.full((B, 1), cfg.bos_id, dtype=torch.long)  # (B, 1)
    tokens: list[list[int]] = [[] for _ in range(B)]
    scores = [0.0] * B
    step = 0
    while alive.numel():
        logp = model.decode_step(last, cache)[:, -1].log_softmax(dim=-1)  # (b, V)
        best, idx = logp.max(dim=-1)  # (b,)
        step += 1
        done = (idx == cfg.eos_id) | (budget[alive] <= step)
        for row, (orig, tok, lp) in enumerate(zip(alive.tolist(), idx.tolist(), best.tolist())):
            scores[orig] += lp
            if tok != cfg.eos_id:
                tokens[orig].append(tok)
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() < alive.numel():
            cache.select(keep)
            alive, idx = alive[keep], idx[keep]
        last = idx.unsqueeze(1)
    return Hypotheses(tokens=tokens, scores=scores)


def search(model: EncoderDecoder, src: Tensor, opts: DecodeOptions) -> Hypotheses:
    """Dispatch on opts: greedy for beam_size 1, else beam search."""
    if opts.beam_size == 1:
        return greedy_search(model, src, opts)
    raise NotImplementedError("beam search is not available yet")
