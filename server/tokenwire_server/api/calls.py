"""Per-RPC bookkeeping: the request id, the final status, and the one log line per request.

`rpc_errors` (api/errors.py) opens an `RpcCall` around every RPC and closes it with the
status code; the RPC body adds what it knows (`note(generation=...)`). Closing counts the RPC in
the server's metrics and writes one INFO line on the `tokenwire.requests` logger."""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

import grpc

REQUEST_ID = "x-request-id"
_VALID_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII without spaces: safe in logs and headers

request_log = logging.getLogger("tokenwire.requests")
_current: contextvars.ContextVar[RpcCall | None] = contextvars.ContextVar("tokenwire_rpc_call", default=None)


@dataclass(eq=False)
class RpcCall:
    method: str
    request_id: str
    peer: str
    protocol: str = "grpc"  # or "http" (api/http.py)
    start: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic: the client's deadline, if it set one
    code: str | None = None  # the final gRPC status code name, once known
    prompt_tokens: int | None = None  # input tokens (Tokenize: tokens produced; Detokenize: ids given)
    generation: GenerationLog | None = None  # Generate: filled from the engine's outputs
    prompt: str | list[str] | None = None  # only set when prompts are logged
    ended: bool = False

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID, self.request_id),)

    def fields(self, model: str, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        out = {"request_id": self.request_id, "protocol": self.protocol, "method": self.method, "status": self.code,
               "model": model, "prompt_tokens": self.prompt_tokens}
        if self.generation is not None:
            out.update(self.generation.fields())
        out["total_seconds"] = round(now - self.start, 4)
        out["peer"] = self.peer
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class GenerationLog:
    """What a Generate's log line says, gathered from the outputs the call received."""

    prompt_tokens: int
    generated_tokens: int = 0
    cached_tokens: int = 0
    queue_seconds: float | None = None  # sample 0's
    first_token_seconds: float | None = None  # the earliest sample's
    finish_reasons: list[str] = field(default_factory=list)

    def add(self, out) -> None:
        """out: an engine RequestOutput."""
        self.generated_tokens += 1
        u = out.usage
        if u is None:
            return
        self.finish_reasons.append(out.finish_reason.value)
        self.cached_tokens += u.cached_tokens
        if out.index == 0:
            self.queue_seconds = round(u.queue_seconds, 4)
        if self.first_token_seconds is None or u.first_token_seconds < self.first_token_seconds:
            self.first_token_seconds = round(u.first_token_seconds, 4)

    def fields(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "cached_tokens": self.cached_tokens, "queue_seconds": self.queue_seconds,
                "first_token_seconds": self.first_token_seconds,
                "finish_reason": ",".join(self.finish_reasons) or None}


def _request_id(sent) -> str:
    """The client's request id when it sent a usable one, else a new one."""
    return sent if isinstance(sent, str) and _VALID_ID.fullmatch(sent) else uuid.uuid4().hex


def begin(method: str, context: grpc.aio.ServicerContext) -> RpcCall:
    """Open the call: take the client's request id (or make one) and make it current."""
    sent = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID), None)
    call = RpcCall(method, _request_id(sent), context.peer() or "")
    remaining = context.time_remaining()  # read now: once the call is torn down it means nothing
    if remaining is not None:
        call.deadline = call.start + remaining
    _current.set(call)  # each RPC runs in a task (and so a context) of its own
    context.set_trailing_metadata(call.metadata)  # failures carry it too
    return call


def begin_http(method: str, sent_id: str | None, peer: str) -> RpcCall:
    """Open an HTTP request's call (api/http.py): the same id rule, log line and counters."""
    call = RpcCall(method, _request_id(sent_id), peer, protocol="http")
    _current.set(call)  # each request runs in a task of its own
    return call


def note(**fields) -> None:
    """Add what the RPC body knows (prompt_tokens, seqs, prompt) to the current call."""
    call = _current.get()
    if call is not None:
        for name, value in fields.items():
            setattr(call, name, value)


# gRPC may cancel an expired call a moment before our clock reaches the deadline we computed.
_DEADLINE_SLACK = 0.01


def cancelled_code(call: RpcCall) -> str:
    """The status of an RPC that ended without one of ours: the client went away or its deadline passed."""
    expired = call.deadline is not None and time.monotonic() >= call.deadline - _DEADLINE_SLACK
    return "DEADLINE_EXCEEDED" if expired else "CANCELLED"


def end(call: RpcCall, servicer) -> None:
    """Close the call (once): count it and write its log line."""
    if call.ended:
        return
    call.ended = True
    if call.code is None:
        call.code = cancelled_code(call)
    metrics = getattr(servicer, "metrics", None)
    if metrics is not None:
        metrics.on_rpc(call.method, call.code, call.protocol)
    engine = getattr(servicer, "_engine", None)
    model = engine.engine.name if engine is not None else ""
    request_log.info("%s %s", call.method, call.code, extra={"fields": call.fields(model)})
