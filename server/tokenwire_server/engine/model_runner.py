"""ModelRunner: the one place that builds tensors and calls the model."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..model.kv_cache import KVCache


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.config = model.config
        self._caches: weakref.WeakSet[KVCache] = weakref.WeakSet()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        cache = KVCache(c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim, self.dtype, self.device)
        self._caches.add(cache)
        return cache

    @property
    def cache_bytes_in_use(self) -> int:
        """Memory held by KV caches still alive (a finished or cancelled request holds none)."""
        return sum(c.nbytes for c in self._caches)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, token_ids: list[int], start: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        """Feed one sequence's tokens at positions start.. into the cache; logits (V,) of the
        last, or (T, V) of every position when all_logits."""
        tokens = torch.tensor([token_ids], device=self.device)
        positions = torch.arange(start, start + len(token_ids), device=self.device)[None]
        select = None if all_logits else torch.tensor([len(token_ids) - 1], device=self.device)
        return self.model(tokens, positions, cache, select=select)[0]

    @torch.inference_mode()
    def decode(self, cache: KVCache, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One new token per row at its own position; logits (B, V)."""
        tokens = torch.tensor(token_ids, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        return self.model(tokens, pos, cache)[:, -1]

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits (T, V) of every position of one sequence, without a cache."""
        tokens = torch.tensor([token_ids], device=self.device)
        positions = torch.arange(len(token_ids), device=self.device)[None]
        return self.model(tokens, positions)[0]
