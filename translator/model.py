"""The Transformer of "Attention Is All You Need", composed as in the paper, in plain torch.

This is the reference: translator.native swaps faster forms of some modules in when a
Translator is built with the native backend, with the same parameters and the same results.

Shape letters, used in every comment of the package:
    B batch, S source length, T target length, D d_model, H heads, Dh head dim (D // H),
    F d_ff, V vocabulary, K beam; in incremental decoding, N sources and R decoder rows
    (R = N * group, e.g. B * K for beam search).

Masks are boolean with True = may attend, the convention of
`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translator.cache import DecoderCache, LayerCache
from translator.config import ConfigError
from translator.sampling import best_tokens


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters with the paper's names; one object rebuilds the model."""

    vocab_size: int = 8000
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0  # on the feed-forward's hidden units, in training
    max_positions: int = 256
    norm_first: bool = False
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_positions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"model.{name} must be a token id below vocab_size")



def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """The softmax weights of scaled dot-product attention, (B, H, T, S)."""
    scores = (q @ k.transpose(-2, -1)).mul_(1 / math.sqrt(q.size(-1)))  # (B, H, T, S)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores.softmax(dim=-1)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query and key/value inputs."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x: Tensor) -> Tensor:
        B, L, D = x.size()
        return x.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, L, Dh)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Project x (B, L, D) to keys and values, each (B, H, L, Dh)."""
        k, v = self.kv_proj(x).chunk(2, dim=-1)  # (B, L, D) each
        return self.split_heads(k), self.split_heads(v)

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Queries from x (B, T, D) over k/v (B, H, S, Dh), mask broadcast to (B, H, T, S) -> (B, T, D)."""
        B, T, D = x.size()
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))

    def weights(self, x: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        """Attention weights of queries from x over keys k, averaged over heads: (B, T, S)."""
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        return attention_weights(q, k, mask).mean(dim=1)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None) -> Tensor:
        k, v = self.keys_values(memory)
        return self.attend(x, k, v, mask)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """F.dropout(x, p, training) in distribution: each element kept with probability 1 - p (to
    1/32768) and scaled by 1 / (1 - p). On CPU the mask comes from 16 random bits an element, four
    elements to one 64-bit draw of torch's generator, where F.dropout's bernoulli_ draws once per
    element (benchmarks/dropout.py times both, docs/RESULTS.md has the figures). Elsewhere
    F.dropout, which the GPU fuses."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()  # 63 random bits each
    lanes = bits.view(torch.int16)[:n].view(x.shape).bitwise_and_(0x7FFF)  # uniform in [0, 32768)
    keep = lanes >= round(p * 32768)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """`dropout` as a module, in training mode only."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear(D, F) -> ReLU -> Linear(F, D), as in the paper.

    The paper drops only sublayer outputs and embeddings; `dropout` on the hidden units
    (activation dropout, as small-data recipes use) is off by default.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.w_1(x))  # (B, T, F)
        h = dropout(h, self.dropout, self.training)
        return self.w_2(h)


class Residual(nn.Module):
    """x + dropout(sublayer(norm(x))) when norm_first, else norm(x + dropout(sublayer(x)))."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.feed_forward = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout)
        self.sublayers = nn.ModuleList(
            [Residual(cfg.d_model, cfg.dropout, cfg.norm_first) for _ in range(2)]
        )

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        """x (B, S, D), src_mask (B, 1, 1, S) -> (B, S, D)."""
        return self.around(x, lambda y: self.self_attn(y, y, src_mask))

    def around(self, x: Tensor, attend) -> Tensor:
        """The layer with its self-attention given: `attend` maps the normed x to its output."""
        x = self.sublayers[0](x, attend)
        return self.sublayers[1](x, self.feed_forward)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.feed_forward = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout)
        self.sublayers = nn.ModuleList(
            [Residual(cfg.d_model, cfg.dropout, cfg.norm_first) for _ in range(3)]
        )

    def forward(
        self, x: Tensor, memory: Tensor, src_mask: Tensor, tgt_mask: Tensor | None
    ) -> Tensor:
        """Full-sequence (teacher-forced) pass. x (B, T, D), memory (B, S, D) -> (B, T, D)."""
        x = self.sublayers[0](x, lambda y: self.self_attn(y, y, tgt_mask))
        x = self.sublayers[1](x, lambda y: self.cross_attn(y, memory, src_mask))
        return self.sublayers[2](x, self.feed_forward)

    def step(
        self, x: Tensor, cache: DecoderCache, layer: int, self_mask: Tensor | None, record: list | None
    ) -> Tensor:
        """Incremental pass over new positions x (R, t, D), attending to the cached ones self_mask allows."""
        lc = cache.layers[layer]

        def self_block(y: Tensor) -> Tensor:
            k, v = self.self_attn.keys_values(y)  # (R, H, t, Dh)
            k, v = lc.append(k, v, cache.length, cache.capacity)  # (R, H, past + t, Dh)
            return self.self_attn.attend(y, k, v, self_mask)

        def cross_block(y: Tensor) -> Tensor:
            R, t, D = y.size()
            per_source = y.reshape(R // cache.group, cache.group * t, D)  # (N, group * t, D)
            if record is not None:
                record.append(self.cross_attn.weights(per_source, lc.cross_k, cache.src_mask).view(R, t, -1))
            return self.cross_attn.attend(per_source, lc.cross_k, lc.cross_v, cache.src_mask).view(R, t, D)

        x = self.sublayers[0](x, self_block)
        x = self.sublayers[1](x, cross_block)
        return self.sublayers[2](x, self.feed_forward)


class Embeddings(nn.Module):
    """Token embedding scaled by sqrt(D) plus sinusoidal positions, then dropout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.register_buffer("positions", sinusoids(cfg.max_positions, cfg.d_model), persistent=False)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, ids: Tensor, offset: int | Tensor = 0) -> Tensor:
        """ids (B, L) -> (B, L, D); offset is the position of ids[:, 0], or each token's position (B, L)."""
        L = ids.size(1)
        last = offset + L if isinstance(offset, int) else int(offset.max()) + 1
        if last > self.positions.size(0):
            raise ValueError(f"sequence of {last} tokens exceeds max_positions {self.positions.size(0)}")
        x = self.tokens(ids) * math.sqrt(self.d_model)
        positions = self.positions[offset : offset + L] if isinstance(offset, int) else self.positions[offset]
        return self.dropout(x + positions)


def sinusoids(n_positions: int, d_model: int) -> Tensor:
    """The paper's fixed positional encodings, (n_positions, D)."""
    position = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)  # (P, 1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, src_mask)
        return self.norm(x)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()

    def forward(self, x: Tensor, memory: Tensor, src_mask: Tensor, tgt_mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, memory, src_mask, tgt_mask)
        return self.norm(x)

    def step(self, x: Tensor, cache: DecoderCache, record: bool) -> Tensor:
        """New positions x (R, t, D) after cache.length earlier ones -> (R, t, D)."""
        cache.settle()  # torch's layers read each row's keys from its own buffer row
        rows: list[Tensor] | None = [] if record else None
        self_mask = cache.self_attention_mask(x.size(1))
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cache, i, self_mask, rows)
        if rows:
            # Alignment of the last new position, averaged over layers: (B, S).
            cache.alignments.append(torch.stack(rows).mean(dim=0)[:, -1])
        return self.norm(x)


class Generator(nn.Module):
    """Output projection tied to the shared embedding: (B, T, D) -> logits (B, T, V)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.embedding.weight)


class EncoderDecoder(nn.Module):
    """Encoder, decoder, shared source/target embeddings and a tied generator."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.embed = Embeddings(cfg)  # one table for source, target and output
        self.generator = Generator(self.embed.tokens)

    def src_mask(self, src: Tensor) -> Tensor:
        """(B, S) ids -> (B, 1, 1, S), True where a real token."""
        return (src != self.cfg.pad_id)[:, None, None, :]

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, D) and its mask (B, 1, 1, S)."""
        src_mask = self.src_mask(src)
        return self.encoder(self.embed(src), src_mask), src_mask

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Teacher-forced decoder over tgt_in (B, T) -> logits (B, T, V). Causal: position t sees <= t.

        Target padding sits after every real token, so the causal mask alone keeps real
        positions from seeing it; outputs at padded positions are ignored by the loss.
        """
        T = tgt_in.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_in.device).tril()  # (T, T)
        x = self.decoder(self.embed(tgt_in), memory, src_mask, causal)
        return self.generator(x)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S), tgt_in (B, T) -> logits (B, T, V)."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)

    def init_cache(self, memory: Tensor, src_mask: Tensor, capacity: int = 64) -> DecoderCache:
        """Cross-attention keys/values computed once per source, empty self-attention cache.

        capacity: target positions to make room for at first (the cache grows past it if needed).
        """
        return DecoderCache(layers=self.layer_caches(memory), src_mask=src_mask, capacity=capacity)

    def layer_caches(self, memory: Tensor) -> list[LayerCache]:
        """Each decoder layer's cross-attention keys/values of memory (B, S, D)."""
        layers = []
        for layer in self.decoder.layers:
            k, v = layer.cross_attn.keys_values(memory)  # (B, H, S, Dh) each, views into one (B, S, 2D)
            # Copied out once: as views, every step's attention products would copy them again.
            layers.append(LayerCache(cross_k=k.contiguous(), cross_v=v.contiguous()))
        return layers

    def decode_step(self, tgt_new: Tensor, cache: DecoderCache, record_alignment: bool = False) -> Tensor:
        """Incremental decode: new tokens (B, t) after cache.length earlier ones -> logits (B, t, V)."""
        x = self.embed(tgt_new, offset=cache.positions(tgt_new.size(1)))  # (B, t, D)
        x = self.decoder.step(x, cache, record_alignment)
        cache.length += tgt_new.size(1)
        return self.generator(x)

    def best_tokens(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's likeliest next token under logits (n, V) and its log-probability, (n,) each."""
        return best_tokens(logits)


def build_model(cfg: ModelConfig) -> EncoderDecoder:
    """The one factory: a freshly initialised model for cfg."""
    model = EncoderDecoder(cfg)
    for name, p in model.named_parameters():
        if p.dim() > 1 and "tokens" not in name:
            nn.init.xavier_uniform_(p)
    # Tied embedding/output: N(0, D^-1/2) so that scaled embeddings have unit variance.
    nn.init.normal_(model.embed.tokens.weight, mean=0.0, std=cfg.d_model**-0.5)
    with torch.no_grad():
        model.embed.tokens.weight[cfg.pad_id].zero_()
    return model
