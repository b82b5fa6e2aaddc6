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

from .batch_invariant import ROW_TILE, pad_rows


class KVCache:
    def __init__(self, n_layers: int, num_slots: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        # Heads first: gathering a batch's slots then gives each head's keys contiguous,
        # ready for batched matmuls without a copy.
        shape = (n_kv_heads, num_slots, head_dim)
        # Zeros: touching the memory at start keeps the resident size flat while serving.
        # (Padded key positions read a row's own written slots, so what unused memory holds
        # never reaches an output: a masked probability of 0 times NaN would be NaN.)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.num_slots = num_slots


@dataclass
class Segment:
    """Several tokens of one sequence (a prompt chunk): flat rows [start, end)."""

    start: int
    end: int
    key_slots: torch.Tensor | None  # (K,) slots of keys 0..K-1; None: the chunk's own keys, no cache
    mask: torch.Tensor  # (1, 1, T, K) additive, in the compute dtype: 0 where a query sees a key, -inf not


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor | None  # (N,) where each token's keys and values are written
    num_decodes: int = 0  # rows [0, num_decodes) are one token each, attended to as a batch
    decode_key_slots: torch.Tensor | None = None  # (D, S) slots each decode row reads (padded)
    decode_mask: torch.Tensor | None = None  # (D, 1, S) float32, additive: 0 for real keys, -inf for padding
    segments: list[Segment] = field(default_factory=list)
    cache: KVCache | None = None
    # Batch-invariant: prompt chunks use the decode rows' plain matmuls too (not the fused
    # kernel, whose blocking depends on the chunk's length), with rows padded to whole tiles.
    invariant: bool = False

    @classmethod
    def uncached(cls, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> AttentionMetadata:
        """One sequence, no cache: every token attends to the ones before it (for tests and
        whole-sequence logits)."""
        mask = causal_mask(positions, positions, dtype)
        return cls(slot_mapping=None, segments=[Segment(0, positions.shape[0], None, mask)])


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, T, K) additive mask: query i sees key j when k_pos[j] <= q_pos[i]. Built once per
    step in the compute dtype (a boolean mask is converted again in every layer)."""
    mask = torch.zeros(q_pos.shape[0], k_pos.shape[0], dtype=dtype, device=q_pos.device)
    return mask.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))[None, None]


QUERY_TILE = 64  # prompt-chunk queries per matmul in batch-invariant mode (bounds the float32 scores)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, meta: AttentionMetadata) -> torch.Tensor:
    """q (N, nh, hd), k and v (N, nkv, hd) of this step's tokens -> (N, nh, hd)."""
    nh, nkv, hd = q.shape[1], k.shape[1], q.shape[2]
    g = nh // nkv
    cache = meta.cache
    if cache is not None:
        k_cache, v_cache = cache.k[layer], cache.v[layer]  # (nkv, slots, hd)
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    out = torch.empty_like(q)
    row_tile = ROW_TILE if meta.invariant else 1
    D = meta.num_decodes
    if D:
        # One query per row: plain 3-D batched matmuls, one batch entry per (kv head, row),
        # with the query heads that share a kv head as its rows. About 7x faster than the
        # fused kernel in bfloat16 on CPU, and 4-D matmuls over strided batches are slower
        # still (measured: 4.9 ms against 0.33 ms per layer at 32 rows of 256 keys).
        S = meta.decode_key_slots.shape[1]
        flat = meta.decode_key_slots.reshape(-1)
        keys = k_cache.index_select(1, flat).view(nkv * D, S, hd)
        values = v_cache.index_select(1, flat).view(nkv * D, S, hd)
        queries = q[:D].view(D, nkv, g, hd).transpose(0, 1).reshape(nkv * D, g, hd)
        bias = meta.decode_mask.repeat(nkv, 1, 1)  # (nkv * D, 1, S), kv head major like the batch
        y = _attend(queries, keys, values, bias, row_tile)
        out[:D] = y.view(nkv, D, g, hd).transpose(0, 1).reshape(D, nh, hd)
    for seg in meta.segments:
        if seg.key_slots is None:
            keys, values = k[seg.start:seg.end].transpose(0, 1), v[seg.start:seg.end].transpose(0, 1)
        else:
            keys, values = k_cache.index_select(1, seg.key_slots), v_cache.index_select(1, seg.key_slots)
        if meta.invariant:
            for a in range(seg.start, seg.end, QUERY_TILE):
                b = min(seg.end, a + QUERY_TILE)
                t = b - a
                queries = q[a:b].view(t, nkv, g, hd).transpose(0, 1).reshape(nkv, t * g, hd)
                bias = seg.mask[0, 0, a - seg.start:b - seg.start, None, :].expand(t, g, -1).reshape(1, t * g, -1)
                y = _attend(queries, keys, values, bias, row_tile)
                out[a:b] = y.view(nkv, t, g, hd).transpose(0, 1).reshape(t, nh, hd)
            continue
        qs = q[seg.start:seg.end].transpose(0, 1)[None]  # (1, nh, T, hd)
        y = F.scaled_dot_product_attention(qs, keys[None], values[None], attn_mask=seg.mask, enable_gqa=nh != nkv)
        out[seg.start:seg.end] = y[0].transpose(0, 1)
    return out


def _attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
            row_tile: int = 1) -> torch.Tensor:
    """queries (B, M, hd), keys and values (B, S, hd), bias broadcastable to (B, M, S) (0 or
    -inf) -> (B, M, hd). Scores and softmax in float32; query rows padded to whole tiles."""
    M, hd = queries.shape[1], queries.shape[2]
    scores = torch.bmm(pad_rows(queries, row_tile), keys.transpose(1, 2))[:, :M]
    probs = torch.softmax(scores.float() * hd ** -0.5 + bias, dim=-1).to(queries.dtype)
    return torch.bmm(pad_rows(probs, row_tile), values)[:, :M]
