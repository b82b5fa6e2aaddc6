"""Plain Python results of the client: no protobuf in user code."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenSpan:
    text: str
    byte_start: int
    byte_end: int
    char_start: int
    char_end: int


@dataclass
class Tokenized:
    ids: list[int]
    token_count: int
    original_token_count: int
    tokens: list[TokenSpan] = field(default_factory=list)  # when asked for


@dataclass
class TopToken:
    id: int
    text: str
    logprob: float


@dataclass
class TokenInfo:
    id: int
    text: str
    logprob: float | None = None
    rank: int | None = None
    top: list[TopToken] = field(default_factory=list)


@dataclass
class InputInfo:
    prompt_token_count: int
    seed: int
    truncated: bool
    prompt_tokens: list[TokenInfo] = field(default_factory=list)


@dataclass
class Delta:
    text: str
    tokens: list[TokenInfo]
    index: int = 0  # which sample (n > 1)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_seconds: float
    first_token_seconds: float
    total_seconds: float


@dataclass
class Final:
    finish_reason: str  # length, eos, stop_sequence, stop_token, context_limit, time_limit, cancelled
    stop_sequence: str
    usage: Usage
    index: int = 0  # which sample (n > 1)


@dataclass
class Generation:
    text: str
    tokens: list[TokenInfo]
    finish_reason: str
    stop_sequence: str
    usage: Usage
    seed: int
    prompt_token_count: int
    truncated: bool
    prompt_tokens: list[TokenInfo] = field(default_factory=list)


@dataclass
class Scored:
    tokens: list[TokenInfo]
    logprob_sum: float
    token_count: int
    perplexity: float
    is_greedy: bool


@dataclass
class ServerLimits:
    max_new_tokens: int
    default_max_new_tokens: int
    max_stop_sequences: int
    max_stop_sequence_chars: int
    max_top_n: int
    max_batch_items: int
    max_input_chars: int
    max_samples: int
    max_stop_token_ids: int
    max_constraint_chars: int
    max_choices: int
    constraint_compile_seconds: float


@dataclass
class ModelInfo:
    name: str
    architecture: str
    parameter_count: int
    context_length: int
    vocab_size: int
    end_token_ids: list[int]
    has_chat_template: bool
    dtype: str
    device: str
    limits: ServerLimits
    batch_invariant: bool  # tokens and logprobs do not depend on the rest of the batch
