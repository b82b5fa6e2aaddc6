"""Scheduler: iteration-level (continuous) batching, in plain Python (no torch).

Each step it picks which sequences run and how many tokens of each to compute: running
sequences first (one token each when decoding, the next chunk when a long prompt is still
being prefilled), then waiting ones while the step's token budget and the cache allow.
When the cache runs out, the most recently started sequence is preempted: its blocks are
freed and it waits to be recomputed (its generated tokens are kept)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import QueueFull
from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, from seq.num_computed

    @property
    def completes(self) -> bool:
        """After this step every token of the sequence is computed: its next token can be sampled."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 64, max_batched_tokens: int = 512,
                 max_queued: int = 256, queue_timeout: float | None = None):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queued:
            raise QueueFull(f"the server's queue is full ({self.max_queued} requests waiting); retry later")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished, cancelled or failed) and give its blocks back."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.blocks.free(seq.block_table)

    def expired(self, now: float | None = None) -> list[Sequence]:
        """Waiting sequences past the queue timeout (the caller finishes them)."""
        if self.queue_timeout is None:
            return []
        now = now or time.monotonic()
        return [s for s in self.waiting if s.started is None and now - s.arrival > self.queue_timeout]

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_batched_tokens
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted below, earlier in this loop
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n <= 0:
                continue
            while not self.blocks.allocate(seq.block_table, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                out.scheduled = [s for s in out.scheduled if s.seq is not victim]
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSequence(seq, n))
                budget -= n
        budget = self.max_batched_tokens - out.num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.block_table.blocks:
                if _prefilling(seq.parent):
                    break  # a later sample waits for the first one's prompt, then shares it
                self._match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.allocate(seq.block_table, seq.num_computed + n):
                self.blocks.free(seq.block_table)  # give back prefix blocks; try again next step
                seq.num_computed = seq.cached_tokens = 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.started = seq.started or time.monotonic()
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        return out

    def _match_prefix(self, seq: Sequence) -> None:
        # Cached positions produce no logits, so stop before the first position needing them.
        limit = min(seq.logits_from, seq.num_tokens - 1)
        parent = seq.parent
        if parent is not None and parent.status is Status.RUNNING:  # share the first sample's prompt
            n = min(limit, parent.num_computed, len(parent.prompt_ids)) // self.blocks.block_size
            table = self.blocks.fork(parent.block_table, n)
        else:
            table = self.blocks.match_prefix(seq.tokens, limit)
        seq.block_table = table
        seq.num_computed = len(table.blocks) * self.blocks.block_size
        if not seq.output_ids:  # a first admission, not a recompute after preemption
            seq.cached_tokens = seq.num_computed

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)


def _prefilling(seq: Sequence | None) -> bool:
    """The sequence is queued or still computing its prompt."""
    return seq is not None and seq.status is not Status.FINISHED and seq.num_computed < len(seq.prompt_ids)
