"""Llama-shaped decoders: Llama, Mistral, Qwen2/3, Gemma 2/3 and Phi-3. RMSNorm, rotary
embeddings, grouped-query attention and a gated feed-forward; what sets the families apart
(biases, q/k norms, Gemma's norms and soft-capping, sliding windows, rotary variants) comes
from ModelConfig. Checkpoint layouts (permuted rows, Gemma's stored norms) are the loaders'
business; q, k and v (gate and up) are one product each, joined at load by fuse_projections."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import AttentionMetadata, attention
from .linear import Linear


# Checkpoints mostly store q, k and v (gate and up) as tensors of their own; the model multiplies
# each group in one product: fewer, larger matmuls (the default model: 120 a step, not 210).
_FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
          "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}


def fuse_projections(weights: dict, cat) -> dict:
    """Loaded tensors under per-projection names (`layers.0.attention.wq.weight`) -> the same,
    with each group's rows joined by `cat` (a list of parts -> one) under the fused name. A
    group missing a part is left as it is: a quantized group then keeps the fused layer on its
    float weights, and a float group fails build_model's name check."""
    out = dict(weights)
    for key in weights:
        module, _, kind = key.rpartition(".")
        for fused, parts in _FUSED.items():
            layer = module.removesuffix(parts[0])
            names = [f"{layer}{part}.{kind}" for part in parts]
            if layer != module and all(n in weights for n in names):
                out[f"{layer}{fused}.{kind}"] = cat([out.pop(n) for n in names])
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the compute dtype, as the references do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:  # Gemma scales by (1 + weight), in float32
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: ModelConfig, local: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim/2,) and the factor cos and sin are scaled by, for the
    checkpoint's base, scaling and factors. local: for Gemma 3's windowed layers (their own
    base, no scaling)."""
    rd = config.rotary_dim
    theta = config.local_rope_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    scaling = {} if local else config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    attention_factor = 1.0
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
    elif kind == "longrope":
        # Phi-3: per-frequency divisors, the long ones when the served context goes past the
        # trained one. transformers switches by each sequence's length instead, which would
        # change the keys already cached when a sequence crosses it; llama.cpp, as here, by
        # the context it serves.
        long = config.max_seq_len > scaling["original_max_position_embeddings"]
        factors = scaling["long_factor" if long else "short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float64)
        attention_factor = scaling["attention_factor"]
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    if config.rope_freq_factors is not None and not local:
        inv_freq = inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float64)
    return inv_freq.float(), attention_factor


def rotary_tables(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                  local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (max_seq_len, rotary_dim) of every position the model serves. Looked up
    rather than computed per step: compiled, each use of a computed cos or sin is recomputed
    inside the loop that reads it, and attention's loop over keys recomputed the query's
    for every key (that loop: 60 us a layer, 34 with tables; default model, 1 row, ~150 keys)."""
    inv_freq, factor = rope_inv_freq(config, local)
    positions = torch.arange(config.max_seq_len, device=device)
    freqs = positions[:, None].float() * inv_freq.to(device)  # (P, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


class Rotary:
    """cos and sin of one step's positions, for the first rotary_dim dimensions of each head,
    looked up in tables of every position (rotary_tables)."""

    def __init__(self, tables: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor):
        self.cos, self.sin = (t[positions][:, None] for t in tables)  # (N, 1, rd): broadcast over heads
        self.dim = tables[0].shape[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate halves, as the Hugging Face reference does (llama.cpp's interleaved Llama
        layout is undone at load)."""
        if self.dim != x.shape[-1]:  # partial rotary: the rest passes through
            return torch.cat((self(x[..., :self.dim]), x[..., self.dim:]), dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * self.cos + torch.cat((-x2, x1), dim=-1) * self.sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.sizes = (q, kv, kv)
        self.wqkv = Linear(config.dim, q + 2 * kv, bias=config.qkv_bias)  # q, k and v rows, one product
        self.wo = Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps, config.gemma)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps, config.gemma)
        self.scale = config.attn_scale or None
        self.softcap = config.attn_softcap
        self.window = config.window(layer)

    def forward(self, x, rotary: Rotary, meta: AttentionMetadata, layer: int):
        N = x.shape[0]
        q, k, v = self.wqkv(x).split(self.sizes, dim=-1)
        q = q.view(N, self.n_heads, self.head_dim)  # (N, nh, hd)
        k = k.view(N, self.n_kv_heads, self.head_dim)  # (N, nkv, hd)
        v = v.view(N, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention(rotary(q), rotary(k), v, layer, meta, scale=self.scale, softcap=self.softcap,
                        window=self.window)
        return self.wo(out.reshape(N, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = Linear(config.dim, 2 * config.hidden_dim, bias=False)  # gate (w1) rows, then up (w3)
        self.w2 = Linear(config.hidden_dim, config.dim, bias=False)  # down
        self.gelu = config.gemma  # GeGLU (tanh GELU); the others SwiGLU

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.w2(gate * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        eps, gemma = config.norm_eps, config.gemma
        self.attention_norm = RMSNorm(config.dim, eps, gemma)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, eps, gemma)
        self.feed_forward = FeedForward(config)
        # Gemma normalises each block's output too, before adding it to the residual stream.
        self.post_attention_norm = RMSNorm(config.dim, eps, gemma) if gemma else None
        self.post_ffn_norm = RMSNorm(config.dim, eps, gemma) if gemma else None

    def forward(self, x, rotary, meta, layer):
        h = self.attention(self.attention_norm(x), rotary, meta, layer)
        if self.post_attention_norm is not None:
            h = self.post_attention_norm(h)
        x = x + h
        h = self.feed_forward(self.ffn_norm(x))
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x + h


class Decoder(nn.Module):
    """Token ids, their positions in their own sequences and cache slots in; logits out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, config.gemma)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        self._local = [config.local_rope(i) for i in range(config.n_layers)]
        self._rotary: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}  # built on first use, on the input's device

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype, local: bool = False) -> Rotary:
        tables = self._rotary.get(local)
        if tables is None or tables[0].device != positions.device or tables[0].dtype != dtype:
            tables = self._rotary[local] = rotary_tables(self.config, dtype, positions.device, local)
        return Rotary(tables, positions)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions: (N,) flat over the batch's sequences. logits_indices: the rows
        whose logits are wanted (the output head is skipped elsewhere). Returns float32 (M, V).
        Without metadata, the tokens are one sequence attending to itself (no cache)."""
        meta = meta or AttentionMetadata.uncached(positions)
        x = self.tok_embeddings(tokens)  # (N, dim)
        if self.config.gemma:  # the reference rounds the factor to the compute dtype first
            x = x * torch.tensor(self.config.dim ** 0.5, dtype=x.dtype)
        rotary = {local: self.rotary(positions, x.dtype, local) for local in set(self._local)}
        for i, layer in enumerate(self.layers):
            x = layer(x, rotary[self._local[i]], meta, i)
        if logits_indices is not None:
            x = x[logits_indices]
        logits = self.output(self.norm(x)).float()
        if cap := self.config.final_softcap:
            logits = torch.tanh(logits / cap) * cap
        return logits
