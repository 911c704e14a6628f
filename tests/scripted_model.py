"""A scripted stand-in for EncoderDecoder with hand-written next-token probabilities.

The table maps (sentence key, *tokens so far) to {token: probability}; the key is the first
source token, so one table scripts several sentences of a batch. Prefixes missing from the
table put all mass on EOS. It records the batch size of every decode step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from translator.model import ModelConfig
from translator.sampling import best_tokens

PAD, BOS, EOS, A, B, C = range(6)
VOCAB = 6

Table = dict[tuple[int, ...], dict[int, float]]


@dataclass
class ScriptedCache:
    history: list[list[int]]  # per row: the sentence key, then the tokens fed after BOS
    src_mask: Tensor  # (rows, 1, 1, S)
    group: int = 1  # rows per source
    alignments: list[Tensor] = field(default_factory=list)

    def select(self, index: Tensor, group: int | None = None) -> None:
        self.history = [list(self.history[i]) for i in index.tolist()]
        self.src_mask = self.src_mask[index]
        self.group = group or self.group

    def drop(self, keep: Tensor) -> Tensor:
        order = keep.nonzero().squeeze(1)
        self.select(order)
        return order

    def extend(self, new: ScriptedCache) -> None:
        """Sources joining, `group` rows each; their sources as long as the others (`sources` makes them so)."""
        self.history += [list(h) for h in new.history for _ in range(self.group)]
        self.src_mask = torch.cat([self.src_mask, new.src_mask.repeat_interleave(self.group, dim=0)])


class ScriptedModel(nn.Module):
    def __init__(self, table: Table, max_positions: int = 64) -> None:
        super().__init__()
        self.cfg = ModelConfig(vocab_size=VOCAB, d_model=4, n_heads=1, n_layers=1, d_ff=4,
                               max_positions=max_positions, pad_id=PAD, bos_id=BOS, eos_id=EOS)
        self.table = table
        self.batch_sizes: list[int] = []

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        return src[:, :, None].float(), (src != PAD)[:, None, None, :]  # (B, S, 1), (B, 1, 1, S)

    def init_cache(self, memory: Tensor, src_mask: Tensor, capacity: int = 64) -> ScriptedCache:
        return ScriptedCache(memory[:, :1, 0].long().tolist(), src_mask)

    def decode_step(self, tgt_new: Tensor, cache: ScriptedCache, record_alignment: bool = False) -> Tensor:
        self.batch_sizes.append(tgt_new.size(0))
        for history, token in zip(cache.history, tgt_new[:, -1].tolist()):
            if token != BOS:  # a row's first input, which the table leaves out
                history.append(token)
        rows = []
        for prefix in cache.history:
            probs = self.table.get(tuple(prefix), {EOS: 1.0})
            rows.append([math.log(probs[v]) if probs.get(v, 0) > 0 else -math.inf for v in range(VOCAB)])
        if record_alignment:
            mask = cache.src_mask[:, 0, 0].float()  # (rows, S)
            cache.alignments.append(mask / mask.sum(dim=1, keepdim=True))
        return torch.tensor(rows)[:, None, :]  # (rows, 1, V)

    def best_tokens(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        return best_tokens(logits)


def sources(*keys: int, length: int = 3) -> Tensor:
    """One source row per key: the key, filler tokens, EOS; (len(keys), length)."""
    rows = [[k] + [A] * (length - 2) + [EOS] for k in keys]
    return torch.tensor(rows)
