"""Byte-level BPE vocabularies (GPT-2 style) turned into tiktoken's ranks, and pre-tokenizer patterns."""

from __future__ import annotations

from functools import cache

# Pre-tokenizer regexes, by the names GGUF files use (tokenizer.ggml.pre).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM splits every digit off first, then applies GPT-2's pattern to the pieces between
# digits. One regex does both: a lone \p{N}, no digit runs, and a whitespace run ending
# before a digit taken whole (it ended its piece, where (?!\S) holds).
SMOLLM_PATTERN = (r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+"""
                  r"""|\s+(?=\p{N})|\s+(?!\S)|\s+""")
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2, Qwen2.5 and Qwen3: Llama 3's regex with single digits (llama.cpp's "qwen2", and the
# Split regex of their tokenizer.json).
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
PATTERNS = {"gpt-2": GPT2_PATTERN, "gpt2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN,
            "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-ins back to raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def token_bytes(token: str) -> bytes:
    """The raw bytes behind a byte-level BPE token string such as 'Ġthe'."""
    table = _unicode_to_byte()
    return bytes(table[c] for c in token)


def mergeable_ranks(id_tokens, special_ids: set[int]) -> dict[bytes, int]:
    """tiktoken ranks from (id, token) pairs of a vocabulary ordered by merge priority:
    the id is the rank."""
    ranks: dict[bytes, int] = {}
    for i, token in sorted(id_tokens):
        if i not in special_ids:
            ranks.setdefault(token_bytes(token), i)  # a duplicate keeps its first (lower) id
    return ranks
