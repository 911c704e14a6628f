"""Rules on the next token: forced target prefix, minimum length, no repeated n-grams.

They mask next-token log-probabilities after the softmax, so the tokens they allow keep the
model's own log-probabilities (and a forced prefix is scored like any other output), as in fairseq.
"""

from __future__ import annotations

import torch
from torch import Tensor

from translator.decode_options import DecodeOptionError, DecodeOptions


class StepRules:
    """The rules of one search over a batch of B sentences; `apply` masks one step in place."""

    def __init__(self, opts: DecodeOptions, eos_id: int, vocab_size: int, prefixes: list[list[int]] | None,
                 batch_size: int) -> None:
        self.eos_id = eos_id
        self.min_len = opts.min_len
        self.ngram = opts.no_repeat_ngram
        self.prefix, self.prefix_len = forced_prefix_table(prefixes, batch_size, eos_id, vocab_size)

    @property
    def needs_history(self) -> bool:
        return self.ngram > 0

    def apply(self, logp: Tensor, step: int, sentence: Tensor, history: Tensor | None) -> None:
        """Mask logp (n, V) for decoding step `step` (0-based) in place.

        sentence (n,): the batch index of each row's sentence; history (n, step): the tokens each
        row emitted so far, needed only when `needs_history`.
        """
        forced = None
        if step < self.prefix.size(1):
            rows = (self.prefix_len[sentence] > step).nonzero().squeeze(1)  # rows still inside their prefix
            if rows.numel():
                tok = self.prefix[sentence[rows], step]  # (r,)
                forced = (rows, tok, logp[rows, tok].clone())
        if step < self.min_len:
            logp[:, self.eos_id] = float("-inf")
        if self.ngram and history is not None and step >= self.ngram:
            ban_repeated_ngrams(logp, history, self.ngram)
        if forced is not None:
            # The prefix wins over every other rule: only its token stays, with its log-probability.
            rows, tok, kept = forced
            logp[rows] = float("-inf")
            logp[rows, tok] = kept


def ban_repeated_ngrams(logp: Tensor, history: Tensor, n: int) -> None:
    """Forbid, per row, every token that would complete an n-gram already in history (rows, t)."""
    windows = history.unfold(1, n, 1)  # (rows, t - n + 1, n)
    context = history[:, history.size(1) - n + 1 :]  # (rows, n - 1): the n-gram now being started
    match = (windows[:, :, : n - 1] == context[:, None, :]).all(dim=-1)  # (rows, t - n + 1)
    rows, at = match.nonzero(as_tuple=True)
    logp[rows, windows[rows, at, n - 1]] = float("-inf")


def forced_prefix_table(
    prefixes: list[list[int]] | None, batch_size: int, eos_id: int, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """Per-sentence forced target prefixes as a right-padded (B, P) table and lengths (B,)."""
    if prefixes is None:
        return torch.zeros(batch_size, 0, dtype=torch.long), torch.zeros(batch_size, dtype=torch.long)
    if len(prefixes) != batch_size:
        raise DecodeOptionError(f"prefix must give one list per sentence ({batch_size}), got {len(prefixes)}")
    for i, p in enumerate(prefixes):
        if any(not 0 <= t < vocab_size or t == eos_id for t in p):
            raise DecodeOptionError(f"prefix of sentence {i} must hold token ids below {vocab_size} other than EOS")
    lengths = torch.tensor([len(p) for p in prefixes], dtype=torch.long)
    table = torch.zeros(batch_size, max(map(len, prefixes), default=0), dtype=torch.long)
    for i, p in enumerate(prefixes):
        table[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return table, lengths
