"""What the engine hands back: one GeneratedToken per step, the last with a finish reason."""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
    token_id: int
    logprob: float  # log-probability under the model (before temperature and filters)
    finish_reason: FinishReason | None = None
