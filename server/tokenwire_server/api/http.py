"""The OpenAI-compatible HTTP API (Starlette, served by uvicorn on the gRPC server's event loop),
beside gRPC on the same engine.

It shares with gRPC everything but the wire: the servicer's engine, limits and drain state,
api/convert.py's validation (bodies become GenerateRequest messages: api/openai.py), the
Tokenize/Detokenize worker processes, the prompt and bulk lanes, API keys, TLS files, the
request id and log line (api/calls.py) and the metrics (protocol="http")."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tokenwire.v1 import tokenwire_pb2 as pb

from ..engine import ScoreRequest
from ..errors import (ConfigError, DeadlineExceeded, EngineUnavailable, InvalidArgument, QueueFull,
                      ResponseTooLarge)
from ..limits import MAX_RECEIVE_BYTES
from . import calls, convert, offload, openai, text_workers
from .errors import MAX_DESCRIPTION_BYTES, MAX_FIELD_BYTES, clip

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-request-timeout"  # seconds: the request's deadline, as a gRPC client's timeout


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, kind: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.kind, self.param = status, code, kind, param


def _error(exc: Exception) -> HttpError:
    """Every exception to its HTTP status and OpenAI error shape, in one place (the gRPC
    status names are kept as our `code`, for the metrics and the log line)."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, InvalidArgument):
        field = clip(exc.field, MAX_FIELD_BYTES)
        return HttpError(400, "INVALID_ARGUMENT", f"{field}: {clip(exc.description, MAX_DESCRIPTION_BYTES)}",
                         "invalid_request_error", field)
    if isinstance(exc, (QueueFull, ResponseTooLarge)):
        return HttpError(429, "RESOURCE_EXHAUSTED", str(exc), "rate_limit_error")
    if isinstance(exc, EngineUnavailable):
        return HttpError(503, "UNAVAILABLE", str(exc), "service_unavailable")
    if isinstance(exc, DeadlineExceeded):
        return HttpError(504, "DEADLINE_EXCEEDED", str(exc), "timeout")
    log.error("internal error", exc_info=exc)
    return HttpError(500, "INTERNAL", f"internal error: {type(exc).__name__}", "internal_error")


def _body(e: HttpError) -> dict:
    return {"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code.lower()}}


class HttpApi:
    def __init__(self, servicer, api_keys: frozenset[str] = frozenset(), tls: tuple | None = None):
        """servicer: the gRPC TokenwireServicer whose engine, limits and state this API shares.
        tls: (cert, key, client_ca or None) file paths, as --tls-cert/--tls-key/--tls-client-ca."""
        self.servicer = servicer
        self.api_keys = api_keys
        self.tls = tls
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
        ])
        self._server: uvicorn.Server | None = None

    # ---- lifecycle ----

    async def start(self, host: str, port: int) -> int:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:  # (a port another process listens on fails at listen, not at bind)
            sock.bind((host, port))
            sock.listen(2048)
        except OSError as e:
            sock.close()
            raise ConfigError(f"--http-port {port}: cannot listen on {host}:{port} ({e.strerror})") from None
        options = {}
        if self.tls is not None:
            cert, key, client_ca = self.tls
            options = dict(ssl_certfile=cert, ssl_keyfile=key)
            if client_ca:
                options.update(ssl_ca_certs=client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=None, **options)
        config.load()
        self._server = uvicorn.Server(config)  # started by hand: serve() would take over SIGTERM
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[sock])
        return sock.getsockname()[1]

    async def stop(self, grace: float | None) -> None:
        """Let requests in flight finish for up to `grace` seconds while new ones get 503 (the
        servicer is draining), then stop listening and close."""
        if self._server is None:
            return
        end = None if grace is None else time.monotonic() + grace
        while self._server.server_state.tasks and (end is None or time.monotonic() < end):
            await asyncio.sleep(0.05)
        # (uvicorn reports a zero wait as a timeout even with nothing in flight)
        self._server.config.timeout_graceful_shutdown = None if end is None else max(end - time.monotonic(), 0.05)
        await self._server.shutdown()
        self._server = None

    # ---- plumbing ----

    def _call(self, request: Request, method: str) -> calls.RpcCall:
        client = request.client
        return calls.begin_http(method, request.headers.get(calls.REQUEST_ID),
                                f"{client.host}:{client.port}" if client else "")

    def _admit(self, request: Request, call: calls.RpcCall) -> None:
        """The API key (but for probes) and the deadline header."""
        timeout = request.headers.get(TIMEOUT_HEADER)
        if timeout is not None:
            try:
                call.deadline = call.start + float(timeout)
            except ValueError:
                raise InvalidArgument(TIMEOUT_HEADER, "must be a number of seconds") from None
        if self.api_keys:  # (/health, for probes, never comes here)
            sent = request.headers.get("authorization", "")
            key = sent[len("Bearer "):] if sent.startswith("Bearer ") else ""
            if not any(hmac.compare_digest(key, k) for k in self.api_keys):
                raise HttpError(401, "UNAUTHENTICATED",
                                "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                                "authentication_error")

    def _fail(self, call: calls.RpcCall, exc: Exception) -> JSONResponse:
        e = _error(exc)
        call.code = e.code
        calls.end(call, self.servicer)
        return JSONResponse(_body(e), status_code=e.status, headers={calls.REQUEST_ID: call.request_id})

    def _done(self, call: calls.RpcCall, response: Response) -> Response:
        call.code = "OK"
        calls.end(call, self.servicer)
        response.headers[calls.REQUEST_ID] = call.request_id
        return response

    async def _unary(self, request: Request, method: str, work) -> Response:
        call = self._call(request, method)
        try:
            self._admit(request, call)
            return self._done(call, await work(request, call))
        except Exception as e:
            return self._fail(call, e)

    async def _json(self, request: Request):
        """The body, bounded as a gRPC message is, and parsed off the event loop."""
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_RECEIVE_BYTES:
                raise InvalidArgument("body", f"more than {MAX_RECEIVE_BYTES} bytes")
        return await offload.prepare(_parse, bytes(data))

    async def _object_for_model(self, request: Request) -> dict:
        """A body that must be a JSON object naming this server's model, or none."""
        body = await self._json(request)
        if not isinstance(body, dict):
            raise InvalidArgument("body", "must be a JSON object")
        self._model(body.get("model"))
        return body

    def _model(self, name: str | None) -> None:
        served = self.servicer.engine.engine.name
        if name is not None and name != served:
            raise HttpError(404, "NOT_FOUND", f"model {name!r} is not served here (this server serves {served!r})",
                            "invalid_request_error", "model")

    # ---- endpoints ----

    async def health(self, request: Request) -> Response:
        try:
            engine = self.servicer.engine
            return JSONResponse({"status": "ok", "model": engine.engine.name})
        except EngineUnavailable as e:
            return JSONResponse({"status": "unavailable", "message": str(e)}, status_code=503)

    async def models(self, request: Request) -> Response:
        async def work(request, call):
            llm = self.servicer.engine.engine
            return JSONResponse({"object": "list", "data": [
                {"id": llm.name, "object": "model", "created": 0, "owned_by": "tokenwire",
                 "max_model_len": llm.context_len}]})
        return await self._unary(request, "models", work)

    async def tokenize(self, request: Request) -> Response:
        async def work(request, call):
            body = await self._object_for_model(request)
            llm = self.servicer.engine.engine
            if "messages" in body:  # a chat, rendered with the model's template
                parsed = openai.chat({"messages": body["messages"]})
                ids, _, _ = await offload.prepare(convert.prompt, parsed.requests[0], llm, self.servicer.limits)
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise InvalidArgument("prompt", "must be a string")
                req = pb.TokenizeRequest(texts=[prompt], add_special_tokens=openai.boolean(
                    {"add_special_tokens": body.get("add_special_tokens", True)}, "add_special_tokens"))
                try:
                    data, _ = await self.servicer.ready_text_workers().call(text_workers.tokenize, req)
                except InvalidArgument as e:
                    raise InvalidArgument("prompt", e.description) from None
                ids = list(pb.TokenizeResponse.FromString(data).results[0].ids)
            calls.note(prompt_tokens=len(ids))
            return JSONResponse({"count": len(ids), "max_model_len": llm.context_len, "tokens": ids})
        return await self._unary(request, "tokenize", work)

    async def detokenize(self, request: Request) -> Response:
        async def work(request, call):
            body = await self._object_for_model(request)
            ids = openai.token_ids(body.get("tokens"), "tokens")
            data, _ = await self.servicer.ready_text_workers().call(text_workers.detokenize,
                                                                    pb.DetokenizeRequest(ids=ids))
            calls.note(prompt_tokens=len(ids))
            return JSONResponse({"prompt": pb.DetokenizeResponse.FromString(data).text})
        return await self._unary(request, "detokenize", work)

    async def tokenizer_info(self, request: Request) -> Response:
        async def work(request, call):
            llm = self.servicer.engine.engine
            tok = llm.tokenizer
            eos = tok.token_bytes(tok.eos_ids[0]).decode("utf-8", "replace") if tok.eos_ids else None
            bos = tok.token_bytes(tok.bos_id).decode("utf-8", "replace") if tok.bos_id is not None else None
            return JSONResponse({"tokenizer_class": type(tok.backend).__name__, "eos_token": eos, "bos_token": bos, "pad_token": None,
                                 "eos_token_ids": list(tok.eos_ids), "add_bos_token": tok.add_bos,
                                 "model_max_length": llm.context_len,
                                 "chat_template": tok.chat_template.source if tok.chat_template else None})
        return await self._unary(request, "tokenizer_info", work)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions", openai.completion, "logprobs")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat.completions", openai.chat, "top_logprobs")

    # ---- generation ----

    async def _generate(self, request: Request, method: str, parse, top_n_param: str) -> Response:
        call = self._call(request, method)
        try:
            self._admit(request, call)
            parsed = parse(await self._json(request))
            self._model(parsed.model)
            engine = self.servicer.engine
            llm, limits = engine.engine, self.servicer.limits
            limits.check_batch(len(parsed.requests), "prompt")  # prompts in one request: as Score's items
            try:
                prepared = [await offload.prepare(_prepare, r, llm, limits, call.deadline) for r in parsed.requests]
            except InvalidArgument as e:
                raise openai.renamed(e, top_n_param) from None
            run = _Run(engine, prepared, parsed, method == "chat.completions")
            calls.note(generation=run.log)
            if parsed.options.stream:
                stream = run.sse(call, self.servicer)
                first = await anext(stream)  # errors before the first output are a plain error response
                return StreamingResponse(_chain(first, stream), media_type="text/event-stream",
                                         headers={calls.REQUEST_ID: call.request_id, "cache-control": "no-cache"})
            body = await offload.run(_dumps, await run.whole())  # (echoed logprobs can be big)
            return self._done(call, Response(body, media_type="application/json"))
        except Exception as e:
            return self._fail(call, e)


def _parse(data: bytes):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument("body", f"is not JSON: {e}") from None


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async with aclosing(rest):
        yield first
        async for item in rest:
            yield item


class _Prepared:
    def __init__(self, request, score: bool):
        self.request = request  # an EngineRequest, or a ScoreRequest for an echo without new tokens
        self.score = score


def _prepare(req: pb.GenerateRequest, llm, limits, deadline: float | None) -> _Prepared:
    """Validated by api/convert.py, as a gRPC request is. An echo of the prompt alone (max_tokens
    0) is scored instead of generated."""
    if req.stopping.HasField("max_new_tokens") and req.stopping.max_new_tokens == 0:
        ids, _, field = convert.prompt(req, llm, limits)
        if len(ids) < 2:
            raise InvalidArgument(field, "needs at least two tokens to echo with logprobs and no new tokens")
        llm.check_prompt(ids, field, generating=False)
        if req.response.top_n > limits.max_top_n:
            raise InvalidArgument("response.top_n", f"must be in [0, {limits.max_top_n}], got {req.response.top_n}")
        return _Prepared(ScoreRequest(openai.new_id("score"), ((tuple(ids), 1),), False, req.response.top_n,
                                      deadline), True)
    engine_request, _ = convert.generate_request(req, llm, limits, deadline=deadline)
    return _Prepared(engine_request, False)


class _Choice:
    """One choice (one sample of one prompt) as it builds up."""

    def __init__(self, index: int, tok, prompt_ids: tuple[int, ...]):
        self.index = index
        self.tokens = []
        self.finish = None
        self.legacy = openai.LegacyLogprobs(tok)
        self.prompt_ids = prompt_ids
        self.started = False


class _Run:
    """The engine work of one HTTP generation (every prompt, every sample), turned into one
    response or an SSE stream."""

    def __init__(self, engine, prepared: list[_Prepared], parsed: openai.Parsed, chat: bool):
        self.engine, self.prepared, self.options, self.chat = engine, prepared, parsed.options, chat
        self.model = engine.engine.name
        self.tok = engine.engine.tokenizer
        self.prompt_logprobs: dict[int, tuple] = {}  # prompt index -> its logprobs (echo), from any sample
        self.id = openai.new_id("chatcmpl" if chat else "cmpl")
        self.kind = "chat.completion" if chat else "text_completion"
        self.prompt_tokens = sum(len(p.request.prompt_ids if not p.score else p.request.items[0][0]) for p in prepared)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.log = calls.GenerationLog(prompt_tokens=self.prompt_tokens)  # the request log line's

    def _n(self, p: _Prepared) -> int:
        return 1 if p.score else p.request.n

    async def _events(self) -> AsyncIterator[tuple[int, _Prepared, object]]:
        """(prompt index, prepared, output) from every prompt's work, as they come."""
        if len(self.prepared) == 1:
            async with aclosing(self._one(0, self.prepared[0])) as outputs:
                async for item in outputs:
                    yield item
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i, p):
            try:
                async with aclosing(self._one(i, p)) as outputs:
                    async for item in outputs:
                        await queue.put(item)
            except Exception as e:
                await queue.put(e)
            finally:
                await queue.put(done)
        tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(self.prepared)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def _one(self, i: int, p: _Prepared):
        if p.score:
            for out in await self.engine.score(p.request):
                yield i, p, out
            return
        async with aclosing(self.engine.generate(p.request)) as outputs:
            async for out in outputs:
                yield i, p, out

    def _choices(self) -> dict[tuple[int, int], _Choice]:
        choices, index = {}, 0
        for i, p in enumerate(self.prepared):
            ids = p.request.items[0][0] if p.score else p.request.prompt_ids
            for j in range(self._n(p)):
                choices[i, j] = _Choice(index, self.tok, ids)
                index += 1
        return choices

    def _prompt_part(self, choice: _Choice, prompt_logprobs) -> tuple[str, dict | None]:
        """The echoed prompt: its text and, when asked, its logprobs (the first token has none)."""
        text = self.tok.decode(list(choice.prompt_ids))
        if not self.options.logprobs:
            return text, None
        tokens = [choice.prompt_ids[0]] + list(prompt_logprobs or ())
        return text, choice.legacy.shape(tokens)

    def _update(self, choices, i: int, p: _Prepared, out) -> tuple[_Choice, str, dict | None, object]:
        """Fold one output into its choice: (choice, new text, new logprobs, new chat tokens)."""
        if p.score:  # the prompt alone, scored: the whole choice at once
            choice = choices[i, 0]
            text, logprobs = self._prompt_part(choice, out.tokens)
            choice.finish = "length"
            return choice, text, logprobs, []
        choice = choices[i, out.index]
        text, logprobs = out.text, None
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[i] = out.prompt_logprobs
        if self.options.echo and not choice.started:
            text, logprobs = self._prompt_part(choice, self.prompt_logprobs.get(i))
            text += out.text
        choice.started = True
        self.completion_tokens += 1
        self.log.add(out)
        if self.options.logprobs and not self.chat:
            logprobs = openai.merge_legacy(logprobs if self.options.echo and logprobs else None,
                                           choice.legacy.shape([out.token]))
        if out.finished:
            choice.finish = openai.finish_reason(out)
            if out.index == 0 and out.usage is not None:
                self.cached_tokens += out.usage.cached_tokens
        return choice, text, logprobs, [out.token]

    async def whole(self) -> dict:
        choices = self._choices()
        texts = {c.index: [] for c in choices.values()}
        legacy = {c.index: None for c in choices.values()}
        async with aclosing(self._events()) as events:
            async for i, p, out in events:
                choice, text, logprobs, tokens = self._update(choices, i, p, out)
                texts[choice.index].append(text)
                if logprobs is not None:
                    legacy[choice.index] = openai.merge_legacy(legacy[choice.index], logprobs)
                choice.tokens += tokens
        body = []
        for c in sorted(choices.values(), key=lambda c: c.index):
            text = "".join(texts[c.index])
            if self.chat:
                body.append({"index": c.index, "message": {"role": "assistant", "content": text},
                             "logprobs": openai.chat_logprobs(c.tokens, self.tok) if self.options.logprobs else None,
                             "finish_reason": c.finish})
            else:
                body.append({"index": c.index, "text": text, "logprobs": legacy[c.index], "finish_reason": c.finish})
        return openai.envelope(self.kind, self.id, self.model, body,
                               usage=openai.usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens))

    async def sse(self, call: calls.RpcCall, servicer) -> AsyncIterator[bytes]:
        """The stream's events. Nothing is yielded before the first output, so that errors until
        then (overload, a bad prompt) are a plain error response; after it, the stream ends the
        call (counted, logged) however it ends, also when the client goes away."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        choices = self._choices()
        async with aclosing(self._events()) as events:
            first = await anext(events)
            try:
                if self.chat:  # the role first, for every choice
                    for c in choices.values():
                        yield _sse(openai.envelope(kind, self.id, self.model, [
                            {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]))
                try:
                    yield self._chunk(kind, *self._update(choices, *first))
                    async for item in events:
                        yield self._chunk(kind, *self._update(choices, *item))
                except Exception as e:  # after the headers: the error is an event of the stream
                    err = _error(e)
                    call.code = err.code
                    yield _sse(_body(err))
                    yield b"data: [DONE]\n\n"
                    return
                if self.options.include_usage:
                    yield _sse(openai.envelope(kind, self.id, self.model, [], usage=openai.usage(
                        self.prompt_tokens, self.completion_tokens, self.cached_tokens)))
                yield b"data: [DONE]\n\n"
                call.code = "OK"
            finally:  # (the client went away: code still None, so CANCELLED or DEADLINE_EXCEEDED)
                calls.end(call, servicer)

    def _chunk(self, kind: str, choice: _Choice, text: str, logprobs: dict | None, tokens: list) -> bytes:
        if self.chat:
            piece = {"index": choice.index, "delta": {"content": text} if text else {},
                     "logprobs": openai.chat_logprobs(tokens, self.tok) if self.options.logprobs else None,
                     "finish_reason": choice.finish}
        else:
            piece = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish}
        return _sse(openai.envelope(kind, self.id, self.model, [piece]))


def _dumps(data: dict) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _sse(data: dict) -> bytes:
    return b"data: " + _dumps(data) + b"\n\n"

