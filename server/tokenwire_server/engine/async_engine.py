"""AsyncEngine: the engine behind an asyncio server. The model computes on a dedicated
thread (torch releases the GIL), so the event loop stays free for streams and health.

The engine thread loops: take new requests, drop cancelled ones, run one step for every
running sequence, hand each request its events. New requests join the running batch at
the next step; finished or cancelled ones leave at once."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..errors import DeadlineExceeded, EngineUnavailable, QueueFull
from ..limits import Limits
from .llm_engine import LLMEngine
from .outputs import FinishReason, ScoreOutput, StreamEvent
from .sampling_params import SamplingParams
from .sequence import Sequence
from .text_stream import TextStream

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters the server's own tests and operators read (metrics come from these)."""

    waiting: int = 0
    running: int = 0
    finished: Counter = field(default_factory=Counter)  # FinishReason -> count
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    scored_items: int = 0
    preemptions: int = 0
    steps: int = 0


@dataclass(eq=False)
class _Request:
    loop: asyncio.AbstractEventLoop
    seqs: list[Sequence]
    deadline: float | None = None  # monotonic
    streams: list[TextStream] | None = None  # per generated sequence
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening
            self.cancelled.set()

    def expired(self) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)


class AsyncEngine:
    """`metrics`, when given, is told from the engine thread of what happens: `on_add(seq)`,
    `on_step(batch_size, kv_usage, waiting, running, preempted)`, `on_token(seq, now)` and
    `on_finish(seq)` (tokenwire_server.metrics.Metrics)."""

    def __init__(self, engine: LLMEngine, limits: Limits = Limits(), metrics=None):
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self.stats = EngineStats(preemptions=engine.num_preemptions)
        self._inbox: queue.Queue[_Request | None] = queue.Queue()
        self._requests: dict[Sequence, _Request] = {}
        self._thread = threading.Thread(target=self._loop, name="tokenwire-engine", daemon=True)
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped = True
        self._inbox.put(None)
        self._thread.join(timeout)

    async def generate(self, seqs: list[Sequence], deadline: float | None = None) -> AsyncIterator[tuple[int, StreamEvent]]:
        """Stream (index, event) for n sequences of one request (n samples share the prompt).
        Leaving the loop early (the client cancelled, its deadline passed) stops the work at
        the next step and frees its memory."""
        streams = [TextStream(self.engine.tokenizer, s.params.stop_sequences, s.params.include_stop_sequence)
                   for s in seqs]
        request = self._submit(_Request(asyncio.get_running_loop(), seqs, deadline, streams))
        try:
            finished = 0
            while finished < len(seqs):
                item = await request.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                finished += item[1].finish_reason is not None
        finally:
            request.cancelled.set()

    async def score(self, items: list[tuple[list[int], int, str]], ranks: bool = False, top_n: int = 0,
                    deadline: float | None = None) -> list[ScoreOutput]:
        """Score (token_ids, start, field) items, batched with everything else; results in order."""
        params = SamplingParams(ranks=ranks, top_n=top_n)
        seqs = [Sequence(ids, params, score_from=start) for ids, start, _ in items]
        request = self._submit(_Request(asyncio.get_running_loop(), seqs, deadline))
        try:
            for _ in seqs:
                item = await request.events.get()
                if isinstance(item, BaseException):
                    raise item
        finally:
            request.cancelled.set()
        return [ScoreOutput(s.prompt_logprobs, s.all_greedy) for s in seqs]

    def _submit(self, request: _Request) -> _Request:
        if self._stopped:
            raise EngineUnavailable("the engine is shutting down")
        waiting = len(self.engine.scheduler.waiting) + self._inbox.qsize()
        if waiting >= self.engine.engine_config.max_queued:
            raise QueueFull(f"the server is overloaded ({waiting} requests waiting); retry later")
        self._inbox.put(request)
        return request

    # ---- the engine thread ----

    def _loop(self) -> None:
        while True:
            self._update_stats()
            if not self._take_new(block=not self.engine.has_work()):
                return
            self._drop_expired()
            if not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a fault fails the requests in hand, never the engine
                log.exception("engine step failed")
                for request in set(self._requests.values()):
                    self._fail(request, e)
                continue
            for seq, event in events:
                request = self._requests.get(seq)
                if request is not None:
                    self._deliver(request, seq, event)

    def _take_new(self, block: bool) -> bool:
        """Move submitted requests into the engine; False when shutting down."""
        while True:
            try:
                request = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if request is None:
                return False
            try:
                for seq in request.seqs:
                    self.engine.add(seq, self.limits)
                    self._requests[seq] = request
                    self.stats.prompt_tokens += len(seq.prompt_ids)
                    if self.metrics is not None:
                        self.metrics.on_add(seq)
            except Exception as e:
                if not getattr(e, "expected", False):
                    log.exception("request failed when added")
                self._fail(request, e)

    def _drop_expired(self) -> None:
        timeout = self.engine.engine_config.queue_timeout
        for seq in self.engine.scheduler.expired():
            request = self._requests.get(seq)
            if request is not None:
                self._fail(request, QueueFull(f"the request waited {timeout:g}s for the engine; the server "
                                              "is overloaded, retry later"))
        for request in {r for r in self._requests.values() if r.expired()}:
            if not request.cancelled.is_set():
                request.emit(DeadlineExceeded("the deadline passed"))
            for seq in request.seqs:
                if seq in self._requests:
                    self.engine.finish(seq, FinishReason.CANCELLED)
                    self._retire(seq)

    def _deliver(self, request: _Request, seq: Sequence, event) -> None:
        if event is None:  # a score sequence completed
            self.stats.scored_items += 1
            self._retire(seq)
            request.emit(seq)
            return
        index = request.seqs.index(seq)
        stream = request.streams[index]
        self.stats.generated_tokens += 1
        if self.metrics is not None:
            self.metrics.on_token(seq, time.monotonic())
        text, stop = stream.push(event.token_id)
        reason = FinishReason.STOP_SEQUENCE if stop else event.finish_reason
        limit = seq.params.time_limit
        if reason is None and limit is not None and time.monotonic() - seq.started >= limit:
            reason = FinishReason.TIME_LIMIT
        if reason is not None and stop is None:
            rest, stop = stream.flush()
            text += rest
            reason = FinishReason.STOP_SEQUENCE if stop else reason
        if reason is not None:
            seq.finish_reason, seq.stop_sequence = reason, stop or ""
            self.engine.finish(seq, reason)
            self._retire(seq)
        request.emit((index, StreamEvent(event.token, text, reason, stop or "")))

    def _retire(self, seq: Sequence) -> None:
        self._requests.pop(seq, None)
        if seq.finish_reason is not None:
            self.stats.finished[seq.finish_reason] += 1
        self.stats.cached_tokens += seq.cached_tokens
        if self.metrics is not None:
            self.metrics.on_finish(seq)

    def _fail(self, request: _Request, error: Exception) -> None:
        for seq in request.seqs:
            self.engine.finish(seq)
            self._requests.pop(seq, None)
        request.emit(error)

    def _update_stats(self) -> None:
        s = self.engine.scheduler
        preempted = self.engine.num_preemptions - self.stats.preemptions
        self.stats.waiting = len(s.waiting)
        self.stats.running = len(s.running)
        self.stats.steps = self.engine.num_steps
        self.stats.preemptions = self.engine.num_preemptions
        if self.metrics is not None:
            batch = self.engine.last_batch_size if s.has_work() else 0
            self.metrics.on_step(batch, self.engine.blocks.usage, len(s.waiting), len(s.running), preempted)
