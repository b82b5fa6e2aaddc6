"""TokenwireServicer: each RPC converts, calls the engine, converts back. Nothing else."""

from __future__ import annotations

import time
from contextlib import aclosing

import grpc
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

from ..engine.async_engine import AsyncEngine
from ..errors import EngineUnavailable
from ..limits import Limits
from . import calls, convert, offload, text_workers
from .calls import note
from .errors import rpc_errors
from .text_workers import TextWorkers

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
        self.text_workers: TextWorkers | None = None  # Tokenize and Detokenize run there

    def attach(self, engine: AsyncEngine) -> None:
        """Serve this engine; blocks while the text workers start (before readiness: no call
        waits for a process to start, and their start-up does not slow the engine's streams)."""
        self.text_workers = TextWorkers(engine.engine.tokenizer, self.limits)
        self.text_workers.start()
        self._engine = engine

    def close(self) -> None:
        if self.text_workers is not None:
            self.text_workers.close()

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
        response, tokens = await self.ready_text_workers().call(text_workers.tokenize, request)
        note(prompt_tokens=tokens, prompt=list(request.texts) if self.log_prompts else None)
        return response

    @rpc_errors
    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> bytes:
        response, ids = await self.ready_text_workers().call(text_workers.detokenize, request)
        note(prompt_tokens=ids)
        return response

    def ready_text_workers(self) -> TextWorkers:
        _ = self.engine  # raises at once while loading or draining
        return self.text_workers

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
        cfg, runner, lim, clim = llm.config, llm.runner, self.limits, llm.constraints.limits
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
                                   max_input_chars=lim.max_input_chars, max_samples=lim.max_samples,
                                   max_constraint_chars=clim.max_chars, max_choices=clim.max_choices,
                                   constraint_compile_seconds=clim.compile_seconds),
            batch_invariant=llm.engine_config.batch_invariant)
