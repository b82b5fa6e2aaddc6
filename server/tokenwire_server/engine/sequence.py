"""Sequence: one generation or scoring request's state as it moves through the engine."""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field

from .block_manager import BlockTable
from .outputs import FinishReason, TokenLogprob
from .sampling_params import SEEDS, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    truncated: bool = False  # prompt tokens were dropped to fit
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
    stop_sequence: str = ""
    # n samples of one prompt: the later samples wait for the first one's prefill and share it.
    parent: Sequence | None = None
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


def samples(prompt_ids: list[int], params: SamplingParams, n: int = 1, truncated: bool = False) -> list[Sequence]:
    """n sequences of one prompt. Sample i uses seed + i (wrapping within the valid seeds), so
    each one can be replayed alone; only the first reports prompt logprobs (the others share
    its computed prompt)."""
    seed = params.ensure_seed()
    first = Sequence(prompt_ids, params, truncated)
    rest = [Sequence(prompt_ids, dataclasses.replace(params, seed=(seed + i) % SEEDS, prompt_logprobs=False),
                     truncated, parent=first) for i in range(1, n)]
    return [first, *rest]
