"""Per-RPC bookkeeping: the request id, the final status, and the one log line per request.

`rpc_errors` (api/errors.py) opens an `RpcCall` around every RPC and closes it with the
status code; the RPC body adds what it knows (`note(seqs=...)`). Closing counts the RPC in
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
    start: float = field(default_factory=time.monotonic)
    code: str | None = None  # the final gRPC status code name, once known
    prompt_tokens: int | None = None  # input tokens (Tokenize: tokens produced; Detokenize: ids given)
    seqs: list | None = None  # Generate: its sequences, read when the call ends
    prompt: str | list[str] | None = None  # only set when prompts are logged
    ended: bool = False

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID, self.request_id),)

    def fields(self, model: str, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        out = {"request_id": self.request_id, "method": self.method, "status": self.code, "model": model,
               "prompt_tokens": self.prompt_tokens}
        if self.seqs:
            first, seqs = self.seqs[0], self.seqs
            out["prompt_tokens"] = len(first.prompt_ids)  # n samples share one prompt
            out["generated_tokens"] = sum(len(s.output_ids) for s in seqs)
            out["cached_tokens"] = sum(s.cached_tokens for s in seqs)
            if first.started is not None:
                out["queue_seconds"] = round(first.started - first.arrival, 4)
            firsts = [s.first_token for s in seqs if s.first_token is not None]
            if firsts:
                out["first_token_seconds"] = round(min(firsts) - first.arrival, 4)
            reasons = [s.finish_reason.value for s in seqs if s.finish_reason is not None]
            if reasons:
                out["finish_reason"] = ",".join(reasons)
        out["total_seconds"] = round(now - self.start, 4)
        out["peer"] = self.peer
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return {k: v for k, v in out.items() if v is not None}


def begin(method: str, context: grpc.aio.ServicerContext) -> RpcCall:
    """Open the call: take the client's request id (or make one) and make it current."""
    sent = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID), None)
    request_id = sent if isinstance(sent, str) and _VALID_ID.fullmatch(sent) else uuid.uuid4().hex
    call = RpcCall(method, request_id, context.peer() or "")
    _current.set(call)  # each RPC runs in a task (and so a context) of its own
    context.set_trailing_metadata(call.metadata)  # failures carry it too
    return call


def note(**fields) -> None:
    """Add what the RPC body knows (prompt_tokens, seqs, prompt) to the current call."""
    call = _current.get()
    if call is not None:
        for name, value in fields.items():
            setattr(call, name, value)


def cancelled_code(context: grpc.aio.ServicerContext) -> str:
    """The status of an RPC that ended without one of ours: the client went away or its deadline passed."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def end(call: RpcCall, servicer, context: grpc.aio.ServicerContext) -> None:
    """Close the call (once): count it and write its log line."""
    if call.ended:
        return
    call.ended = True
    if call.code is None:
        call.code = cancelled_code(context)
    metrics = getattr(servicer, "metrics", None)
    if metrics is not None:
        metrics.on_rpc(call.method, call.code)
    engine = getattr(servicer, "_engine", None)
    model = engine.engine.name if engine is not None else ""
    request_log.info("%s %s", call.method, call.code, extra={"fields": call.fields(model)})
