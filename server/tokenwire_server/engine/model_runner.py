"""ModelRunner: the one place that builds tensors and calls the model. It owns the KV
cache's memory; which slots belong to whom comes from the scheduler's sequences."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..model import linear
from ..model.kv_cache import KEY_TILE, AttentionMetadata, KVCache, Segment
from .scheduler import ScheduledSequence


@dataclass(frozen=True)
class LogitsSpan:
    """Rows [row, row + count) of a step's logits hold positions first, first + 1, ... of a sequence."""

    row: int
    count: int
    first: int


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, kv_cache_tokens: int = 65536,
                 block_size: int = 16, single_thread_rows: int = 0, batch_invariant: bool = False):
        self.model, self.device, self.dtype = model, device, dtype
        self.single_thread_rows = single_thread_rows
        # Batch invariance: products in padded rows (model/linear.py), attention in tiles of keys
        # (kv_cache.tiled_attention).
        self.batch_invariant = batch_invariant
        self.key_tile = KEY_TILE if batch_invariant else 0
        self.threads = torch.get_num_threads()  # this engine's count, restored after small steps
        self.config = c = model.config
        self.block_size = block_size
        self.num_blocks = max(1, kv_cache_tokens // block_size)
        self.cache = KVCache(c.n_layers, self.num_blocks * block_size, c.n_kv_heads, c.head_dim, dtype, device)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _key_count(self, keys: int) -> int:
        """How many keys attention reads for `keys` real ones: rounded up to whole key tiles."""
        return -(-keys // self.key_tile) * self.key_tile if self.key_tile else keys

    def _slots(self, tables: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Slots of positions `pos` (P,) for each row of block tables (R, max_blocks) -> (R, P)."""
        return tables[:, pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSequence]) -> tuple[torch.Tensor, list[LogitsSpan]]:
        """Run one step: every scheduled sequence's next tokens. Returns the logits rows that
        were needed (float32, (M, V)) and, per scheduled sequence in order, where its rows are."""
        order = sorted(range(len(batch)), key=lambda i: batch[i].num_tokens > 1)  # single tokens first
        bs, dev = self.block_size, self.device
        tokens, positions, slots, wanted = [], [], [], []
        spans: list[LogitsSpan | None] = [None] * len(batch)
        decode_rows, segments = [], []
        for i in order:
            seq, n = batch[i].seq, batch[i].num_tokens
            start = seq.num_computed
            table = seq.block_table.blocks
            row = len(tokens)
            tokens += seq.tokens_between(start, start + n)
            positions += range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            first = max(seq.logits_from, start)
            spans[i] = LogitsSpan(len(wanted), max(0, start + n - first), first)
            wanted += range(row + first - start, row + n)
            if n == 1:
                decode_rows.append((seq, start + 1))
            else:
                segments.append((row, n, seq, start))
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev), num_decodes=len(decode_rows),
                                 cache=self.cache, key_tile=self.key_tile)
        if decode_rows:
            lengths = torch.tensor([n for _, n in decode_rows], device=dev)
            S = self._key_count(int(lengths.max()))
            # A shorter row's padded positions repeat its last key: masked out, they still
            # must hold numbers (probability 0 x NaN is NaN), and unwritten slots may not.
            pos = torch.minimum(torch.arange(S, device=dev)[None], lengths[:, None] - 1)
            tables = self._tables([s for s, _ in decode_rows])
            meta.decode_key_slots = tables.gather(1, pos // bs) * bs + pos % bs
            meta.decode_mask = (torch.arange(S, device=dev)[None] < lengths[:, None])[:, None]
            meta.decode_positions = lengths - 1
        for row, n, seq, start in segments:
            K = self._key_count(start + n)
            # Padded positions repeat the last key, as for decode rows above.
            pos = torch.arange(K, device=dev).clamp(max=start + n - 1)
            key_slots = self._slots(self._tables([seq]), pos)[0]
            q_pos = torch.arange(start, start + n, device=dev)
            key_pos = torch.arange(K, device=dev)
            mask = (key_pos[None] <= q_pos[:, None])[None, None]
            meta.segments.append(Segment(row, row + n, key_slots, mask, q_pos, key_pos))
        with self._threads_for(len(tokens)), linear.batch_invariant(self.batch_invariant):
            logits = self.model(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), meta,
                                torch.tensor(wanted, dtype=torch.long, device=dev))
        return logits, spans

    @contextmanager
    def _threads_for(self, rows: int):
        """Steps of a few rows run on one CPU thread: their operations are too small to gain
        from more, and every parallel region waits for its slowest thread, which costs most
        when other work (the gRPC loop, a client) shares the cores. Measured through the
        server at concurrency 1: 30.0 tokens/s on one thread for such steps against 18.7 on two."""
        if self.device.type != "cpu":
            yield
            return
        # torch's count is partly process-wide: a thread adopts the last one set anywhere at
        # its first parallel op. So every step sets this engine's own count (never one read
        # back), and a small step restores it after: another engine in the process, or a
        # thread that set its own, cannot change the threads this engine's steps run on.
        torch.set_num_threads(1 if rows <= self.single_thread_rows else self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(self.threads)

    def _tables(self, seqs) -> torch.Tensor:
        width = max(len(s.block_table.blocks) for s in seqs)
        return torch.tensor([s.block_table.blocks + [0] * (width - len(s.block_table.blocks)) for s in seqs],
                            device=self.device)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits (T, V) of every position of one sequence, computed whole without the cache."""
        tokens = torch.tensor(token_ids, device=self.device)
        return self.model(tokens, torch.arange(len(token_ids), device=self.device))
