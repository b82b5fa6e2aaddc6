"""TokenwireServicer: each RPC converts, calls the engine, converts back. Nothing else."""

from __future__ import annotations

import time
from contextlib import aclosing

import grpc
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

from ..engine.async_engine import AsyncEngine
from ..errors import EngineUnavailable, InvalidArgument
from ..limits import Limits
from ..tokenizer import named_encoding
from . import convert
from .calls import note
from .errors import rpc_errors

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tokenwire"].full_name


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


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
        return self._engine

    @rpc_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        convert.check_batch(len(request.texts), "texts", self.limits)
        tok = self.engine.engine.tokenizer
        encoding = named_encoding(request.encoding) if request.encoding else None
        keep = request.truncate_input_tokens if request.HasField("truncate_input_tokens") else None
        if keep is not None and keep < 1:
            raise InvalidArgument("truncate_input_tokens", "must be >= 1")
        results = []
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
            results.append(convert.tokenize_result(prefix, ids, token_bytes, text, keep, request.return_tokens))
        note(prompt_tokens=sum(r.original_token_count for r in results),
             prompt=list(request.texts) if self.log_prompts else None)
        return pb.TokenizeResponse(results=results)

    @rpc_errors
    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        tok = self.engine.engine.tokenizer
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
        seqs = convert.sequences(request, engine.engine, self.limits)
        note(seqs=seqs, prompt=tok.decode(seqs[0].prompt_ids) if self.log_prompts else None)
        first = True
        async with aclosing(engine.generate(seqs, _deadline(context))) as events:
            async for i, event in events:
                if first:  # after prefill: prompt logprobs, when asked, exist now
                    yield convert.input_info(seqs[0], tok)
                    first = False
                yield convert.delta(event, seqs[i], tok, i)
                if event.finish_reason is not None:
                    yield convert.final(seqs[i], i)

    @rpc_errors
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        engine = self.engine
        tok = engine.engine.tokenizer
        items = convert.score_items(request, engine.engine, self.limits)
        note(prompt_tokens=sum(len(ids) for ids, _, _ in items),
             prompt=[tok.decode(ids) for ids, _, _ in items] if self.log_prompts else None)
        outputs = await engine.score(items, request.ranks, request.top_n, _deadline(context))
        return pb.ScoreResponse(results=[convert.score_result(o, tok, request.ranks) for o in outputs])

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
                                   max_top_n=lim.max_top_n, max_batch_items=lim.max_batch_items,
                                   max_input_chars=lim.max_input_chars, max_samples=lim.max_samples))
