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

    @property
    def active(self) -> bool:
        """Whether any rule can mask anything; when not, `apply` need not be called."""
        return bool(self.prefix.size(1) or self.min_len or self.ngram)

    def extend(self, n: int) -> None:
        """Make room for n more sentences, joining the search without a forced prefix."""
        self.prefix = torch.cat([self.prefix, self.prefix.new_zeros(n, self.prefix.size(1))])
        self.prefix_len = torch.cat([self.prefix_len, self.prefix_len.new_zeros(n)])

    def apply(self, logp: Tensor, step: int | Tensor, sentence: Tensor, history: Tensor | None) -> None:
        """Mask logp (n, V) for decoding step `step` (0-based) in place.

        step: shared by all rows, or per row (n,) when rows are at different steps.
        sentence (n,): the batch index of each row's sentence; history (n, t): the tokens each row
        emitted so far, left-aligned (row i's are history[i, :step[i]]), needed only when `needs_history`.
        """
        n = logp.size(0)
        steps = torch.full((n,), step, dtype=torch.long) if isinstance(step, int) else step  # (n,)
        forced = None
        if self.prefix.size(1):
            rows = (self.prefix_len[sentence] > steps).nonzero().squeeze(1)  # rows still inside their prefix
            if rows.numel():
                tok = self.prefix[sentence[rows], steps[rows]]  # (r,)
                forced = (rows, tok, logp[rows, tok].clone())
        if self.min_len:
            logp[steps < self.min_len, self.eos_id] = float("-inf")
        if self.ngram and history is not None:
            rows = (steps >= self.ngram).nonzero().squeeze(1)
            if rows.numel() == n and isinstance(step, int):
                ban_repeated_ngrams(logp, history[:, :step], self.ngram)
            elif rows.numel():
                ban_repeated_ngrams(logp, right_aligned(history, steps), self.ngram, rows)
        if forced is not None:
            # The prefix wins over every other rule: only its token stays, with its log-probability.
            rows, tok, kept = forced
            logp[rows] = float("-inf")
            logp[rows, tok] = kept


def right_aligned(history: Tensor, steps: Tensor) -> Tensor:
    """Left-aligned rows of history (n, t), row i holding steps[i] tokens, moved to end at the last
    column, -1 before them (an id no n-gram holds): (n, max(steps))."""
    width = int(steps.max())
    at = steps[:, None] - width + torch.arange(width)  # (n, width) column in history
    return history.gather(1, at.clamp(min=0)).masked_fill(at < 0, -1)


def ban_repeated_ngrams(logp: Tensor, history: Tensor, n: int, rows: Tensor | None = None) -> None:
    """Forbid, per row, every token that would complete an n-gram already in history (rows, t).

    rows: the rows of logp and history to look at (each with at least n tokens); all when None.
    """
    if rows is not None:
        history = history[rows]
    windows = history.unfold(1, n, 1)  # (rows, t - n + 1, n)
    context = history[:, history.size(1) - n + 1 :]  # (rows, n - 1): the n-gram now being started
    match = (windows[:, :, : n - 1] == context[:, None, :]).all(dim=-1)  # (rows, t - n + 1)
    at_row, at = match.nonzero(as_tuple=True)
    tokens = windows[at_row, at, n - 1]
    logp[at_row if rows is None else rows[at_row], tokens] = float("-inf")


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
