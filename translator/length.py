"""Output length: each sentence's token budget and the length penalty that ranks finished hypotheses.

Two penalty forms divide a hypothesis' summed log-probability:

    power: len ** alpha                 fairseq, CTranslate2, Marian, Hugging Face
    gnmt:  ((5 + len) / 6) ** alpha     Wu et al. 2016 (GNMT); OpenNMT-py "wu", JoeyNMT

alpha = 0 turns either off (pure log-probability); alpha = 1 in the power form is the average
log-probability per token.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

PenaltyForm = Literal["power", "gnmt"]
PENALTY_FORMS: tuple[str, ...] = ("power", "gnmt")


def length_penalty(lengths: Tensor, alpha: float, form: PenaltyForm) -> Tensor:
    """The divisor of summed log-probabilities for hypotheses of `lengths` tokens, (n,) float.

    Lengths are clamped to at least 1 so that an empty hypothesis is never divided by zero.
    """
    n = lengths.clamp(min=1).to(torch.float32)
    base = (5.0 + n) / 6.0 if form == "gnmt" else n
    return base.pow(alpha)


def output_budget(src_length: int, a: float, b: int, hard_cap: int, max_positions: int) -> int:
    """`output_budgets` of one sentence, in plain Python: the front end checks a request's cost
    with it, where a tensor op would hand the GIL to the decoding thread and wait to get it back."""
    cap = min(hard_cap, max_positions - 1)
    return max(1, min(cap, math.floor(min(src_length * a + b, cap))))


def output_budgets(
    src_lengths: Tensor, a: float, b: int, hard_cap: int, max_positions: int, floor: Tensor | None = None
) -> Tensor:
    """Per-sentence output budget (B,) in decoding steps, EOS included: min(a * S + b, hard cap).

    src_lengths (B,) counts real source tokens (the source EOS included). The hard cap is also
    bounded by the model's positions (BOS takes one). `floor` (B,) raises a sentence's budget,
    still within the caps (room for a forced target prefix and its EOS).
    """
    cap = min(hard_cap, max_positions - 1)
    # Clamp while still float: an absurd `a` must not overflow the integer conversion.
    limit = (src_lengths.to(torch.float64) * a + b).clamp(max=cap).floor().long()  # (B,)
    if floor is not None:
        limit = torch.maximum(limit, floor)
    return limit.clamp(min=1, max=cap)
