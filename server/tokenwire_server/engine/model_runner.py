"""ModelRunner: the one place that builds tensors and calls the model. It owns the KV
cache's memory; which slots belong to whom comes from the scheduler's sequences."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..model import linear
from ..model.kv_cache import KEY_TILE, AttentionMetadata, KVCache, Segment
from .scheduler import ScheduledSequence

log = logging.getLogger(__name__)
RECOMPILE = "Detected recompile"  # torch's message under the fail_on_recompile stance


@dataclass(frozen=True)
class LogitsSpan:
    """Rows [row, row + count) of a step's logits hold positions first, first + 1, ... of a sequence."""

    row: int
    count: int
    first: int


def _unchanging_state(guards) -> list[bool]:
    """Which of a compiled graph's guards to check on each call (torch.compile's
    guard_filter_fn): not those on the model or the KV cache. The runner owns both; neither
    is replaced or reshaped while it lives, so checking their ~550 tensors on every step
    (about 6,000 guards) could only ever pass. The inputs' shapes, which pick the graph, stay."""
    fixed = ("self", "L['self']", "meta.cache", "L['meta'].cache")
    return [not g.name.startswith(fixed) for g in guards]


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
        self.compiled = None  # compiled forwards of decode-only steps: (1 row, more rows) (compile_decode)
        self.compiled_rows = 0
        self.compiled_steps = self.eager_fallbacks = 0  # steps run compiled; steps that would have recompiled

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
            self._decode_metadata(meta, torch.tensor([n for _, n in decode_rows], device=dev),
                                  self._tables([s for s, _ in decode_rows]))
        for row, n, seq, start in segments:
            K = self._key_count(start + n)
            # Padded positions repeat the last key, as for decode rows above.
            pos = torch.arange(K, device=dev).clamp(max=start + n - 1)
            key_slots = self._slots(self._tables([seq]), pos)[0]
            q_pos = torch.arange(start, start + n, device=dev)
            key_pos = torch.arange(K, device=dev)
            mask = (key_pos[None] <= q_pos[:, None])[None, None]
            meta.segments.append(Segment(row, row + n, key_slots, mask, q_pos, key_pos))
        inputs = (torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), meta,
                  torch.tensor(wanted, dtype=torch.long, device=dev))
        if self.compiled is not None and not segments and len(decode_rows) <= self.compiled_rows:
            logits = self._run_compiled(inputs)
            if logits is not None:
                return logits, spans
        with self._threads_for(len(tokens)), linear.batch_invariant(self.batch_invariant):
            logits = self.model(*inputs)
        return logits, spans

    def _decode_metadata(self, meta: AttentionMetadata, lengths: torch.Tensor, tables: torch.Tensor) -> None:
        """Fill in which slots decode rows of `lengths` keys (block tables (D, max_blocks)) read."""
        dev, bs = self.device, self.block_size
        S = self._key_count(int(lengths.max()))
        # A shorter row's padded positions repeat its last key: masked out, they still
        # must hold numbers (probability 0 x NaN is NaN), and unwritten slots may not.
        pos = torch.minimum(torch.arange(S, device=dev)[None], lengths[:, None] - 1)
        meta.decode_key_slots = tables.gather(1, pos // bs) * bs + pos % bs
        meta.decode_mask = (torch.arange(S, device=dev)[None] < lengths[:, None])[:, None]
        meta.decode_positions = lengths - 1

    def compile_decode(self, max_rows: int) -> bool:
        """Compile the forward of decode-only steps of at most `max_rows` rows (torch.compile),
        and run it now for each shape it specialises on, so that no request waits for a
        compile. The compiled forward fuses the ~25 small operations of each layer and the key
        gathers into few loops (tests/benchmarks/step_profile.py, default model: 1 row 28.2 ->
        7.4 ms a step, 32 rows 86.7 -> 50.4 ms). Returns False, leaving every step eager, where it
        cannot compile (no C++ compiler, an unsupported device...)."""
        if self.batch_invariant or max_rows < 1:
            return False  # batch invariance is argued for the eager kernels
        start = time.monotonic()
        # Dynamo checks guards before every call; they leave out the model and the cache. Single
        # rows, where a step is shortest, run through a C++ wrapper, which calls the kernels and
        # the 4-bit matmuls with no Python between them and without the GIL (1 row, medians of
        # 3 runs: 8.3 against 9.1 ms a step). It triples that graph's cold compile, so the
        # graphs of several rows, whose steps it would shorten by a few percent, keep Python's.
        one = torch.compile(self.model, dynamic=True,
                            options={"cpp_wrapper": True, "guard_filter_fn": _unchanging_state})
        many = torch.compile(self.model, dynamic=True, options={"guard_filter_fn": _unchanging_state})
        try:
            with torch.inference_mode():
                self._warm(self.model, 1, keys=17)  # eagerly first: lazy state (rotary tables) is built
                # One row is its own graph (torch specialises sizes of 1); the others share one,
                # or two when the 4-bit layers' row limit falls between 2 and max_rows. Key
                # counts differ from every row count, so that no size is tied to another.
                self._warm(one, 1, keys=17)
                for rows, keys in ((2, 19), (max_rows, 23)):
                    if rows <= max_rows:
                        self._warm(many, rows, keys)
        except Exception as e:  # noqa: BLE001: whatever stops the compiler, serving goes on eagerly
            log.warning("decoding without torch.compile: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            return False
        self.compiled, self.compiled_rows = (one, many), max_rows
        log.info("compiled the forward of decode steps of up to %d sequences in %.1f s", max_rows,
                 time.monotonic() - start)
        return True

    def _warm(self, compiled, rows: int, keys: int) -> None:
        """One decode step of `rows` rows with `keys` keys each, through block 0's slots (nothing
        is cached before serving starts, and a sequence writes a slot before reading it)."""
        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.zeros(rows, dtype=torch.long, device=dev), num_decodes=rows,
                                 cache=self.cache)
        tables = torch.zeros(rows, -(-keys // self.block_size), dtype=torch.long, device=dev)
        self._decode_metadata(meta, torch.full((rows,), keys, device=dev), tables)
        tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        with self._threads_for(rows, compiled=True), linear.batch_invariant(False):
            compiled(tokens, meta.decode_positions.clone(), meta, torch.arange(rows, device=dev))

    def _run_compiled(self, inputs) -> torch.Tensor | None:
        """The compiled forward's logits, or None if this step would need a new graph (a shape
        the warm-up did not foresee): then the step runs eagerly, and no request compiles."""
        try:
            # batch_invariant(False) as in the warm-up: the graphs guard on that flag.
            with self._threads_for(inputs[0].shape[0], compiled=True), linear.batch_invariant(False), \
                    torch.compiler.set_stance("fail_on_recompile"):
                logits = self.compiled[inputs[0].shape[0] > 1](*inputs)
        except RuntimeError as e:
            if RECOMPILE not in str(e):
                raise
            self.eager_fallbacks += 1
            log.debug("a decode step ran eagerly: %s", e)
            return None
        self.compiled_steps += 1
        return logits

    @contextmanager
    def _threads_for(self, rows: int, compiled: bool = False):
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
        # Compiled steps run few enough parallel regions to gain from every thread.
        torch.set_num_threads(1 if rows <= self.single_thread_rows and not compiled else self.threads)
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
