"""Sequence: the engine's own state of one sample of a generation, or one score item. Only
the engine thread touches it; the outside sees EngineRequest in and RequestOutput out."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .block_manager import BlockTable
from .outputs import FinishReason, TokenLogprob
from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    index: int = 0  # the sample, or the score item
    # Scoring: no generation; logprobs of prompt_ids[score_from:] (None: a generation).
    score_from: int | None = None
    output_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # for prompt_ids[1:] (or [score_from:]), when asked
    status: Status = Status.WAITING
    block_table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    cached_tokens: int = 0  # of the prompt, found in the prefix cache
    all_greedy: bool = True  # scoring: every scored token was the most likely one
    finish_reason: FinishReason | None = None
    # n samples of one prompt: the later samples wait for the first one's prefill and share it.
    parent: Sequence | None = None
    # Set by the engine when it takes the request: the seeded generator (None: greedy) and
    # the output processor's state (stopping rules, detokenizer, held-back text).
    generator: object = None
    output: object = None
    # Monotonic timestamps
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None  # first scheduled
    first_token: float | None = None
    finished: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens_between(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list (a decode step needs one token)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - p)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def logits_from(self) -> int:
        """First position whose logits are needed: those positions must be computed, not cached."""
        if self.score_from is not None:
            return self.score_from - 1
        if self.params.prompt_logprobs and not self.output_ids:
            return 0
        return self.num_tokens - 1

