"""Choosing the next token of greedy-style search: the argmax, or a draw restricted by top-k / top-p."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from translator.decode_options import DecodeOptions

Picker = Callable[[Tensor], Tensor]  # logp (n, V) -> token ids (n,)


def argmax_picker(logp: Tensor) -> Tensor:
    """The likeliest token of each row; ties go to the lowest id."""
    return logp.argmax(dim=-1)


def best_tokens(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's likeliest token under logits (n, V), the lowest id where tied, and its
    log-probability (n,) each: argmax_picker over log_softmax and the value there."""
    logp = logits.float().log_softmax(dim=-1)
    idx = argmax_picker(logp)
    return idx, logp.gather(1, idx[:, None]).squeeze(1)


def make_picker(opts: DecodeOptions) -> Picker:
    """argmax, or seeded sampling when opts.sample (a draw depends on the batch it runs in)."""
    if not opts.sample:
        return argmax_picker
    generator = torch.Generator()
    if opts.seed is None:
        generator.seed()
    else:
        generator.manual_seed(opts.seed)

    def pick(logp: Tensor) -> Tensor:
        return sample_tokens(logp, opts.top_k, opts.top_p, opts.temperature, generator)

    return pick


def sample_tokens(logp: Tensor, top_k: int, top_p: float, temperature: float, generator: torch.Generator) -> Tensor:
    """Draw one token per row of logp (n, V) from softmax(logp / temperature) cut to top_k / top_p.

    top_k 0 and top_p 1 keep every token; the likeliest token always stays, so a row never empties.
    """
    x = logp / temperature  # (n, V); equal to logits / temperature up to a per-row constant
    if top_k and top_k < x.size(-1):
        kth = x.topk(top_k, dim=-1).values[:, -1:]  # (n, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)  # (n, V)
        probs = sorted_x.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = x.softmax(dim=-1)
    if probs.device != generator.device:  # drawn on the generator's device: the same seed, the same draw
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
