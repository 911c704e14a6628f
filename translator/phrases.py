"""Required target phrases of a constrained search, and each hypothesis' progress through them.

A sentence's constraints are phrases (token sequences) that its output must contain. A hypothesis
tracks which phrases it has met and the one it is inside: how many of that phrase's tokens its
last tokens match. A token off that phrase drops the partial match (and may start a phrase anew).
Two unmet phrases that start with the same token: a hypothesis follows the first one listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from translator.decode_options import DecodeOptionError


@dataclass(frozen=True)
class PhraseTable:
    """The B sentences' phrases, C at most per sentence, L tokens at most per phrase."""

    tokens: Tensor  # (B, C, L) phrase token ids, -1 past a phrase's end
    lengths: Tensor  # (B, C) tokens per phrase; 0 where a sentence has fewer than C phrases
    continuations: Tensor | None = None  # (V,) tokens that may not follow a phrase's last token

    @classmethod
    def of(cls, constraints: list[list[list[int]]], batch_size: int, vocab_size: int, eos_id: int,
           continuations: Tensor | None = None) -> PhraseTable:
        """Per sentence, its phrases as token-id lists; checked to be non-empty, in the vocabulary, not EOS.
        continuations (V,): True for the tokens that would continue a phrase's last word."""
        if len(constraints) != batch_size:
            raise DecodeOptionError(
                f"constraints must give one list per sentence ({batch_size}), got {len(constraints)}")
        for i, phrases in enumerate(constraints):
            for j, phrase in enumerate(phrases):
                if not phrase or any(not 0 <= t < vocab_size or t == eos_id for t in phrase):
                    raise DecodeOptionError(
                        f"constraint {j} of sentence {i} must be a non-empty list of token ids below "
                        f"{vocab_size} other than EOS, got {phrase!r}")
        # At least one (padding) phrase of one token: the shapes stay the same without phrases.
        C = max((len(p) for p in constraints), default=1) or 1
        L = max((len(x) for p in constraints for x in p), default=1)
        tokens = torch.full((batch_size, C, L), -1, dtype=torch.long)
        lengths = torch.zeros(batch_size, C, dtype=torch.long)
        for i, phrases in enumerate(constraints):
            for j, phrase in enumerate(phrases):
                tokens[i, j, : len(phrase)] = torch.tensor(phrase, dtype=torch.long)
                lengths[i, j] = len(phrase)
        if continuations is not None and continuations.shape != (vocab_size,):
            raise DecodeOptionError(f"continuations must be one flag per token ({vocab_size}), "
                                    f"got shape {tuple(continuations.shape)}")
        return cls(tokens, lengths, None if continuations is None else continuations.to(tokens.device))

    @property
    def total(self) -> Tensor:
        """(B,) constraint tokens each sentence must place."""
        return self.lengths.sum(dim=1)


@dataclass(frozen=True)
class Progress:
    """Per hypothesis row (r rows), where it stands with its sentence's phrases."""

    met: Tensor  # (r, C) phrases contained; True for a sentence's missing (padding) phrases
    inside: Tensor  # (r,) the phrase being matched, -1 for none
    matched: Tensor  # (r,) tokens of it matched so far
    just_met: Tensor  # (r,) whether its last token completed a phrase

    @classmethod
    def start(cls, table: PhraseTable, sentence: Tensor) -> Progress:
        """Rows of sentences `sentence` (r,) before any token."""
        r = sentence.numel()
        return cls(table.lengths[sentence] == 0, torch.full((r,), -1, dtype=torch.long),
                   torch.zeros(r, dtype=torch.long), torch.zeros(r, dtype=torch.bool))

    def select(self, rows: Tensor) -> Progress:
        return Progress(self.met[rows], self.inside[rows], self.matched[rows], self.just_met[rows])

    def tokens_met(self, table: PhraseTable, sentence: Tensor) -> Tensor:
        """(r,) constraint tokens in place: whole phrases met plus the partial match."""
        return (table.lengths[sentence] * self.met).sum(dim=1) + self.matched

    def unmet(self, table: PhraseTable, sentence: Tensor) -> list[tuple[int, ...]]:
        """Per row, the indices of its sentence's phrases it does not contain."""
        missing = ~self.met & (table.lengths[sentence] > 0)  # (r, C)
        return [tuple(j for j, m in enumerate(row) if m) for row in missing.tolist()]

    def wanted(self, table: PhraseTable, sentence: Tensor) -> Tensor:
        """(r, C) tokens that advance each row, -1 for none: the next token of the phrase it is
        inside (in column 0), or else the first token of each phrase it has not met."""
        phrases = table.tokens[sentence]  # (r, C, L)
        r = torch.arange(sentence.numel())
        firsts = phrases[:, :, 0].masked_fill(self.met, -1)  # (r, C)
        going_on = torch.full_like(firsts, -1)
        going_on[:, 0] = phrases[r, self.inside.clamp(min=0), self.matched.clamp(max=phrases.size(2) - 1)]
        return torch.where((self.inside >= 0)[:, None], going_on, firsts)

    def after(self, tokens: Tensor, table: PhraseTable, sentence: Tensor) -> Progress:
        """These rows (r,), each extended by tokens (r,)."""
        phrases = table.tokens[sentence]  # (r, C, L)
        r = torch.arange(sentence.numel())
        expected = phrases[r, self.inside.clamp(min=0), self.matched.clamp(max=phrases.size(2) - 1)]  # (r,)
        goes_on = (self.inside >= 0) & (tokens == expected)
        inside = torch.where(goes_on, self.inside, -1)
        matched = torch.where(goes_on, self.matched + 1, 0)
        starts = (phrases[:, :, 0] == tokens[:, None]) & ~self.met  # (r, C)
        restart = ~goes_on & starts.any(dim=1)
        inside = torch.where(restart, starts.long().argmax(dim=1), inside)  # the first phrase it starts
        matched = torch.where(restart, 1, matched)
        length = table.lengths[sentence].gather(1, inside.clamp(min=0)[:, None]).squeeze(1)  # (r,)
        complete = (inside >= 0) & (matched == length)
        met = self.met.clone()
        met[r[complete], inside[complete]] = True
        return Progress(met, inside.masked_fill(complete, -1), matched.masked_fill(complete, 0), complete)
