"""The engine's boundary: plain, immutable inputs (EngineRequest) in, immutable outputs
(RequestOutput, ScoreOutput, RequestFailed) out. Nothing outside the engine thread sees the
engine's own request state. No torch here."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int | None = None  # 1 is the most likely token
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob), most likely first


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # the model produced one of its end tokens
    STOP_TOKEN = "stop_token"  # a token from the request's stop_token_ids
    STOP_SEQUENCE = "stop_sequence"  # a stop string matched in the text
    CONTEXT_LIMIT = "context_limit"  # the sequence filled the model's context
    TIME_LIMIT = "time_limit"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class EngineRequest:
    """A generation as the engine takes it: validated by whoever built it (the API's
    converters, or LLMEngine.generate), never checked again."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams  # the engine copies it; sample i uses seed + i
    n: int = 1
    deadline: float | None = None  # monotonic; the engine drops the request after it
    arrival: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class ScoreRequest:
    """Logprobs of each item's tokens[start:], each given the tokens before it."""

    request_id: str
    items: tuple[tuple[tuple[int, ...], int], ...]  # (token ids, first scored index)
    ranks: bool = False
    top_n: int = 0
    deadline: float | None = None
    arrival: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # of the prompt, taken from the prefix cache
    queue_seconds: float  # arrival to first scheduled
    first_token_seconds: float  # arrival to the first generated token
    total_seconds: float  # arrival to the finish


@dataclass(frozen=True)
class RequestOutput:
    """One generated token of one sample: the text it releases (empty while a character or a
    possible stop sequence is incomplete) and, on the sample's last output, why it finished."""

    request_id: str
    index: int  # the sample
    token: TokenLogprob  # under the model itself (no temperature or filters)
    text: str
    seed: int
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    usage: Usage | None = None  # with the finish reason
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # on sample 0's first output, when asked

    @property
    def token_id(self) -> int:
        return self.token.token_id

    @property
    def logprob(self) -> float:
        return self.token.logprob

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class ScoreOutput:
    request_id: str
    index: int  # the item
    tokens: tuple[TokenLogprob, ...]  # the scored tokens
    is_greedy: bool  # greedy decoding would have produced exactly these tokens
    queue_seconds: float = 0.0


@dataclass(frozen=True)
class RequestFailed:
    """The request could not go on (a fault touched it); its other samples are dropped too."""

    request_id: str
    error: Exception
