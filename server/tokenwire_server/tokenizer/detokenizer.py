"""IncrementalDetokenizer: token ids in one at a time, text out without half characters."""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    """Holds back the bytes of an unfinished UTF-8 character (an emoji or CJK character split
    across tokens) until the token that completes it arrives."""

    def __init__(self, token_bytes):
        self._token_bytes = token_bytes  # id -> bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """Text still held back at the end of a sequence (invalid bytes become U+FFFD)."""
        return self._decoder.decode(b"", final=True)
