"""What a search needs of a model and its decoder cache: the typed seam between them.

translator.model.EncoderDecoder (with translator.cache.DecoderCache) satisfies it in plain torch,
and so does its native form; tests script a stand-in with hand-written probabilities.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from translator.model import ModelConfig


class Cache(Protocol):
    """Incremental decoding state of R rows reading N sources, `group` rows per source."""

    src_mask: Tensor  # (N, 1, 1, S)
    alignments: list[Tensor]  # per recorded step (R, S)

    def extend(self, new: Cache) -> None:
        """Append the sources of a fresh cache, `group` rows each, starting at the next step."""

    def drop(self, keep: Tensor) -> Tensor:
        """Keep the rows flagged in keep (R,) bool (one row per source); returns the new order (k,)."""

    def select(self, index: Tensor, group: int | None = None) -> None:
        """New row i is old row index[i]; `group` rows per source after."""


class Seq2Seq(Protocol):
    """An encoder-decoder that decodes step by step."""

    cfg: ModelConfig

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, D) and its mask (B, 1, 1, S)."""

    def init_cache(self, memory: Tensor, src_mask: Tensor, capacity: int = 64) -> Cache:
        """A cache over B sources, one row each, that has not decoded yet."""

    def decode_step(self, tgt_new: Tensor, cache: Cache, record_alignment: bool = False) -> Tensor:
        """New tokens (R, t) -> logits (R, t, V); cache.alignments grows by one when recorded."""

    def best_tokens(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's likeliest token under logits (n, V), the lowest id where tied, and its log-probability."""
