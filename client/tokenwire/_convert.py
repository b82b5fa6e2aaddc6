"""Keyword arguments to request messages, and response messages to plain results."""

from __future__ import annotations

import json

from .types import (Delta, Final, Generation, InputInfo, ModelInfo, Scored, ServerLimits, TokenInfo,
                    Tokenized, TokenSpan, TopToken, Usage)
from .v1 import tokenwire_pb2 as pb

FINISH_REASONS = {v.number: v.name.removeprefix("FINISH_REASON_").lower()
                  for v in pb.DESCRIPTOR.enum_types_by_name["FinishReason"].values}


def generate_request(prompt: str | None = None, *, token_ids: list[int] | None = None,
                     messages: list[dict] | None = None, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                     seed: int | None = None, repetition_penalty: float | None = None,
                     presence_penalty: float | None = None, frequency_penalty: float | None = None,
                     logit_bias: dict[int, float] | None = None, min_new_tokens: int = 0,
                     max_new_tokens: int | None = None,
                     stop: list[str] | None = None, stop_token_ids: list[int] | None = None,
                     include_stop_sequence: bool = False, time_limit: float | None = None,
                     ignore_eos: bool = False, logprobs: bool = False, ranks: bool = False, top_n: int = 0,
                     prompt_tokens: bool = False, truncate_input_tokens: int | None = None,
                     n: int = 1, json_schema: dict | str | None = None, json_object: bool = False,
                     regex: str | None = None, choice: list[str] | None = None,
                     grammar: str | None = None) -> pb.GenerateRequest:
    given = [x is not None for x in (prompt, token_ids, messages)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, token_ids or messages")
    kinds = {"json_schema": json_schema, "json_object": json_object or None, "regex": regex, "choice": choice,
             "grammar": grammar}
    kinds = {k: v for k, v in kinds.items() if v is not None}
    if len(kinds) > 1:
        raise ValueError(f"give at most one constraint, got {', '.join(kinds)}")
    req = pb.GenerateRequest(
        sampling=pb.SamplingParameters(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                                       repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                       frequency_penalty=frequency_penalty, logit_bias=logit_bias or {}),
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                     stop_sequences=stop or [],
                                     stop_token_ids=stop_token_ids or [],
                                     include_stop_sequence=include_stop_sequence,
                                     time_limit_seconds=time_limit, ignore_eos=ignore_eos),
        response=pb.ResponseOptions(logprobs=logprobs, ranks=ranks, top_n=top_n, prompt_tokens=prompt_tokens),
        truncate_input_tokens=truncate_input_tokens, n=n)
    if prompt is not None:
        req.text = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    for kind, value in kinds.items():
        if kind == "choice":
            req.constraint.choice.choices.extend(value)
        elif kind == "json_schema" and not isinstance(value, str):
            req.constraint.json_schema = json.dumps(value)
        else:
            setattr(req.constraint, kind, value)
    return req


def score_request(items: list, ranks: bool, top_n: int) -> pb.ScoreRequest:
    """items: texts, or (context, continuation) pairs."""
    req = pb.ScoreRequest(ranks=ranks, top_n=top_n)
    for item in items:
        if isinstance(item, str):
            req.items.add(text=item)
        else:
            context, continuation = item
            req.items.add(pair=pb.ContextContinuation(context=context, continuation=continuation))
    return req


def token_info(t: pb.TokenInfo) -> TokenInfo:
    return TokenInfo(t.id, t.text, t.logprob if t.HasField("logprob") else None,
                     t.rank if t.HasField("rank") else None, [TopToken(x.id, x.text, x.logprob) for x in t.top])


def tokenized(r: pb.TokenizeResult) -> Tokenized:
    return Tokenized(list(r.ids), r.token_count, r.original_token_count,
                     [TokenSpan(s.text, s.byte_start, s.byte_end, s.char_start, s.char_end) for s in r.tokens])


def event(msg: pb.GenerateResponse):
    kind = msg.WhichOneof("event")
    if kind == "input":
        i = msg.input
        return InputInfo(i.prompt_token_count, i.seed, i.truncated, [token_info(t) for t in i.prompt_tokens])
    if kind == "delta":
        return Delta(msg.delta.text, [token_info(t) for t in msg.delta.tokens], msg.delta.index)
    f, u = msg.final, msg.final.usage
    return Final(FINISH_REASONS[f.finish_reason], f.stop_sequence,
                 Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.queue_seconds,
                       u.first_token_seconds, u.total_seconds), f.index)


class Collector:
    """Folds a stream's events into one Generation per sample (index)."""

    def __init__(self):
        self.input: InputInfo | None = None
        self.finals: dict[int, Final] = {}
        self.text: dict[int, list[str]] = {}
        self.tokens: dict[int, list[TokenInfo]] = {}

    def add(self, item) -> None:
        if isinstance(item, InputInfo):
            self.input = item
        elif isinstance(item, Delta):
            self.text.setdefault(item.index, []).append(item.text)
            self.tokens.setdefault(item.index, []).extend(item.tokens)
        else:
            self.finals[item.index] = item

    def result(self, index: int = 0) -> Generation:
        i, f = self.input, self.finals[index]
        return Generation("".join(self.text.get(index, [])), self.tokens.get(index, []), f.finish_reason,
                          f.stop_sequence, f.usage, i.seed, i.prompt_token_count, i.truncated, i.prompt_tokens)

    def results(self) -> list[Generation]:
        return [self.result(index) for index in sorted(self.finals)]


def scored(r: pb.ScoreResult) -> Scored:
    return Scored([token_info(t) for t in r.tokens], r.logprob_sum, r.token_count, r.perplexity, r.is_greedy)


def model_info(r: pb.ModelInfoResponse) -> ModelInfo:
    lim = r.limits
    return ModelInfo(r.name, r.architecture, r.parameter_count, r.context_length, r.vocab_size,
                     list(r.end_token_ids), r.has_chat_template, r.dtype, r.device,
                     ServerLimits(lim.max_new_tokens, lim.default_max_new_tokens, lim.max_stop_sequences,
                                  lim.max_stop_sequence_chars, lim.max_top_n, lim.max_batch_items,
                                  lim.max_input_chars, lim.max_samples, lim.max_stop_token_ids,
                                  lim.max_constraint_chars, lim.max_choices, lim.constraint_compile_seconds),
                     r.batch_invariant)
