"""What the engine hands back: one GeneratedToken per step, the last with a finish reason.
No torch here: the scheduler's Sequence uses these types."""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
class GeneratedToken:
    token: TokenLogprob  # the id, and its logprob under the model (rank and top-N when asked)
    finish_reason: FinishReason | None = None

    @property
    def token_id(self) -> int:
        return self.token.token_id

    @property
    def logprob(self) -> float:
        return self.token.logprob


@dataclass(frozen=True)
class ScoreOutput:
    tokens: list[TokenLogprob]  # the scored tokens
    is_greedy: bool  # greedy decoding would have produced exactly these tokens


@dataclass(frozen=True)
class StreamEvent:
    """One generated token as a client sees it: the token, the text it releases (possibly
    empty, while a character or a possible stop sequence is incomplete), and on the last
    event the finish reason and matched stop sequence."""

    token: TokenLogprob
    text: str
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
