"""StoppingCriteria: one per request, asked once per generated token whether to stop."""

from __future__ import annotations

from .outputs import FinishReason
from .sampling_params import SamplingParams


class StoppingCriteria:
    def __init__(self, params: SamplingParams, eos_ids: tuple[int, ...], prompt_len: int, context_len: int):
        self.max_new_tokens = params.max_new_tokens
        self.eos_ids = frozenset(() if params.ignore_eos else eos_ids)
        self.stop_ids = frozenset(params.stop_token_ids)
        # The last position a token can be fed at is context_len - 1.
        self.room = context_len - prompt_len

    def __call__(self, token_id: int, n_generated: int) -> FinishReason | None:
        if token_id in self.eos_ids:
            return FinishReason.EOS
        if token_id in self.stop_ids:
            return FinishReason.STOP_TOKEN
        if n_generated >= self.max_new_tokens:
            return FinishReason.LENGTH
        if n_generated >= self.room:
            return FinishReason.CONTEXT_LIMIT
        return None
