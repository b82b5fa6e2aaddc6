"""Tokenize and Detokenize in worker processes.

Their work is per-token Python (token spans, one message per token) that can run for seconds.
On a thread of the server's process it holds the GIL, and the engine thread, which gives the
GIL up around every torch call, then waits up to the interpreter's switch interval (5 ms) to
take it back after each one: measured, a stream beside a 256 x 30,000-character Tokenize with
`return_tokens` waited 6 to 8 s between two tokens, whatever the thread's nice value. A
process has a GIL of its own.

The workers import no torch (this module must not either): they start in about a second and
hold the tokenizer only. They run at a lower CPU priority, so on a busy machine the engine
comes first. A worker that dies fails the calls it had, and the pool starts afresh; a worker
whose server dies exits too."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

from tokenwire.v1 import tokenwire_pb2 as pb

from ..errors import InvalidArgument, ResponseTooLarge, WorkerLost
from ..limits import MAX_SEND_BYTES, Limits
from ..tokenizer import Tokenizer, named_encoding
from ..tokenizer.offsets import token_spans

WORKERS = 2
PARENT_CHECK_SECONDS = 1.0
NICE = 10  # CFS weights: a nice-10 process gets about a tenth of a core the engine wants


class TextWorkers:
    """The pool of worker processes for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer, limits: Limits):
        self.tokenizer, self.limits = tokenizer, limits
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: forking a process that runs threads (gRPC, OpenMP) can copy held locks.
        return ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start, initargs=(self.tokenizer, self.limits, os.getpid()))

    async def call(self, fn, *args):
        """fn(*args) in a worker; a worker that dies meanwhile is WorkerLost."""
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenProcessPool:
            if self._pool is pool:  # the first call to see it starts a new pool
                self._pool = self._new_pool()
                pool.shutdown(wait=False, cancel_futures=True)
            raise WorkerLost("a tokenizer worker process stopped during this call; retry") from None

    def start(self) -> None:
        """Start every worker now (blocking), so that no call waits for one to start."""
        for f in [self._pool.submit(_ready) for _ in range(WORKERS)]:
            f.result()

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (to watch or test them)."""
        return list(self._pool._processes or ())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- In the worker processes ----

_tokenizer: Tokenizer | None = None
_limits = Limits()


def _start(tokenizer: Tokenizer, limits: Limits, server: int) -> None:
    global _tokenizer, _limits
    _tokenizer, _limits = tokenizer, limits
    try:
        os.nice(NICE)
    except (AttributeError, OSError):  # not here, or not allowed: normal priority
        pass
    # The server's pid, not os.getppid() here: a server killed while this worker was still
    # starting has already left it with another parent.
    threading.Thread(target=_exit_with_parent, args=(server,), name="tokenwire-orphan-watch",
                     daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A server killed outright (SIGKILL, the OOM killer) cannot shut its pool down, and a
    worker waiting for work never notices (it holds its queue's pipe open itself): without
    this it would live on, orphaned, holding its memory."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


def _ready() -> bool:
    return _tokenizer is not None


def tokenize(request: pb.TokenizeRequest) -> tuple[bytes, int]:
    """The TokenizeResponse, serialized, and how many tokens the texts had."""
    tok, limits = _tokenizer, _limits
    limits.check_batch(len(request.texts), "texts")
    encoding = named_encoding(request.encoding) if request.encoding else None
    keep = request.truncate_input_tokens if request.HasField("truncate_input_tokens") else None
    if keep is not None and keep < 1:
        raise InvalidArgument("truncate_input_tokens", "must be >= 1")
    encoded = []
    for i, text in enumerate(request.texts):
        if len(text) > limits.max_input_chars:
            raise InvalidArgument(f"texts[{i}]", f"more than {limits.max_input_chars} characters")
        if encoding is not None:  # counting for another model: no special tokens added
            prefix, token_bytes = [], encoding.decode_single_token_bytes
            ids = (encoding.encode(text, allowed_special="all") if request.allow_special
                   else encoding.encode_ordinary(text))
            spans = partial(_spans_by_bytes, token_bytes)
        else:
            prefix, token_bytes, spans = tok.prefix_ids(request.add_special_tokens), tok.token_bytes, tok.spans
            ids = tok.encode(text, add_special_tokens=False, allow_special=request.allow_special)
        encoded.append((prefix, ids, token_bytes, spans, text))
    # Encoding is fast; token spans are not: refuse a response that cannot be sent before
    # building it (each kept id takes at least 1 byte, each span at least 9).
    kept = sum(min(len(p) + len(ids), keep or len(p) + len(ids)) for p, ids, *_ in encoded)
    at_least = kept * (10 if request.return_tokens else 1)
    if at_least > MAX_SEND_BYTES:
        raise ResponseTooLarge(f"the response would take over {at_least >> 20} MiB, more than the "
                               f"{MAX_SEND_BYTES >> 20} MiB a response may; send fewer texts per call"
                               + (" or leave return_tokens off" if request.return_tokens else ""))
    # Serialized result by result: the pieces concatenate into the whole response.
    pieces, tokens, size = [], 0, 0
    for prefix, ids, token_bytes, spans, text in encoded:
        result = tokenize_result(prefix, ids, token_bytes, spans, text, keep, request.return_tokens)
        tokens += result.original_token_count
        pieces.append(pb.TokenizeResponse(results=[result]).SerializeToString())
        size += len(pieces[-1])
        if size > MAX_SEND_BYTES:
            raise ResponseTooLarge(f"the response would take over {MAX_SEND_BYTES >> 20} MiB, more than a "
                                   "response may; send fewer texts per call")
    return b"".join(pieces), tokens


def _spans_by_bytes(token_bytes, text: str, ids: list[int]):
    """Spans of a byte-level encoding's tokens, whose bytes concatenate to text."""
    return token_spans([token_bytes(t) for t in ids], text)


def tokenize_result(prefix: list[int], ids: list[int], token_bytes, spans, text: str, keep: int | None,
                    return_tokens: bool) -> pb.TokenizeResult:
    """prefix: added special tokens (empty spans); ids: the text's own tokens; spans(text, ids):
    where each came from in text (the tokenizer's, which knows its normalizer and prefix space)."""
    all_ids = prefix + ids
    first = 0 if keep is None else max(0, len(all_ids) - keep)
    result = pb.TokenizeResult(ids=all_ids[first:], token_count=len(all_ids) - first,
                               original_token_count=len(all_ids))
    if return_tokens:
        tokens = [pb.TokenSpan(text=token_bytes(t).decode("utf-8", "replace")) for t in prefix]
        tokens += [pb.TokenSpan(text=token_bytes(t).decode("utf-8", "replace"), byte_start=bs, byte_end=be,
                                char_start=cs, char_end=ce)
                   for t, (bs, be, cs, ce) in zip(ids, spans(text, ids))]
        result.tokens.extend(tokens[first:])
    return result


def detokenize(request: pb.DetokenizeRequest) -> tuple[bytes, int]:
    """The DetokenizeResponse, serialized, and how many ids it had."""
    tok = _tokenizer
    for i, t in enumerate(request.ids):
        if not tok.is_valid_id(t):
            raise InvalidArgument(f"ids[{i}]", f"token id {t} is not in the vocabulary")
    ids = [t for t in request.ids if not (request.skip_special_tokens and t in tok.special_ids)]
    return pb.DetokenizeResponse(text=tok.decode(ids)).SerializeToString(), len(request.ids)
