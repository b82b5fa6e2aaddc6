"""Sequence: one generation request's state as it moves through the engine."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from .logprobs import TokenLogprob
from .outputs import FinishReason
from .sampling_params import SamplingParams

_ids = itertools.count()


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    truncated: bool = False  # prompt tokens were dropped to fit
    output_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # for prompt_ids[1:], when asked
    cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    # Monotonic timestamps
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None  # the engine took it up
    first_token: float | None = None
    finished: float | None = None
