"""GPT-2 family transformer: learned positions, LayerNorm, GELU, tied output head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache, causal_mask


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.c_attn = nn.Linear(config.dim, 3 * config.dim)  # q, k, v in one projection
        self.c_proj = nn.Linear(config.dim, config.dim)

    def forward(self, x, mask, positions, cache: KVCache | None, layer: int, kv_len: int):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, positions, k, v, kv_len)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.dim, config.hidden_dim)
        self.c_proj = nn.Linear(config.hidden_dim, config.dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, mask, positions, cache, layer, kv_len):
        x = x + self.attn(self.ln_1(x), mask, positions, cache, layer, kv_len)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """Token ids and per-sequence positions in, logits out (same contract as Llama)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.wpe = nn.Embedding(config.max_seq_len, config.dim)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)

    def tie_weights(self):
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(positions)  # (B, T, dim)
        mask, kv_len = causal_mask(positions, cache)
        for i, block in enumerate(self.h):
            x = block(x, mask, positions, cache, i, kv_len)
        if select is not None:
            x = x[torch.arange(x.shape[0], device=x.device), select]
        return self.lm_head(self.ln_f(x)).float()
