"""TextStream: generated token ids in, text deltas out, with stop sequences matched across
token boundaries. Text that might be the start of a stop sequence is held back until it
is known not to be, so nothing at or after a stop sequence ever leaves the server."""

from __future__ import annotations

from ..tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop_sequences: list[str], include_stop: bool):
        self._detok = tokenizer.detokenizer()
        self._special = tokenizer.special_ids  # end and control tokens carry no text
        self._stops = stop_sequences
        self._include = include_stop
        self._pending = ""  # decoded, not yet released

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Feed one token; return (text to release now, the stop sequence matched or None)."""
        if token_id not in self._special:
            self._pending += self._detok.push(token_id)
        return self._release(final=False)

    def flush(self) -> tuple[str, str | None]:
        """At the end of generation: release what is held back (a match can still occur)."""
        self._pending += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, str | None]:
        text = self._pending
        match = None
        for stop in self._stops:  # the earliest match wins; the first listed breaks ties
            at = text.find(stop)
            if at >= 0 and (match is None or at < match[0]):
                match = (at, stop)
        if match is not None:
            at, stop = match
            self._pending = ""
            return text[: at + len(stop)] if self._include else text[:at], stop
        hold = 0 if final else self._partial_match(text)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], None

    def _partial_match(self, text: str) -> int:
        """Length of the longest suffix of text that begins some stop sequence."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
