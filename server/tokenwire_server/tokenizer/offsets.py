"""Where each token of a text came from: byte and character offsets."""

from __future__ import annotations

import bisect


def token_spans(pieces: list[bytes], text: str) -> list[tuple[int, int, int, int]]:
    """(byte_start, byte_end, char_start, char_end) per token, given each token's bytes, whose
    concatenation is text's UTF-8. A token holding part of a character covers that whole
    character in characters."""
    # Byte offset at which each character starts, plus the end.
    char_starts, offset = [], 0
    for ch in text:
        char_starts.append(offset)
        offset += len(ch.encode("utf-8"))
    char_starts.append(offset)
    spans, start = [], 0
    for piece in pieces:
        end = start + len(piece)
        char_start = bisect.bisect_right(char_starts, start) - 1  # the character holding byte `start`
        char_end = bisect.bisect_left(char_starts, end)  # first character starting at or after `end`
        spans.append((start, end, char_start, char_end if end > start else char_start))
        start = end
    return spans
