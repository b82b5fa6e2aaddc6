"""GPT-2 family transformer: learned positions, LayerNorm, GELU, tied output head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import AttentionMetadata, attention
from .linear import Linear


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.c_attn = Linear(config.dim, 3 * config.dim)  # q, k, v in one projection
        self.c_proj = Linear(config.dim, config.dim)

    def forward(self, x, meta: AttentionMetadata, layer: int):
        N, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=1)
        q, k, v = (t.view(N, self.n_heads, self.head_dim) for t in (q, k, v))  # (N, nh, hd)
        return self.c_proj(attention(q, k, v, layer, meta).reshape(N, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = Linear(config.dim, config.hidden_dim)
        self.c_proj = Linear(config.hidden_dim, config.dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, meta, layer):
        x = x + self.attn(self.ln_1(x), meta, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """Same contract as Llama."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.wpe = nn.Embedding(config.max_seq_len, config.dim)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.lm_head = Linear(config.dim, config.vocab_size, bias=False)

    def tie_weights(self):
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        meta = meta or AttentionMetadata.uncached(positions)
        x = self.wte(tokens) + self.wpe(positions)  # (N, dim)
        for i, block in enumerate(self.h):
            x = block(x, meta, i)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.lm_head(self.ln_f(x)).float()
