"""Llama family transformer: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import AttentionMetadata, attention
from .linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the compute dtype, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) with the checkpoint's base, scaling and factors."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, blended))
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float64)
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, meta: AttentionMetadata, layer: int):
        N = x.shape[0]
        q = self.wq(x).view(N, self.n_heads, self.head_dim)  # (N, nh, hd)
        k = self.wk(x).view(N, self.n_kv_heads, self.head_dim)  # (N, nkv, hd)
        v = self.wv(x).view(N, self.n_kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return self.wo(attention(q, k, v, layer, meta).reshape(N, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = Linear(config.dim, config.hidden_dim, bias=False)  # gate
        self.w2 = Linear(config.hidden_dim, config.dim, bias=False)  # down
        self.w3 = Linear(config.dim, config.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, meta, layer):
        x = x + self.attention(self.attention_norm(x), cos, sin, meta, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Token ids, their positions in their own sequences and cache slots in; logits out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        self._inv_freq: torch.Tensor | None = None  # built on first use, on the input's device

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype):
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.config).to(positions.device)
        freqs = positions[:, None].float() * self._inv_freq  # (N, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (N, 1, hd): broadcast over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions: (N,) flat over the batch's sequences. logits_indices: the rows
        whose logits are wanted (the output head is skipped elsewhere). Returns float32 (M, V).
        Without metadata, the tokens are one sequence attending to itself (no cache)."""
        meta = meta or AttentionMetadata.uncached(positions)
        x = self.tok_embeddings(tokens)  # (N, dim)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, meta, i)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.output(self.norm(x)).float()
