"""AsyncEngine: the engine behind an asyncio server. The model computes on a dedicated
thread (torch releases the GIL), so the event loop stays free for streams and health.

The engine thread loops: take new requests, drop cancelled and expired ones, step, route
each output to its request's queue. Only that thread touches the LLMEngine. If the thread
dies anyway, every pending call fails at once with UNAVAILABLE, later calls fail fast, and
`on_death` tells the server (which reports NOT_SERVING)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..errors import DeadlineExceeded, EngineUnavailable, QueueFull
from .llm_engine import LLMEngine
from .outputs import EngineRequest, RequestFailed, RequestOutput, ScoreOutput, ScoreRequest

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    """One request in flight: the engine thread puts outputs, the event loop takes them."""

    loop: asyncio.AbstractEventLoop
    request: EngineRequest | ScoreRequest
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the caller went away
    ended: bool = False  # engine thread only: an error was sent, or the caller went away
    remaining: int = 0  # engine thread only: samples or items still to finish

    def __post_init__(self):
        r = self.request
        self.remaining = len(r.items) if isinstance(r, ScoreRequest) else r.n

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening
            self.cancelled.set()

    def fail(self, error: Exception) -> None:
        if not self.ended:
            self.ended = True
            self.emit(error)

    def expired(self, now: float) -> bool:
        return self.request.deadline is not None and now > self.request.deadline


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_death: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.on_death = on_death  # called on the engine thread if it dies
        self._inbox: queue.Queue[_Call | None] = queue.Queue()
        self._calls: dict[str, _Call] = {}  # engine thread only
        self._waiting = 0  # the engine's queue length, as of its last iteration
        self._lock = threading.Lock()  # submitting vs dying or stopping
        self._closed: EngineUnavailable | None = None  # why calls are turned away
        self._thread = threading.Thread(target=self._run, name="tokenwire-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._closed is None

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; whatever is still pending fails with UNAVAILABLE."""
        with self._lock:
            if self._closed is None:
                self._closed = EngineUnavailable("the engine is shutting down")
            self._inbox.put(None)
        self._thread.join(timeout)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of a generation's samples, interleaved. Leaving the loop early
        (the client cancelled, its deadline passed) stops the work at the next step."""
        call = self._submit(request)
        try:
            finished = 0
            while finished < request.n:
                out = await call.outputs.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                finished += out.finished
        finally:
            call.cancelled.set()

    async def score(self, request: ScoreRequest) -> list[ScoreOutput]:
        """Score items, batched with everything else; results in order."""
        call = self._submit(request)
        results: list[ScoreOutput | None] = [None] * len(request.items)
        try:
            for _ in request.items:
                out = await call.outputs.get()
                if isinstance(out, BaseException):
                    raise out
                results[out.index] = out
        finally:
            call.cancelled.set()
        return results

    def _submit(self, request) -> _Call:
        call = _Call(asyncio.get_running_loop(), request)
        with self._lock:
            if self._closed is not None:
                raise self._closed
            waiting = self._waiting + self._inbox.qsize()
            if waiting >= self.engine.engine_config.max_queued:
                raise QueueFull(f"the server is overloaded ({waiting} requests waiting); retry later")
            self._inbox.put(call)
        return call

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            while self._take_new(block=not self.engine.has_work()):
                self._drop_ended()
                if self.engine.has_work():
                    for out in self.engine.step():
                        try:
                            self._route(out)
                        except Exception as e:  # fails only the request it touches
                            log.exception("delivering to request %s failed", out.request_id)
                            self._end(out.request_id, e)
                else:  # idle now (the last requests were dropped): the load gauges say so
                    self.engine.report_load()
                self._waiting = self.engine.num_waiting
        except BaseException as e:  # a fault the per-request handling did not contain
            log.critical("the engine thread failed; failing every request and reporting NOT_SERVING",
                         exc_info=True)
            self._close(EngineUnavailable(f"the engine failed ({type(e).__name__}); retry on another replica"))
            if self.on_death is not None:
                self.on_death(e)
            return
        self._close(EngineUnavailable("the engine is shutting down"))

    def _close(self, error: EngineUnavailable) -> None:
        """Turn new calls away, then fail everything pending: in the engine and in the inbox."""
        with self._lock:
            self._closed = self._closed or error
            pending = list(self._calls.values())
            while True:
                try:
                    call = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if call is not None:
                    pending.append(call)
        for call in pending:
            call.fail(self._closed)
        self._calls.clear()

    def _take_new(self, block: bool) -> bool:
        """Move submitted requests into the engine; False when shutting down."""
        while True:
            try:
                call = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if call is None:
                return False
            if call.cancelled.is_set():
                continue
            try:
                if isinstance(call.request, ScoreRequest):
                    self.engine.add_score(call.request)
                else:
                    self.engine.add_request(call.request)
            except Exception as e:
                if not getattr(e, "expected", False):
                    log.exception("request %s failed when added", call.request_id)
                call.fail(e)
                continue
            self._calls[call.request_id] = call

    def _drop_ended(self) -> None:
        """Abort requests whose caller went away or whose deadline or queue time passed."""
        timeout = self.engine.engine_config.queue_timeout
        for request_id in self.engine.expired():
            self._end(request_id, QueueFull(f"the request waited {timeout:g}s for the engine; the server is "
                                            "overloaded, retry later"))
        now = time.monotonic()
        for call in list(self._calls.values()):
            if call.cancelled.is_set():
                self._end(call.request_id, None)
            elif call.expired(now):
                self._end(call.request_id, DeadlineExceeded("the deadline passed"))

    def _end(self, request_id: str, error: Exception | None) -> None:
        self.engine.abort_request(request_id)
        call = self._calls.pop(request_id, None)
        if call is not None and error is not None:
            call.fail(error)

    def _route(self, out) -> None:
        call = self._calls.get(out.request_id)
        if call is None:
            return
        if isinstance(out, RequestFailed):
            self._end(out.request_id, out.error)
            return
        call.emit(out)
        if isinstance(out, ScoreOutput) or out.finished:
            call.remaining -= 1
            if call.remaining == 0:
                del self._calls[out.request_id]
