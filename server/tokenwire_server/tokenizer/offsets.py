"""Where each token of a text came from: byte and character offsets."""

from __future__ import annotations

import bisect
import unicodedata

Span = tuple[int, int, int, int]  # (byte_start, byte_end, char_start, char_end) in the original text


def _char_starts(text: str) -> list[int]:
    """Byte offset at which each character starts, plus the end."""
    starts, offset = [], 0
    for ch in text:
        starts.append(offset)
        offset += len(ch.encode("utf-8"))
    starts.append(offset)
    return starts


def _char_span(char_starts: list[int], start: int, end: int) -> tuple[int, int]:
    """The characters holding bytes [start, end): a part of a character covers all of it."""
    char_start = bisect.bisect_right(char_starts, start) - 1
    char_end = bisect.bisect_left(char_starts, end) if end > start else char_start
    return char_start, char_end


def token_spans(pieces: list[bytes], text: str) -> list[Span]:
    """Spans per token, given each token's bytes, whose concatenation is text's UTF-8. A token
    holding part of a character covers that whole character in characters."""
    char_starts = _char_starts(text)
    spans, start = [], 0
    for piece in pieces:
        end = start + len(piece)
        spans.append((start, end, *_char_span(char_starts, start, end)))
        start = end
    return spans


def normalized_token_spans(pieces: list[bytes], text: str, normalize) -> list[Span]:
    """Spans into text of tokens whose bytes concatenate to normalize(text) (NFC). Text is cut
    where normalizing cannot reach across; a token inside a run that normalizing changed covers
    the whole run in the original, elsewhere it maps exactly."""
    runs = _runs(text, normalize)
    # For each byte offset into the normalized text: where a span starting / ending there goes.
    to_start, to_end, original = [], [], 0
    for run in runs:
        norm, orig = normalize(run).encode("utf-8"), run.encode("utf-8")
        same = norm == orig
        for k in range(len(norm)):
            to_start.append(original + k if same else original)
            to_end.append(original + k if same or k == 0 else original + len(orig))
        original += len(orig)
    to_start.append(original)
    to_end.append(original)
    char_starts = _char_starts(text)
    spans, start = [], 0
    for piece in pieces:
        end = start + len(piece)
        bs, be = to_start[start], max(to_end[end], to_start[start]) if end > start else to_start[start]
        spans.append((bs, be, *_char_span(char_starts, bs, be)))
        start = end
    return spans


def _runs(text: str, normalize) -> list[str]:
    """text cut before each character that starts afresh: a starter (combining class 0) that
    does not compose with the character before it, and no Hangul jamo (L, V and T compose in
    threes). The cut is checked: if the runs do not normalize to the whole, one run."""
    runs, start = [], 0
    for i in range(1, len(text)):
        c = text[i]
        if unicodedata.combining(c) or 0x1100 <= ord(c) <= 0x11FF or 0xA960 <= ord(c) <= 0xA97F \
                or 0xD7B0 <= ord(c) <= 0xD7FF:
            continue
        if normalize(text[i - 1:i + 1]) == normalize(text[i - 1]) + normalize(c):
            runs.append(text[start:i])
            start = i
    runs.append(text[start:])
    if "".join(normalize(r) for r in runs) != normalize(text):
        return [text]
    return runs


def offset_spans(text: str, offsets: list[tuple[int, int]], pieces: list[bytes],
                 byte_tokens: list[bool]) -> list[Span]:
    """Spans from character offsets into text (a `tokenizers` Encoding's). Byte-fallback tokens
    share their character's offsets; each takes its own byte of it in turn, as a byte-level
    token would. A token that is only the added prefix space ('▁' aligned to the character
    after it, where the next token starts too) takes an empty span."""
    char_starts = _char_starts(text)
    spans: list[Span] = []
    for k, ((cs, ce), piece, is_byte) in enumerate(zip(offsets, pieces, byte_tokens)):
        bs, be = char_starts[cs], char_starts[ce]
        if is_byte:
            prev = spans[-1] if spans and byte_tokens[k - 1] and offsets[k - 1] == (cs, ce) else None
            bs = prev[1] if prev is not None else bs
            be = min(bs + 1, char_starts[ce])
        elif piece == b" " and (text[cs:cs + 1] != " " or (k + 1 < len(offsets) and offsets[k + 1][0] == cs)):
            be, ce = bs, cs
        spans.append((bs, be, cs, ce))
    return spans
