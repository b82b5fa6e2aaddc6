"""OpenAI-compatible bodies in, OpenAI's response shapes out.

A request body becomes the same GenerateRequest message a gRPC client sends, so that
api/convert.py validates every field, once, for both protocols; errors name the OpenAI
parameter instead of our path. Only the parsing of JSON types lives here."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from tokenwire.v1 import tokenwire_pb2 as pb

from ..engine import FinishReason, RequestOutput, TokenLogprob
from ..errors import InvalidArgument
from ..tokenizer import Tokenizer
from .convert import token_text

# Our field paths (api/convert.py) -> the OpenAI parameter an error names. Longest prefix wins.
_PARAMS = {
    "sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
    "sampling.min_p": "min_p", "sampling.seed": "seed", "sampling.repetition_penalty": "repetition_penalty",
    "sampling.presence_penalty": "presence_penalty", "sampling.frequency_penalty": "frequency_penalty",
    "sampling.logit_bias": "logit_bias", "stopping.max_new_tokens": "max_tokens", "stopping.stop_sequences": "stop",
    "stopping.stop_token_ids": "stop_token_ids", "stopping.min_new_tokens": "min_tokens",
    "text": "prompt", "token_ids.ids": "prompt", "token_ids": "prompt", "chat.messages": "messages", "chat": "messages",
    "n": "n", "truncate_input_tokens": "truncate_prompt_tokens", "input": "prompt",
    "constraint.json_schema": "response_format", "constraint.json_object": "response_format",
    "constraint.regex": "guided_regex", "constraint.choice": "guided_choice", "constraint.grammar": "guided_grammar",
}
FINISH = {FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop", FinishReason.STOP_TOKEN: "stop",
          FinishReason.LENGTH: "length", FinishReason.CONTEXT_LIMIT: "length", FinishReason.TIME_LIMIT: "length",
          FinishReason.CANCELLED: "abort"}


def renamed(e: InvalidArgument, top_n_param: str) -> InvalidArgument:
    """The error with the OpenAI parameter's name (`response.top_n` is `logprobs` for
    completions, `top_logprobs` for chat)."""
    paths = {**_PARAMS, "response.top_n": top_n_param}
    for path in sorted(paths, key=len, reverse=True):
        if e.field == path or e.field.startswith(path + "[") or e.field.startswith(path + "."):
            return InvalidArgument(paths[path] + e.field[len(path):], e.description)
    return e


# ---- JSON types ----

def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidArgument(name, f"must be a number, got {json.dumps(v)[:40]}")
    return float(v)


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidArgument(name, f"must be an integer, got {json.dumps(v)[:40]}")
    return v


def boolean(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise InvalidArgument(name, f"must be true or false, got {json.dumps(v)[:40]}")
    return v


def _unsigned(body: dict, name: str, proto_max: int = 2**32 - 1) -> int | None:
    v = _int(body, name)
    if v is not None and not 0 <= v <= proto_max:
        raise InvalidArgument(name, f"must be in [0, {proto_max}], got {v}")
    return v


def _strings(body: dict, name: str) -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise InvalidArgument(name, "must be a string or a list of strings")
    return v


def token_ids(v, name: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise InvalidArgument(name, "must be a list of token ids")
    if any(not 0 <= i < 2**32 for i in v):
        raise InvalidArgument(name, "token ids must be in [0, 2^32)")
    return v


# ---- requests ----

@dataclass
class Options:
    """What shapes the response, beside the engine request."""

    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Parsed:
    requests: list[pb.GenerateRequest]  # one per prompt (completions), or the chat
    options: Options = field(default_factory=Options)
    model: str | None = None


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidArgument("model", "must be a string")
    return model


def _common(body: dict, req: pb.GenerateRequest) -> None:
    """Sampling, stopping and constraint parameters shared by completions and chat."""
    s, st = req.sampling, req.stopping
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        v = _number(body, name)
        if v is not None:
            setattr(s, name, v)
    top_k = _int(body, "top_k")
    if top_k is not None:
        s.top_k = 0 if top_k == -1 else top_k  # -1: off, as in vLLM
    seed = _int(body, "seed")
    if seed is not None:
        s.seed = seed % 2**64  # (a negative seed is a seed too)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise InvalidArgument("logit_bias", "must be an object of token id -> bias")
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise InvalidArgument(f"logit_bias[{key}]", "keys must be token ids") from None
            if not 0 <= token < 2**32 or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgument(f"logit_bias[{key}]", "must map a token id to a number")
            s.logit_bias[token] = value
    st.stop_sequences.extend(_strings(body, "stop"))
    if "stop_token_ids" in body:
        st.stop_token_ids.extend(token_ids(body["stop_token_ids"], "stop_token_ids"))
    st.ignore_eos = boolean(body, "ignore_eos")
    st.include_stop_sequence = boolean(body, "include_stop_str_in_output")
    min_tokens = _unsigned(body, "min_tokens")
    if min_tokens:
        st.min_new_tokens = min_tokens
    n = _unsigned(body, "n")
    if n is not None:
        if n < 1:
            raise InvalidArgument("n", "must be at least 1")
        req.n = n
    keep = _int(body, "truncate_prompt_tokens")
    if keep is not None:
        req.truncate_input_tokens = max(keep, 0)
    _constraint(body, req)


def _constraint(body: dict, req: pb.GenerateRequest) -> None:
    """response_format, and vLLM's guided_* parameters, onto our constraint."""
    given = [k for k in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
             if body.get(k) is not None]
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise InvalidArgument("response_format", 'type must be "text", "json_object" or "json_schema"')
        if fmt["type"] == "text":
            given.remove("response_format")
    if len(given) > 1:
        raise InvalidArgument(given[1], f"give one constraint, not {' and '.join(given)}")
    if not given:
        return
    c, kind = req.constraint, given[0]
    if kind == "response_format" and fmt["type"] == "json_object":
        c.json_object = True
    elif kind == "response_format":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise InvalidArgument("response_format", "json_schema.schema must be a JSON Schema object")
        c.json_schema = json.dumps(schema)
    elif kind == "guided_json":
        v = body[kind]
        c.json_schema = v if isinstance(v, str) else json.dumps(v)
    elif kind == "guided_choice":
        c.choice.choices.extend(_strings(body, kind) or [""])  # (an empty list is refused downstream)
    else:
        v = body[kind]
        if not isinstance(v, str):
            raise InvalidArgument(kind, "must be a string")
        setattr(c, "regex" if kind == "guided_regex" else "grammar", v)


def completion(body: dict) -> Parsed:
    """A /v1/completions body: one GenerateRequest per prompt."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = prompt
    else:
        raise InvalidArgument("prompt", "must be a string, a list of strings, a list of token ids or a list of them")
    options = Options(stream=boolean(body, "stream"), echo=boolean(body, "echo"))
    _stream_options(body, options)
    logprobs = _unsigned(body, "logprobs")
    options.logprobs, options.top_logprobs = logprobs is not None, logprobs or 0
    max_tokens = _unsigned(body, "max_tokens")
    if max_tokens == 0 and not options.echo:
        raise InvalidArgument("max_tokens", "must be at least 1 (0 only with echo)")
    requests = []
    for i, p in enumerate(prompts):
        req = pb.GenerateRequest()
        if isinstance(p, str):
            req.text = p
        else:
            req.token_ids.ids.extend(token_ids(p, f"prompt[{i}]" if len(prompts) > 1 else "prompt"))
        _common(body, req)
        if max_tokens is not None:
            req.stopping.max_new_tokens = max_tokens
        req.response.logprobs = options.logprobs
        req.response.top_n = options.top_logprobs
        req.response.prompt_tokens = options.echo and options.logprobs
        requests.append(req)
    return Parsed(requests, options, _model(body))


def chat(body: dict) -> Parsed:
    """A /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "must be a non-empty list of messages")
    req = pb.GenerateRequest()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidArgument(f"messages[{i}]", "must be an object with a role and content")
        req.chat.messages.append(pb.ChatMessage(role=m["role"], content=_content(m.get("content"), i)))
    options = Options(stream=boolean(body, "stream"), logprobs=boolean(body, "logprobs"))
    _stream_options(body, options)
    top = _unsigned(body, "top_logprobs")
    if top and not options.logprobs:
        raise InvalidArgument("top_logprobs", "needs logprobs: true")
    options.top_logprobs = top or 0
    _common(body, req)
    max_tokens = _unsigned(body, "max_completion_tokens")
    max_tokens = max_tokens if max_tokens is not None else _unsigned(body, "max_tokens")
    if max_tokens is not None:
        if max_tokens < 1:
            raise InvalidArgument("max_tokens", "must be at least 1")
        req.stopping.max_new_tokens = max_tokens
    req.response.logprobs = options.logprobs
    req.response.top_n = options.top_logprobs
    return Parsed([req], options, _model(body))


def _content(content, i: int) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InvalidArgument(f"messages[{i}].content", "must be a string or a list of text parts")


def _stream_options(body: dict, options: Options) -> None:
    so = body.get("stream_options")
    if so is None:
        return
    if not isinstance(so, dict):
        raise InvalidArgument("stream_options", "must be an object")
    if not options.stream:
        raise InvalidArgument("stream_options", "only with stream: true")
    options.include_usage = boolean(so, "include_usage")


# ---- responses ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(out: RequestOutput) -> str | None:
    return FINISH[out.finish_reason] if out.finish_reason is not None else None


class LegacyLogprobs:
    """A completion choice's `logprobs` (tokens, token_logprobs, top_logprobs, text_offset),
    built as tokens come; `offset` is where the next token's text starts in the choice's text."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.offset = 0

    def shape(self, tokens: list[TokenLogprob | int]) -> dict:
        """tokens: TokenLogprob, or a bare id for a token without a logprob (a prompt's first)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            token_id = t if isinstance(t, int) else t.token_id
            text = token_text(self.tok, token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if isinstance(t, int) else t.logprob)
            out["top_logprobs"].append(None if isinstance(t, int) or not t.top else
                                       {token_text(self.tok, i): lp for i, lp in t.top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def merge_legacy(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(tokens: list[TokenLogprob], tok: Tokenizer) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        data = tok.token_bytes(token_id)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}
    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in tokens]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def envelope(kind: str, response_id: str, model: str, choices: list, **extra) -> dict:
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
            **extra}
