"""OutputProcessor: a sampled token in, a RequestOutput out. The one place that decides
whether and why a sample finishes (end tokens, a completed constraint, stop tokens, stop
sequences, max_new_tokens, the context, the time limit) and what text each token releases.
The synchronous and the asynchronous paths share it: LLMEngine.step calls it for every token
it samples."""

from __future__ import annotations

from ..tokenizer import Tokenizer
from .outputs import FinishReason, RequestOutput, TokenLogprob, Usage
from .sequence import Sequence
from .structured import failed
from .text_stream import TextStream


class SampleState:
    """One sample's stopping rules and its text stream."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer, context_len: int):
        p = seq.params
        self.stream = TextStream(tokenizer, p.stop_sequences, p.include_stop_sequence)
        self.eos_ids = frozenset(() if p.ignore_eos else tokenizer.eos_ids)
        self.stop_ids = frozenset(p.stop_token_ids)
        self.max_new_tokens = p.max_new_tokens
        self.room = context_len - len(seq.prompt_ids)  # the last position a token can be fed at is context - 1
        self.time_limit = p.time_limit
        # Structured output: follows the sampled tokens; the sampler asks it what may come next.
        self.constraint = p.constraint
        self.matcher = p.constraint.matcher() if p.constraint is not None else None

    def finish_reason(self, token_id: int, n_generated: int, elapsed: float) -> FinishReason | None:
        if self.matcher is not None:
            if not self.matcher.consume_token(token_id) or self.matcher.is_error():
                raise failed(self.constraint, self.matcher)  # fails this request alone
            if self.matcher.is_stopped():  # complete, and nothing more can follow
                return FinishReason.EOS
        if token_id in self.eos_ids:
            return FinishReason.EOS
        if token_id in self.stop_ids:
            return FinishReason.STOP_TOKEN
        if n_generated >= self.max_new_tokens:
            return FinishReason.LENGTH
        if n_generated >= self.room:
            return FinishReason.CONTEXT_LIMIT
        if self.time_limit is not None and elapsed >= self.time_limit:
            return FinishReason.TIME_LIMIT
        return None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, context_len: int):
        self.tokenizer = tokenizer
        self.context_len = context_len

    def start(self, seq: Sequence) -> None:
        seq.output = SampleState(seq, self.tokenizer, self.context_len)

    def process(self, seq: Sequence, token: TokenLogprob, now: float) -> RequestOutput:
        """Account for the token the sequence just produced (already appended to its output)."""
        state: SampleState = seq.output
        reason = state.finish_reason(token.token_id, len(seq.output_ids), now - (seq.started or now))
        text, stop = state.stream.push(token.token_id)
        if stop is None and reason is not None:  # the end: release what was held back
            rest, stop = state.stream.flush()
            text += rest
        if stop is not None:
            reason = FinishReason.STOP_SEQUENCE
        if reason is not None:
            seq.finish_reason, seq.finished = reason, now
        prompt_logprobs = None
        if len(seq.output_ids) == 1 and seq.prompt_logprobs is not None:
            prompt_logprobs = tuple(seq.prompt_logprobs)
        return RequestOutput(seq.request_id, seq.index, token, text, seq.params.seed, reason, stop or "",
                             usage(seq, now) if reason is not None else None, prompt_logprobs)


def usage(seq: Sequence, now: float) -> Usage:
    t0 = seq.arrival
    return Usage(prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
                 cached_tokens=seq.cached_tokens, queue_seconds=(seq.started or now) - t0,
                 first_token_seconds=(seq.first_token or now) - t0, total_seconds=(seq.finished or now) - t0)
