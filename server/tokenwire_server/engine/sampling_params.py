"""SamplingParams: how one request picks its tokens, when it stops and what it reports,
validated field by field."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from ..errors import InvalidArgument
from ..limits import Limits

SEEDS = 2**63  # seeds are in [0, SEEDS)
# Temperatures below this are greedy: logits divided by them overflow float32 (1e-40 gave token 0
# every time), and at 1e-5 sampling already keeps only the top token unless two nearly tie.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 (or anything below MIN_TEMPERATURE) means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None  # None: the engine draws one and reports it
    # Penalties and biases
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits; -100 bans
    min_new_tokens: int = 0  # end and stop tokens are banned until this many are generated
    # Stopping
    max_new_tokens: int = 256
    stop_sequences: list[str] = field(default_factory=list)
    include_stop_sequence: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    time_limit: float | None = None  # seconds from the start of generation
    # What to report per token
    logprobs: bool = False
    ranks: bool = False
    top_n: int = 0
    prompt_logprobs: bool = False
    # Structured output: the output must satisfy this (engine/structured.py); None: free text.
    constraint: object = None

    def ensure_seed(self) -> int:
        """The seed, drawn now when none was given (it is reported back, so the output can be replayed)."""
        if self.seed is None:
            self.seed = random.randrange(SEEDS)
        return self.seed

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def validate(self, limits: Limits = Limits(), vocab_size: int | None = None) -> None:
        """Raise InvalidArgument naming the first field that is out of range."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument("top_k", f"must be >= 0 (0 turns it off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise InvalidArgument("top_p", f"must be in (0, 1], got {self.top_p}")
        if not (0 <= self.min_p <= 1):
            raise InvalidArgument("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not (0 <= self.seed < SEEDS):
            raise InvalidArgument("seed", f"must be in [0, 2^63), got {self.seed}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidArgument("repetition_penalty", f"must be > 0 (1 is off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise InvalidArgument(name, f"must be in [-2, 2], got {value}")
        if len(self.logit_bias) > limits.max_logit_bias:
            raise InvalidArgument("logit_bias", f"{len(self.logit_bias)} entries, at most {limits.max_logit_bias}")
        for token, bias in self.logit_bias.items():
            if vocab_size is not None and not 0 <= token < vocab_size:
                raise InvalidArgument("logit_bias", f"token id {token} is outside the vocabulary [0, {vocab_size})")
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise InvalidArgument("logit_bias", f"bias for token {token} must be in [-100, 100], got {bias}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise InvalidArgument("min_new_tokens", f"must be in [0, max_new_tokens={self.max_new_tokens}], "
                                                    f"got {self.min_new_tokens}")
        if self.max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.max_new_tokens > limits.max_new_tokens:
            raise InvalidArgument("max_new_tokens",
                                  f"{self.max_new_tokens} exceeds the server limit of {limits.max_new_tokens}")
        if len(self.stop_sequences) > limits.max_stop_sequences:
            raise InvalidArgument("stop_sequences", f"{len(self.stop_sequences)} given, at most "
                                                    f"{limits.max_stop_sequences} allowed")
        for i, stop in enumerate(self.stop_sequences):
            if not stop:
                raise InvalidArgument(f"stop_sequences[{i}]", "must not be empty")
            if len(stop) > limits.max_stop_sequence_chars:
                raise InvalidArgument(f"stop_sequences[{i}]", f"{len(stop)} characters, at most "
                                                              f"{limits.max_stop_sequence_chars} allowed")
        if len(self.stop_token_ids) > limits.max_stop_token_ids:
            raise InvalidArgument("stop_token_ids", f"{len(self.stop_token_ids)} given, at most "
                                                    f"{limits.max_stop_token_ids} allowed")
        if vocab_size is not None:
            for i, t in enumerate(self.stop_token_ids):
                if not 0 <= t < vocab_size:
                    raise InvalidArgument(f"stop_token_ids[{i}]", f"token id {t} is outside the vocabulary "
                                                                  f"[0, {vocab_size})")
        if self.time_limit is not None and not (math.isfinite(self.time_limit) and self.time_limit > 0):
            raise InvalidArgument("time_limit", f"must be a positive number of seconds, got {self.time_limit}")
        if not 0 <= self.top_n <= limits.max_top_n:
            raise InvalidArgument("top_n", f"must be in [0, {limits.max_top_n}], got {self.top_n}")
