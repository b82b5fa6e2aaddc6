"""SamplingParams: how one request picks its tokens and when it stops, validated field by field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import InvalidArgument


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None  # None: the engine draws one and reports it
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_new_tokens_limit: int | None = None) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument("top_k", f"must be >= 0 (0 turns it off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise InvalidArgument("top_p", f"must be in (0, 1], got {self.top_p}")
        if not (0 <= self.min_p <= 1):
            raise InvalidArgument("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if max_new_tokens_limit is not None and self.max_new_tokens > max_new_tokens_limit:
            raise InvalidArgument("max_new_tokens",
                                  f"{self.max_new_tokens} exceeds the server limit of {max_new_tokens_limit}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidArgument("seed", f"must be in [0, 2^63), got {self.seed}")
