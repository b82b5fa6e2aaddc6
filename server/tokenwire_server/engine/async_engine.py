"""AsyncEngine: the engine behind an asyncio server. The model computes on a dedicated
thread (torch releases the GIL), so the event loop stays free for streams and health."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..errors import DeadlineExceeded, EngineUnavailable
from .llm_engine import LLMEngine
from .outputs import FinishReason, ScoreOutput, StreamEvent
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
    scored_items: int = 0


@dataclass
class _Work:
    loop: asyncio.AbstractEventLoop
    seq: Sequence | None = None  # a generation
    score_items: list | None = None  # or a batch of (token_ids, start, field) to score
    ranks: bool = False
    top_n: int = 0
    deadline: float | None = None  # monotonic; the caller stops waiting after it
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
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.stats = EngineStats()
        self._queue: queue.Queue[_Work | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="tokenwire-engine", daemon=True)
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Finish the work in hand, then stop the engine thread."""
        self._stopped = True
        self._queue.put(None)
        self._thread.join(timeout)

    async def generate(self, seq: Sequence, deadline: float | None = None) -> AsyncIterator[StreamEvent]:
        """Stream the events of one generation. Leaving the loop early (the client cancelled,
        its deadline passed) stops the work at the next step and frees its memory."""
        work = self._submit(_Work(asyncio.get_running_loop(), seq=seq, deadline=deadline))
        try:
            while True:
                event = await work.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            work.cancelled.set()

    async def score(self, items: list[tuple[list[int], int, str]], ranks: bool = False, top_n: int = 0,
                    deadline: float | None = None) -> list[ScoreOutput]:
        """Score (token_ids, start, field) items; results in order."""
        work = self._submit(_Work(asyncio.get_running_loop(), score_items=items, ranks=ranks, top_n=top_n,
                                  deadline=deadline))
        try:
            result = await work.events.get()
        finally:
            work.cancelled.set()
        if isinstance(result, BaseException):
            raise result
        return result

    def _submit(self, work: _Work) -> _Work:
        if self._stopped:
            raise EngineUnavailable("the engine is shutting down")
        self.stats.waiting += 1
        self._queue.put(work)
        return work

    # ---- the engine thread ----

    def _loop(self) -> None:
        while (work := self._queue.get()) is not None:
            self.stats.waiting -= 1
            if work.expired():  # cancelled or out of time while waiting: no work done
                if work.seq is not None:
                    self.stats.finished[FinishReason.CANCELLED] += 1
                work.emit(DeadlineExceeded("the deadline passed while the request waited"))
                continue
            self.stats.running += 1
            try:
                if work.seq is not None:
                    self._generate(work)
                else:
                    self._score(work)
            except Exception as e:  # one bad request never takes the engine down
                if not getattr(e, "expected", False):
                    log.exception("request failed in the engine")
                work.emit(e)
            finally:
                self.stats.running -= 1

    def _generate(self, work: _Work) -> None:
        seq, params = work.seq, work.seq.params
        stream = TextStream(self.engine.tokenizer, params.stop_sequences, params.include_stop_sequence)
        steps = self.engine.run(seq)
        try:
            for step in steps:
                self.stats.generated_tokens += 1
                if work.expired():
                    seq.finish_reason = FinishReason.CANCELLED
                    break
                text, stop = stream.push(step.token_id)
                reason = FinishReason.STOP_SEQUENCE if stop else step.finish_reason
                if reason is None and params.time_limit is not None \
                        and time.monotonic() - seq.started >= params.time_limit:
                    reason = FinishReason.TIME_LIMIT
                if reason is not None and stop is None:
                    rest, stop = stream.flush()
                    text += rest
                    reason = FinishReason.STOP_SEQUENCE if stop else reason
                if reason is not None:
                    seq.finish_reason, seq.stop_sequence = reason, stop or ""
                work.emit(StreamEvent(step.token, text, reason, stop or ""))
                if reason is not None:
                    break
        finally:
            steps.close()  # frees the sequence's KV cache at once
            seq.finished = time.monotonic()
            if seq.finish_reason is not None:
                self.stats.finished[seq.finish_reason] += 1

    def _score(self, work: _Work) -> None:
        results = []
        for token_ids, start, field_name in work.score_items:
            if work.expired():
                work.emit(DeadlineExceeded("the deadline passed while scoring"))
                return
            results.append(self.engine.score(token_ids, start, work.ranks, work.top_n, field_name))
            self.stats.scored_items += 1
        work.emit(results)
