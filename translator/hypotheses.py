"""Search results: finished hypotheses with their scores, per-token log-probabilities and alignments."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from translator.decode_options import DecodeOptions
from translator.length import length_penalty


@dataclass
class Hypothesis:
    """One output sequence: token ids without BOS/EOS (a forced prefix included).

    score ranks hypotheses: the summed log-probability (EOS included) divided by the length penalty.
    log_probs has one entry per token; eos_log_prob is None when the budget cut the hypothesis.
    alignment (len(tokens), S) holds, per output token, the cross-attention over the sentence's
    S real source tokens (averaged over heads and layers), when requested.
    unmet: in a constrained search, the indices of the sentence's required phrases it lacks.
    """

    tokens: list[int]
    score: float
    log_probs: list[float]
    eos_log_prob: float | None
    alignment: Tensor | None = None
    unmet: tuple[int, ...] = ()

    @property
    def log_prob(self) -> float:
        """Summed log-probability of the tokens and of EOS, without the length penalty."""
        return sum(self.log_probs) + (self.eos_log_prob or 0.0)


@dataclass
class Hypotheses:
    """Search output for a batch: per sentence, up to n_best hypotheses, best first.

    A cancelled sentence has no hypotheses; `tokens` gives it [] and `scores` -inf.
    """

    nbest: list[list[Hypothesis]]
    cancelled: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cancelled:
            self.cancelled = [False] * len(self.nbest)

    @property
    def tokens(self) -> list[list[int]]:
        return [hyps[0].tokens if hyps else [] for hyps in self.nbest]

    @property
    def scores(self) -> list[float]:
        return [hyps[0].score if hyps else float("-inf") for hyps in self.nbest]


def make_hypotheses(
    tokens: Tensor,
    log_probs: Tensor,
    steps: Tensor,
    ended: Tensor,
    summed: Tensor,
    opts: DecodeOptions,
    alignment: Tensor | None = None,
    src_lengths: Tensor | None = None,
) -> list[Hypothesis]:
    """Hypotheses from n rows of search state.

    tokens/log_probs (n, t): what each step emitted and its log-probability; steps (n,): how many
    steps each row took; ended (n,): whether its last step emitted EOS; summed (n,): the
    log-probabilities summed step by step as the search ranked them. Positions at or past a row's
    step count are ignored. alignment (n, t, S) with src_lengths (n,) is cut per row.
    """
    n_tokens = steps - ended.long()  # (n,)
    penalized = n_tokens + ended.long() if opts.length_includes_eos else n_tokens
    scores = summed / length_penalty(penalized, opts.length_penalty, opts.length_penalty_form)
    out = []
    for i, (toks, lps, n, end, score) in enumerate(
        zip(tokens.tolist(), log_probs.tolist(), n_tokens.tolist(), ended.tolist(), scores.tolist())
    ):
        align = None
        if alignment is not None and src_lengths is not None:
            align = alignment[i, :n, : int(src_lengths[i])].clone()
        out.append(Hypothesis(toks[:n], score, lps[:n], lps[n] if end else None, align))
    return out


def padded(x: Tensor, dim: int, size: int, value: float | bool = 0) -> Tensor:
    """x with dimension `dim` padded at the end to `size` with `value`."""
    if x.size(dim) >= size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.size(dim)
    return torch.cat([x, x.new_full(shape, value)], dim=dim)
