"""ModelRunner: the one place that builds tensors and calls the model. It owns the KV
cache's memory; which slots belong to whom comes from the scheduler's sequences."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..model.batch_invariant import KEY_TILE
from ..model.batch_invariant import rows as invariant_rows
from ..model.kv_cache import AttentionMetadata, KVCache, Segment, causal_mask
from . import cpu_threads
from .scheduler import ScheduledSequence


@dataclass(frozen=True)
class LogitsSpan:
    """Rows [row, row + count) of a step's logits hold positions first, first + 1, ... of a sequence."""

    row: int
    count: int
    first: int


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, kv_cache_tokens: int = 65536,
                 block_size: int = 16, single_thread_rows: int = 0, batch_invariant: bool = False,
                 threads: int | None = None):
        self.model, self.device, self.dtype = model, device, dtype
        self.single_thread_rows = single_thread_rows if cpu_threads.supported() else 0
        self.batch_invariant = batch_invariant
        # This engine's CPU threads: steps set them on the engine's own thread (cpu_threads).
        self.threads = threads or torch.get_num_threads()
        self.config = c = model.config
        self.block_size = block_size
        self.num_blocks = max(1, kv_cache_tokens // block_size)
        self.cache = KVCache(c.n_layers, self.num_blocks * block_size, c.n_kv_heads, c.head_dim, dtype, device)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def key_cost(self) -> float:
        """What attending to one more key costs a prompt token, as a fraction of the rest of its
        work (the layers' matmuls): 4 flops per query head and head dimension per layer, against
        2 per weight, and the fused attention kernel does about a third of the matmuls' flops per
        second (measured in bfloat16 on CPU: a 511-token chunk costs 0.58 s more per 1,000 keys
        of context over 30 layers, its matmuls 0.63 s). For this model about 1/1000: at 8,000
        keys a prompt token costs 9 times what it costs at the start of a prompt."""
        c = self.config
        weights = c.dim * (c.n_heads + c.n_kv_heads) * c.head_dim * 2 + 3 * c.dim * c.hidden_dim
        return 3 * 4 * c.n_heads * c.head_dim / (2 * weights)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSequence]) -> tuple[torch.Tensor, list[LogitsSpan]]:
        """Run one step: every scheduled sequence's next tokens. Returns the logits rows that
        were needed (float32, (M, V)) and, per scheduled sequence in order, where its rows are."""
        bs, dev = self.block_size, self.device
        pieces = sorted(self._pieces(batch), key=lambda p: p[0])  # (kind, index in batch, start, n)
        tokens, positions, slots = [], [], []
        rows: list[list[tuple[int, int, int]]] = [[] for _ in batch]  # per sequence: (start, row, n)
        decode_rows, segments = [], []
        quantized = 0  # batch-invariant: rows of generated positions (4-bit weights where a layer has them)
        for kind, i, start, n in pieces:
            seq = batch[i].seq
            table = seq.block_table.blocks
            row = len(tokens)
            tokens += seq.tokens_between(start, start + n)
            positions += range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            rows[i].append((start, row, n))
            quantized += n if kind < PROMPT else 0
            if kind == DECODE:
                decode_rows.append((seq, start + 1))
            else:
                segments.append((row, n, seq, start))
        wanted, spans = [], []
        for i, sched in enumerate(batch):
            seq = sched.seq
            start = seq.num_computed
            first = max(seq.logits_from, start)
            spans.append(LogitsSpan(len(wanted), max(0, start + sched.num_tokens - first), first))
            for p_start, row, n in sorted(rows[i]):
                wanted += range(row + max(0, first - p_start), row + n)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev), num_decodes=len(decode_rows),
                                 cache=self.cache, invariant=self.batch_invariant)
        if decode_rows:
            key_slots, real = self._key_slots([s for s, _ in decode_rows], [n for _, n in decode_rows])
            meta.decode_key_slots = key_slots
            meta.decode_mask = torch.zeros(real.shape, device=dev).masked_fill_(~real, float("-inf"))[:, None]
        for row, n, seq, start in segments:
            key_slots, _ = self._key_slots([seq], [start + n])
            q_pos = torch.arange(start, start + n, device=dev)
            mask = causal_mask(q_pos, torch.arange(key_slots.shape[1], device=dev), self.dtype)
            meta.segments.append(Segment(row, row + n, key_slots[0], mask))
        plan = invariant_rows(quantized) if self.batch_invariant else nullcontext()
        with self._threads_for(len(tokens)), plan:
            logits = self.model(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), meta,
                                torch.tensor(wanted, dtype=torch.long, device=dev))
        return logits, spans

    def _pieces(self, batch: list[ScheduledSequence]):
        """Split the scheduled tokens into flat-batch pieces (kind, index, start, n); rows are
        ordered by kind. By default single tokens are decode rows, the rest prompt chunks.
        Batch-invariant: a row's kind follows from its position alone, generated ones first."""
        for i, sched in enumerate(batch):
            seq, n = sched.seq, sched.num_tokens
            start, end = seq.num_computed, seq.num_computed + n
            if not self.batch_invariant:
                yield (DECODE if n == 1 else PROMPT), i, start, n
                continue
            cut = min(max(len(seq.prompt_ids), start), end)  # generated positions from here (recompute)
            if cut > start:
                yield PROMPT, i, start, cut - start
            if end - cut == 1:
                yield DECODE, i, cut, 1
            elif end > cut:
                yield GENERATED, i, cut, end - cut

    def _key_slots(self, seqs, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of key positions 0..length-1 of each sequence, padded to the longest (and, batch-
        invariant, to whole KEY_TILEs): (R, S) slots and (R, S) bool, True for real keys. Padding
        reads the sequence's own position 0: written, so finite whatever unused memory holds
        (its probability is 0, and 0 x NaN would be NaN)."""
        width = max(lengths)
        if self.batch_invariant:
            width = -(-width // KEY_TILE) * KEY_TILE
        pos = torch.arange(width, device=self.device)
        real = pos[None] < torch.tensor(lengths, device=self.device)[:, None]
        pos = torch.where(real, pos[None], 0)
        return self._tables(seqs).gather(1, pos // self.block_size) * self.block_size + pos % self.block_size, real

    @contextmanager
    def _threads_for(self, rows: int):
        """Steps of a few rows run on one CPU thread: their operations are too small to gain
        from more, and every parallel region waits for its slowest thread, which costs most
        when other work (the gRPC loop, a client) shares the cores. Measured through the
        server at concurrency 1: 30.0 tokens/s on one thread for such steps against 18.7 on two.
        Only the stepping thread changes (cpu_threads), and it goes back to this engine's own
        count after, never to a count read back."""
        if self.device.type != "cpu" or rows > self.single_thread_rows:
            yield
            return
        cpu_threads.set_for_this_thread(1)
        try:
            yield
        finally:
            cpu_threads.set_for_this_thread(self.threads)

    def _tables(self, seqs) -> torch.Tensor:
        width = max(len(s.block_table.blocks) for s in seqs)
        return torch.tensor([s.block_table.blocks + [0] * (width - len(s.block_table.blocks)) for s in seqs],
                            device=self.device)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits (T, V) of every position of one sequence, computed whole without the cache."""
        tokens = torch.tensor(token_ids, device=self.device)
        return self.model(tokens, torch.arange(len(token_ids), device=self.device))


# Kinds of flat-batch pieces, in row order: decode rows (one token each), then chunks of generated
# positions (a recompute, batch-invariant only), then prompt chunks.
DECODE, GENERATED, PROMPT = 0, 1, 2
