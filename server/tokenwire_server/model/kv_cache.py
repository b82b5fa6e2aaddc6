"""The paged KV cache's memory, and the attention that reads it.

Memory: per layer, one tensor of `num_slots` token slots (slot = block * block_size + offset)
for keys and one for values; which slots a sequence owns is the engine's BlockManager's
business. Attention takes a flat batch of N tokens from many sequences (decodes of one
token and prompt chunks of several) and an AttentionMetadata saying where each token's
keys go and which slots each query reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .linear import pad_rows

KEY_TILE = 64  # keys per tile in batch-invariant attention (tiled_attention)


class KVCache:
    def __init__(self, n_layers: int, num_slots: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        # Heads first: gathering a batch's slots then gives each head's keys contiguous,
        # ready for batched matmuls without a copy.
        shape = (n_kv_heads, num_slots, head_dim)
        # Zeros, not empty: decode attention reads padded, masked slots too, and a masked
        # probability of 0 times uninitialised memory that happens to be NaN is NaN. Touching
        # the memory at start also keeps the resident size flat while serving.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.num_slots = num_slots


@dataclass
class Segment:
    """Several tokens of one sequence (a prompt chunk): flat rows [start, end)."""

    start: int
    end: int
    key_slots: torch.Tensor | None  # (K,) slots of keys 0..K-1; None: the chunk's own keys, no cache
    mask: torch.Tensor  # (1, 1, T, K) bool
    positions: torch.Tensor  # (T,) the queries' positions
    key_positions: torch.Tensor  # (K,) the keys' positions

    def windowed(self, window: int) -> torch.Tensor:
        """The mask for a layer that sees only the last `window` positions."""
        return self.mask & (self.key_positions[None, :] > self.positions[:, None] - window)[None, None]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor | None  # (N,) where each token's keys and values are written
    num_decodes: int = 0  # rows [0, num_decodes) are one token each, attended to as a batch
    decode_key_slots: torch.Tensor | None = None  # (D, S) slots each decode row reads (padded)
    decode_mask: torch.Tensor | None = None  # (D, 1, S) bool: real keys
    segments: list[Segment] = field(default_factory=list)
    cache: KVCache | None = None
    decode_positions: torch.Tensor | None = None  # (D,) each decode row's position; key j is position j
    # Batch-invariant attention (see tiled_attention): key counts are padded to multiples of
    # this, and every query row is computed the same way wherever it sits. 0: the fast kernels.
    key_tile: int = 0
    _windowed: dict = field(default_factory=dict, repr=False)

    @classmethod
    def uncached(cls, positions: torch.Tensor) -> AttentionMetadata:
        """One sequence, no cache: every token attends to the ones before it (for tests and
        whole-sequence logits)."""
        T = positions.shape[0]
        mask = (positions[None, :] <= positions[:, None])[None, None]
        return cls(slot_mapping=None, segments=[Segment(0, T, None, mask, positions, positions)])

    def masks(self, window: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The decode mask and each segment's mask for layers that see only the last `window`
        positions (0: all), built once per step for each window."""
        if not window:
            return self.decode_mask, [seg.mask for seg in self.segments]
        if window not in self._windowed:
            decode = None
            if self.num_decodes:
                keys = torch.arange(self.decode_mask.shape[-1], device=self.decode_mask.device)
                decode = self.decode_mask & (keys[None, None] > (self.decode_positions - window)[:, None, None])
            self._windowed[window] = decode, [seg.windowed(window) for seg in self.segments]
        return self._windowed[window]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, meta: AttentionMetadata,
              scale: float | None = None, softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """q (N, nh, hd), k and v (N, nkv, hd) of this step's tokens -> (N, nh, hd). The layer's
    own options: scale (None: hd ** -0.5), softcap (scores -> softcap * tanh(scores /
    softcap); 0: none) and window (only the last `window` positions; 0: all)."""
    gqa = q.shape[1] != k.shape[1]
    scale = scale or q.shape[2] ** -0.5
    cache = meta.cache
    if cache is not None:
        k_cache, v_cache = cache.k[layer], cache.v[layer]  # (nkv, slots, hd)
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    out = torch.empty_like(q)
    D = meta.num_decodes
    decode_mask, segment_masks = meta.masks(window)
    if meta.key_tile:
        _tiled(q, k_cache, v_cache, meta, decode_mask, segment_masks, scale, softcap, out)
        return out
    if D == 1 and torch.compiler.is_compiling():
        out[:D] = _one_row_decode(q[:D], k_cache, v_cache, meta, decode_mask, scale, softcap)
    elif D:
        # One query per row: plain 3-D batched matmuls, one batch entry per (kv head, row),
        # with the query heads that share a kv head as its rows. About 7x faster than the
        # fused kernel in bfloat16 on CPU, and 4-D matmuls over strided batches are slower
        # still (measured: 4.9 ms against 0.33 ms per layer at 32 rows of 256 keys).
        nh, nkv, hd = q.shape[1], k.shape[1], q.shape[2]
        g, S = nh // nkv, meta.decode_key_slots.shape[1]
        keys, values = _decode_keys(k_cache, meta), _decode_keys(v_cache, meta)
        queries = q[:D].view(D, nkv, g, hd).transpose(0, 1).reshape(nkv * D, g, hd)
        scores = torch.bmm(queries, keys.transpose(1, 2)).view(nkv, D, g, S)
        scores = _capped(scores.float() * scale, softcap).masked_fill(~decode_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(nkv * D, g, S)
        out[:D] = torch.bmm(probs, values).view(nkv, D, g, hd).transpose(0, 1).reshape(D, nh, hd)
    for seg, mask in zip(meta.segments, segment_masks):
        if seg.key_slots is None:
            keys, values = k[seg.start:seg.end].transpose(0, 1), v[seg.start:seg.end].transpose(0, 1)
        else:
            keys, values = k_cache.index_select(1, seg.key_slots), v_cache.index_select(1, seg.key_slots)
        qs = q[seg.start:seg.end].transpose(0, 1)[None]  # (1, nh, T, hd)
        if softcap:  # no fused kernel caps scores
            y = _capped_attention(qs, keys[None], values[None], mask, scale, softcap)
        else:
            y = F.scaled_dot_product_attention(qs, keys[None], values[None], attn_mask=mask, enable_gqa=gqa,
                                               scale=scale)
        out[seg.start:seg.end] = y[0].transpose(0, 1)
    return out


def _capped(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    return torch.tanh(scores / softcap) * softcap if softcap else scores


def _capped_attention(q, keys, values, mask, scale: float, softcap: float) -> torch.Tensor:
    """q (1, nh, T, hd), keys and values (1, nkv, K, hd), mask (1, 1, T, K): attention with
    soft-capped scores, in float32 as the reference computes its softmax."""
    g = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(g, dim=1), values.repeat_interleave(g, dim=1)
    scores = _capped((q @ keys.transpose(-1, -2)).float() * scale, softcap).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(q.dtype) @ values


def _one_row_decode(q, k_cache, v_cache, meta, decode_mask, scale, softcap):
    """One decode row inside a compiled step: the compiler fuses the slot gather with the
    conversion to float32 into one loop, and the products run as float32 batched matmuls
    (default model, 1 row, ~150 keys, per layer: 44 us, against 67 with the scores written
    elementwise and ~190 with the weighted sum too: a matmul's inputs are stored once, where
    the elementwise loops recomputed the query's rotation for every key)."""
    nh, hd = q.shape[1:]
    nkv = k_cache.shape[0]
    g = nh // nkv
    slots = meta.decode_key_slots[0]  # (S,)
    keys, values = k_cache[:, slots].float(), v_cache[:, slots].float()  # (nkv, S, hd)
    scores = torch.bmm(q[0].view(nkv, g, hd).float(), keys.transpose(1, 2)) * scale  # (nkv, g, S)
    scores = _capped(scores, softcap).masked_fill(~decode_mask[0], float("-inf"))
    y = torch.bmm(torch.softmax(scores, dim=-1), values)  # (nkv, g, hd)
    return y.view(1, nh, hd).to(q.dtype)


def _decode_keys(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """The slots decode rows read, (nkv, slots, hd) -> (nkv * D, S, hd): one batch entry per (kv head, row)."""
    D, S = meta.decode_key_slots.shape
    return cache.index_select(1, meta.decode_key_slots.reshape(-1)).view(cache.shape[0] * D, S, cache.shape[2])


def tiled_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                    tile: int, scale: float | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Attention whose result for a query row does not depend on the rows beside it, on how
    many keys the others have, or on where a prompt was cut into chunks.

    q (B, T, g, hd): T queries of g heads each sharing one kv head; keys and values (B, S, hd)
    with S a multiple of `tile`; mask (B or 1, T, S) bool. The fused kernels pick their
    blocking from the shapes, so the same row sums in another order beside other rows. Here
    every matrix product has a fixed shape (rows x `tile` keys, `tile` keys x hd), the
    maximum is exact in any order, and the per-tile sums are added left to right, where
    tiles past a row's last key add exact zeros. Query rows are padded as in model/linear.py.
    scale and softcap as in attention()."""
    B, T, g, hd = q.shape
    S = keys.shape[1]
    nt, M = S // tile, T * g
    qs = pad_rows(q.reshape(B, M, hd))
    rows = qs.shape[1]
    allowed = F.pad(mask[:, :, None].expand(mask.shape[0], T, g, S).reshape(-1, M, S), (0, 0, 0, rows - M),
                    value=True)  # padded query rows attend to everything: finite, then dropped
    scores = torch.bmm(qs[:, None].expand(B, nt, rows, hd).reshape(B * nt, rows, hd),
                       keys.reshape(B * nt, tile, hd).transpose(1, 2)).view(B, nt, rows, tile)
    scores = _capped(scores.float() * (scale or hd ** -0.5), softcap).masked_fill(
        ~allowed.view(-1, rows, nt, tile).transpose(1, 2), float("-inf"))
    # Every row has a key unmasked (its own), so the maximum is finite.
    probs = torch.exp(scores - scores.amax(dim=(1, 3), keepdim=True))
    total = probs.sum(-1).cumsum(1)[:, -1]  # (B, rows)
    parts = torch.bmm(probs.to(values.dtype).view(B * nt, rows, tile), values.reshape(B * nt, tile, hd))
    out = parts.view(B, nt, rows, hd).float().cumsum(1)[:, -1] / total[..., None]
    return out[:, :M].view(B, T, g, hd).to(q.dtype)


def _tiled(q, k_cache, v_cache, meta: AttentionMetadata, decode_mask, segment_masks, scale: float,
           softcap: float, out: torch.Tensor):
    """Every row of the step through tiled_attention (meta.key_tile > 0)."""
    nh, nkv, hd = q.shape[1], k_cache.shape[0], q.shape[2]
    g, D, tile = nh // nkv, meta.num_decodes, meta.key_tile
    if D:
        S = meta.decode_key_slots.shape[1]
        keys, values = _decode_keys(k_cache, meta), _decode_keys(v_cache, meta)
        queries = q[:D].view(D, 1, nkv, g, hd).permute(2, 0, 1, 3, 4).reshape(nkv * D, 1, g, hd)
        mask = decode_mask[None].expand(nkv, D, 1, S).reshape(nkv * D, 1, S)
        y = tiled_attention(queries, keys, values, mask, tile, scale, softcap)  # (nkv * D, 1, g, hd)
        out[:D] = y.view(nkv, D, g, hd).transpose(0, 1).reshape(D, nh, hd)
    for seg, seg_mask in zip(meta.segments, segment_masks):
        T = seg.end - seg.start
        keys, values = k_cache.index_select(1, seg.key_slots), v_cache.index_select(1, seg.key_slots)
        queries = q[seg.start:seg.end].view(T, nkv, g, hd).transpose(0, 1)
        y = tiled_attention(queries, keys, values, seg_mask[0], tile, scale, softcap)  # (nkv, T, g, hd)
        out[seg.start:seg.end] = y.transpose(0, 1).reshape(T, nh, hd)
