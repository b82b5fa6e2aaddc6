"""KVCache: keys and values of past positions, one slot per position per sequence."""

from __future__ import annotations

import torch


class KVCache:
    """Contiguous cache for a fixed batch of sequences.

    Position p of row b lives in slot p, so the slot index is the key's position
    and a causal mask is just `key_position <= query_position`.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.rows = torch.arange(batch, device=device)[:, None]  # (B, 1) for scatter indexing

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at `positions` (B, T); return slots [0, kv_len) of the layer."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        rows = self.rows[: k.shape[0]]
        # Advanced indices around a slice put the indexed dims first: (B, T, Hkv, D).
        k_cache[rows, :, positions] = k.transpose(1, 2)
        v_cache[rows, :, positions] = v.transpose(1, 2)
        return k_cache[: k.shape[0], :, :kv_len], v_cache[: k.shape[0], :, :kv_len]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def causal_mask(positions: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, int]:
    """Mask (B, 1, T, S) where a query at position p sees keys at positions <= p, and S.

    Without a cache the keys are this call's own tokens; with one they are slots [0, S)."""
    if cache is None:
        kv_len, key_positions = positions.shape[1], positions
    else:
        kv_len = int(positions.max()) + 1
        key_positions = torch.arange(kv_len, device=positions.device).expand(positions.shape[0], -1)
    return key_positions[:, None, None, :] <= positions[:, None, :, None], kv_len
