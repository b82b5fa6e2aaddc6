"""TokenwireServicer: each RPC converts, calls the engine, converts back. Nothing else."""

from __future__ import annotations

import time
from contextlib import aclosing

import grpc
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

from ..engine.async_engine import AsyncEngine
from ..errors import EngineUnavailable, InvalidArgument, ResponseTooLarge
from ..limits import MAX_SEND_BYTES, Limits
from ..tokenizer import named_encoding
from . import calls, convert, offload
from .calls import note
from .errors import rpc_errors

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tokenwire"].full_name


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _serialized(response_type, result) -> bytes:
    """A response holding just `result` in its `results`, serialized; such pieces concatenate
    into the whole response. Big responses are serialized piece by piece, off the event loop
    (api/handlers.py sends bytes as they are): one SerializeToString of tens of MB holds the GIL,
    and so stalls every thread (the loop, the engine), for most of a second."""
    return response_type(results=[result]).SerializeToString()


class TokenwireServicer(pb_grpc.TokenwireServicer):
    def __init__(self, limits: Limits = Limits(), metrics=None, log_prompts: bool = False):
        self.limits = limits
        self.metrics = metrics  # tokenwire_server.metrics.Metrics: RPCs counted by status (api/calls.py)
        self.log_prompts = log_prompts  # request log lines carry the prompt text
        self._engine: AsyncEngine | None = None  # attached once the model has loaded
        self.draining = False  # shutting down: new calls are turned away

    def attach(self, engine: AsyncEngine | None) -> None:
        self._engine = engine

    @property
    def engine(self) -> AsyncEngine:
        if self.draining:
            raise EngineUnavailable("the server is shutting down; retry on another replica")
        if self._engine is None:
            raise EngineUnavailable("the model is not loaded yet")
        if not self._engine.alive:
            raise EngineUnavailable("the engine has stopped; retry on another replica")
        return self._engine

    @rpc_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> bytes:
        tok = self.engine.engine.tokenizer  # here, so a loading or draining server answers at once
        return await offload.run(self._tokenize, request, tok)

    def _tokenize(self, request: pb.TokenizeRequest, tok) -> bytes:
        """The TokenizeResponse, serialized (see _serialized)."""
        convert.check_batch(len(request.texts), "texts", self.limits)
        encoding = named_encoding(request.encoding) if request.encoding else None
        keep = request.truncate_input_tokens if request.HasField("truncate_input_tokens") else None
        if keep is not None and keep < 1:
            raise InvalidArgument("truncate_input_tokens", "must be >= 1")
        encoded = []
        for i, text in enumerate(request.texts):
            if len(text) > self.limits.max_input_chars:
                raise InvalidArgument(f"texts[{i}]", f"more than {self.limits.max_input_chars} characters")
            if encoding is not None:  # counting for another model: no special tokens added
                prefix, token_bytes = [], encoding.decode_single_token_bytes
                ids = (encoding.encode(text, allowed_special="all") if request.allow_special
                       else encoding.encode_ordinary(text))
            else:
                prefix, token_bytes = tok.prefix_ids(request.add_special_tokens), tok.token_bytes
                ids = tok.encode(text, add_special_tokens=False, allow_special=request.allow_special)
            encoded.append((prefix, ids, token_bytes, text))
        # Encoding is fast; token spans are not: refuse a response that cannot be sent before
        # building it (each kept id takes at least 1 byte, each span at least 9).
        kept = sum(min(len(p) + len(ids), keep or len(p) + len(ids)) for p, ids, _, _ in encoded)
        at_least = kept * (10 if request.return_tokens else 1)
        if at_least > MAX_SEND_BYTES:
            raise ResponseTooLarge(f"the response would take over {at_least >> 20} MiB, more than the "
                                   f"{MAX_SEND_BYTES >> 20} MiB a response may; send fewer texts per call"
                                   + (" or leave return_tokens off" if request.return_tokens else ""))
        results, tokens, size = [], 0, 0
        for prefix, ids, token_bytes, text in encoded:
            result = convert.tokenize_result(prefix, ids, token_bytes, text, keep, request.return_tokens)
            tokens += result.original_token_count
            results.append(_serialized(pb.TokenizeResponse, result))
            size += len(results[-1])
            if size > MAX_SEND_BYTES:
                raise ResponseTooLarge(f"the response would take over {MAX_SEND_BYTES >> 20} MiB, more than a "
                                       "response may; send fewer texts per call")
        note(prompt_tokens=tokens, prompt=list(request.texts) if self.log_prompts else None)
        return b"".join(results)

    @rpc_errors
    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        tok = self.engine.engine.tokenizer
        return await offload.run(self._detokenize, request, tok)

    @staticmethod
    def _detokenize(request: pb.DetokenizeRequest, tok) -> pb.DetokenizeResponse:
        note(prompt_tokens=len(request.ids))
        for i, t in enumerate(request.ids):
            if not tok.is_valid_id(t):
                raise InvalidArgument(f"ids[{i}]", f"token id {t} is not in the vocabulary")
        ids = [t for t in request.ids if not (request.skip_special_tokens and t in tok.special_ids)]
        return pb.DetokenizeResponse(text=tok.decode(ids))

    @rpc_errors
    async def Generate(self, request: pb.GenerateRequest, context):
        engine = self.engine
        tok = engine.engine.tokenizer
        req, truncated = await offload.prepare(convert.generate_request, request, engine.engine, self.limits,
                                               deadline=_deadline(context))
        generation = calls.GenerationLog(prompt_tokens=len(req.prompt_ids))
        note(generation=generation,
             prompt=await offload.run(tok.decode, list(req.prompt_ids)) if self.log_prompts else None)
        first = True
        async with aclosing(engine.generate(req)) as outputs:
            async for out in outputs:
                if first:  # after prefill: prompt logprobs, when asked, exist now
                    yield convert.input_info(req, out, truncated, tok)
                    first = False
                generation.add(out)
                yield convert.delta(out, req.params, tok)
                if out.finished:
                    yield convert.final(out)

    @rpc_errors
    async def Score(self, request: pb.ScoreRequest, context) -> bytes:
        engine = self.engine
        items = await offload.run(self._score_items, request, engine.engine)
        outputs = await engine.score(convert.score_request(items, request, _deadline(context)))
        return await offload.run(self._score_response, outputs, engine.engine.tokenizer, request.ranks)

    def _score_items(self, request: pb.ScoreRequest, llm) -> list[tuple[list[int], int, str]]:
        items = convert.score_items(request, llm, self.limits)
        note(prompt_tokens=sum(len(ids) for ids, _, _ in items),
             prompt=[llm.tokenizer.decode(ids) for ids, _, _ in items] if self.log_prompts else None)
        return items

    @staticmethod
    def _score_response(outputs, tok, ranks: bool) -> bytes:
        return b"".join(_serialized(pb.ScoreResponse, convert.score_result(o, tok, ranks)) for o in outputs)

    @rpc_errors
    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        llm = self.engine.engine
        cfg, runner, lim = llm.config, llm.runner, self.limits
        return pb.ModelInfoResponse(
            name=llm.name, architecture=cfg.architecture, parameter_count=runner.n_params,
            context_length=llm.context_len, vocab_size=cfg.vocab_size, end_token_ids=list(llm.tokenizer.eos_ids),
            has_chat_template=llm.tokenizer.chat_template is not None,
            dtype=str(runner.dtype).removeprefix("torch."), device=str(runner.device),
            limits=pb.ServerLimits(max_new_tokens=lim.max_new_tokens,
                                   default_max_new_tokens=lim.default_max_new_tokens,
                                   max_stop_sequences=lim.max_stop_sequences,
                                   max_stop_sequence_chars=lim.max_stop_sequence_chars,
                                   max_stop_token_ids=lim.max_stop_token_ids,
                                   max_top_n=lim.max_top_n, max_batch_items=lim.max_batch_items,
                                   max_input_chars=lim.max_input_chars, max_samples=lim.max_samples))
