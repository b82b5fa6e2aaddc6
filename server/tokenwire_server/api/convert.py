"""Proto messages to domain objects and back. Every field is checked here, before any work,
and errors name fields by their path in the request."""

from __future__ import annotations

import math
import uuid

from tokenwire.v1 import tokenwire_pb2 as pb

from ..engine import (EngineRequest, FinishReason, LLMEngine, RequestOutput, SamplingParams, ScoreOutput,
                      ScoreRequest, TokenLogprob)
from ..engine.sampling_params import SEEDS
from ..errors import InvalidArgument
from ..limits import Limits
from ..tokenizer import Tokenizer

# SamplingParams field -> where it lives in a GenerateRequest.
_PARAM_PATHS = {
    "temperature": "sampling.temperature", "top_k": "sampling.top_k", "top_p": "sampling.top_p",
    "min_p": "sampling.min_p", "seed": "sampling.seed", "max_new_tokens": "stopping.max_new_tokens",
    "stop_sequences": "stopping.stop_sequences", "stop_token_ids": "stopping.stop_token_ids",
    "time_limit": "stopping.time_limit_seconds", "top_n": "response.top_n",
    "repetition_penalty": "sampling.repetition_penalty", "presence_penalty": "sampling.presence_penalty",
    "frequency_penalty": "sampling.frequency_penalty", "logit_bias": "sampling.logit_bias",
    "min_new_tokens": "stopping.min_new_tokens",
}

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FinishReason.CONTEXT_LIMIT: pb.FINISH_REASON_CONTEXT_LIMIT,
    FinishReason.TIME_LIMIT: pb.FINISH_REASON_TIME_LIMIT, FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def _renamed(e: InvalidArgument, paths: dict[str, str] | None = None, prefix: str = "") -> InvalidArgument:
    base, bracket, rest = e.field.partition("[")
    base = (paths or {}).get(base, prefix + base)
    return InvalidArgument(base + bracket + rest, e.description)


def check_text(text: str, field: str, limits: Limits) -> None:
    if not text:
        raise InvalidArgument(field, "is empty")
    if len(text) > limits.max_input_chars:
        raise InvalidArgument(field, f"{len(text)} characters, at most {limits.max_input_chars} allowed")


# ---- Generate ----

def sampling_params(req: pb.GenerateRequest, limits: Limits, vocab_size: int) -> SamplingParams:
    s, st, r = req.sampling, req.stopping, req.response
    params = SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_k=s.top_k,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        min_p=s.min_p,
        seed=s.seed if s.HasField("seed") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logit_bias=dict(s.logit_bias),
        min_new_tokens=st.min_new_tokens,
        max_new_tokens=st.max_new_tokens if st.HasField("max_new_tokens") else limits.default_max_new_tokens,
        stop_sequences=list(st.stop_sequences),
        include_stop_sequence=st.include_stop_sequence,
        stop_token_ids=list(st.stop_token_ids),
        ignore_eos=st.ignore_eos,
        time_limit=st.time_limit_seconds if st.HasField("time_limit_seconds") else None,
        logprobs=r.logprobs, ranks=r.ranks, top_n=r.top_n, prompt_logprobs=r.prompt_tokens,
    )
    try:
        params.validate(limits, vocab_size)
    except InvalidArgument as e:
        raise _renamed(e, _PARAM_PATHS) from None
    return params


def prompt(req: pb.GenerateRequest, engine: LLMEngine, limits: Limits) -> tuple[list[int], bool, str]:
    """The prompt's token ids, whether they were truncated, and the field they came from."""
    tok = engine.tokenizer
    kind = req.WhichOneof("input")
    if kind == "text":
        check_text(req.text, "text", limits)
        ids, field = tok.encode(req.text), "text"
    elif kind == "token_ids":
        ids, field = list(req.token_ids.ids), "token_ids.ids"
    elif kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        for i, m in enumerate(messages):
            if len(m["content"]) > limits.max_input_chars:
                raise InvalidArgument(f"chat.messages[{i}].content", f"more than {limits.max_input_chars} characters")
        try:
            ids, field = tok.encode_chat(messages), "chat"  # content never becomes control tokens
        except InvalidArgument as e:
            raise _renamed(e, prefix="chat.") from None
    else:
        raise InvalidArgument("input", "one of text, token_ids or chat is required")
    truncated = False
    if req.HasField("truncate_input_tokens"):
        keep = req.truncate_input_tokens
        if keep < 1:
            raise InvalidArgument("truncate_input_tokens", "must be >= 1")
        truncated = len(ids) > keep
        ids = ids[-keep:]
    engine.check_prompt(ids, field)
    return ids, truncated, field


def constraint(req: pb.GenerateRequest, engine: LLMEngine):
    """The request's compiled constraint, or None (compiling can take a while: never on the loop)."""
    if not req.HasField("constraint"):
        return None
    kind = req.constraint.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("constraint", "set one of json_schema, json_object, regex, choice or grammar")
    value = getattr(req.constraint, kind)
    return engine.constraints.compile(kind, list(value.choices) if kind == "choice" else value)


def generate_request(req: pb.GenerateRequest, engine: LLMEngine, limits: Limits, request_id: str = "",
                     deadline: float | None = None) -> tuple[EngineRequest, bool]:
    """The engine's request (n samples, one unless it asks for more), and whether the prompt
    was truncated. Every field is validated here, once."""
    if req.n > limits.max_samples:
        raise InvalidArgument("n", f"must be in [1, {limits.max_samples}] (0 means 1), got {req.n}")
    params = sampling_params(req, limits, engine.config.vocab_size)
    ids, truncated, _ = prompt(req, engine, limits)
    params.constraint = constraint(req, engine)
    return EngineRequest(request_id or uuid.uuid4().hex, tuple(ids), params, max(req.n, 1), deadline), truncated


def token_info(t: TokenLogprob, tok: Tokenizer, logprob: bool = True, rank: bool = False) -> pb.TokenInfo:
    info = pb.TokenInfo(id=t.token_id, text=token_text(tok, t.token_id),
                        top=[pb.TopToken(id=i, text=token_text(tok, i), logprob=lp) for i, lp in t.top])
    if logprob:
        info.logprob = t.logprob
    if rank and t.rank is not None:
        info.rank = t.rank
    return info


def token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.token_bytes(token_id).decode("utf-8", errors="replace")


def input_info(request: EngineRequest, first: RequestOutput, truncated: bool, tok: Tokenizer) -> pb.GenerateResponse:
    """Sent before the first delta: by then the prompt is computed (and its logprobs, when asked)."""
    seed = (first.seed - first.index) % SEEDS  # sample i uses seed + i
    info = pb.InputInfo(prompt_token_count=len(request.prompt_ids), seed=seed, truncated=truncated)
    if first.prompt_logprobs is not None:
        ids = request.prompt_ids
        info.prompt_tokens.append(pb.TokenInfo(id=ids[0], text=token_text(tok, ids[0])))
        info.prompt_tokens.extend(token_info(t, tok, True, request.params.ranks) for t in first.prompt_logprobs)
    return pb.GenerateResponse(input=info)


def delta(out: RequestOutput, params: SamplingParams, tok: Tokenizer) -> pb.GenerateResponse:
    return pb.GenerateResponse(delta=pb.Delta(text=out.text, tokens=[token_info(out.token, tok, params.logprobs,
                                                                                params.ranks)], index=out.index))


def final(out: RequestOutput) -> pb.GenerateResponse:
    u = out.usage
    usage = pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                     cached_tokens=u.cached_tokens, queue_seconds=u.queue_seconds,
                     first_token_seconds=u.first_token_seconds, total_seconds=u.total_seconds)
    return pb.GenerateResponse(final=pb.Final(finish_reason=FINISH_REASONS[out.finish_reason],
                                              stop_sequence=out.stop_sequence, usage=usage, index=out.index))


# ---- Score ----

def score_items(req: pb.ScoreRequest, engine: LLMEngine, limits: Limits) -> list[tuple[list[int], int, str]]:
    """Each item as (token ids, index of the first scored token, field)."""
    limits.check_batch(len(req.items), "items")
    if req.top_n > limits.max_top_n:
        raise InvalidArgument("top_n", f"must be in [0, {limits.max_top_n}], got {req.top_n}")
    tok, items = engine.tokenizer, []
    for i, item in enumerate(req.items):
        kind = item.WhichOneof("input")
        if kind == "text":
            field = f"items[{i}].text"
            check_text(item.text, field, limits)
            ids, start = tok.encode(item.text), 1
            if len(ids) < 2:
                raise InvalidArgument(field, "needs at least two tokens (the first is not scored)")
        elif kind == "pair":
            field = f"items[{i}].pair"
            check_text(item.pair.context, field + ".context", limits)
            check_text(item.pair.continuation, field + ".continuation", limits)
            context = tok.encode(item.pair.context)
            ids, start = context + tok.encode(item.pair.continuation, add_special_tokens=False), len(context)
        else:
            raise InvalidArgument(f"items[{i}]", "one of text or pair is required")
        engine.check_prompt(ids, field, generating=False)
        items.append((ids, start, field))
    return items


def score_request(items: list[tuple[list[int], int, str]], req: pb.ScoreRequest,
                  deadline: float | None = None) -> ScoreRequest:
    return ScoreRequest(uuid.uuid4().hex, tuple((tuple(ids), start) for ids, start, _ in items), req.ranks,
                        req.top_n, deadline)


def score_result(out: ScoreOutput, tok: Tokenizer, ranks: bool) -> pb.ScoreResult:
    total = sum(t.logprob for t in out.tokens)
    return pb.ScoreResult(tokens=[token_info(t, tok, True, ranks) for t in out.tokens], logprob_sum=total,
                          token_count=len(out.tokens), perplexity=math.exp(-total / len(out.tokens)),
                          is_greedy=out.is_greedy)
