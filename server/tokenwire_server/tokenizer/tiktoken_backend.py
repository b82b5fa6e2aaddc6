"""The byte-level BPE backend (GPT-2, SmolLM, Llama 3, Qwen2/3): a tiktoken Encoding whose
ranks are the vocabulary's ids, split by the model's own pre-tokenizer regex."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import tiktoken
from gguf import TokenType

from ..errors import CheckpointError
from .bpe import GPT2_PATTERN, PATTERNS, SMOLLM_PATTERN, mergeable_ranks
from .offsets import Span, normalized_token_spans, token_spans


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


class TiktokenBackend:
    dummy_prefix = False  # byte-level tokens hold their spaces: nothing is added to the text

    def __init__(self, encoding: tiktoken.Encoding, special: set[str] | None = None, nfc: bool = False):
        """special: the added tokens that are control tokens (plain text unless allowed); the
        encoding's other added tokens are matched in any text, as `tokenizers` matches added
        tokens marked not special. None: all of them are control tokens."""
        self.encoding = encoding
        self.nfc = nfc
        added = encoding._special_tokens
        special = set(added) if special is None else special
        self.special_tokens = {t: i for t, i in added.items() if t in special}
        self._matched = frozenset(t for t in added if t not in special)

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def _normal(self, text: str) -> str:
        return _nfc(text) if self.nfc else text

    def encode_plain(self, text: str) -> list[int]:
        if self._matched:
            return self.encoding.encode(self._normal(text), allowed_special=self._matched, disallowed_special=())
        return self.encoding.encode_ordinary(self._normal(text))

    def encode_with_specials(self, text: str) -> list[int]:
        return self.encoding.encode(self._normal(text), allowed_special="all")

    def encode_pieces(self, pieces: list[str | int]) -> list[int]:
        """Runs of plain text and special ids in order (byte-level runs do not depend on what
        comes before them)."""
        ids: list[int] = []
        for p in pieces:
            if isinstance(p, int):
                ids.append(p)
            else:
                ids += self.encode_plain(p)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)  # KeyError when not in the vocabulary

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(ids)

    def spans(self, text: str, ids: list[int]) -> list[Span]:
        pieces = [self.token_bytes(t) for t in ids]
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            return normalized_token_spans(pieces, text, _nfc)
        return token_spans(pieces, text)

    def lltokenizer(self, n_vocab: int, eos_ids: tuple[int, ...]):
        import llguidance.tiktoken

        return llguidance.tiktoken.lltokenizer_from_encoding(self.encoding, n_vocab=n_vocab, eos_token=list(eos_ids))


def _encoding(name: str, pattern: str, id_tokens, added: dict[str, int]) -> tiktoken.Encoding:
    ranks = mergeable_ranks(id_tokens, set(added.values()))
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)


# Pre-tokenizers (GGUF names) of models whose tokenizer.json normalizes to NFC first. A GGUF
# does not say so, and llama.cpp does not normalize; we follow the model's own tokenizer.json
# (they differ only on text that is not NFC already).
NFC_PRE = frozenset({"qwen2"})


def from_gguf_vocab(name: str, pre: str, tokens: list[str], types: list[int], path: Path) -> TiktokenBackend:
    """GGUF `tokenizer.ggml.model` "gpt2". A CONTROL token is a control token, a USER_DEFINED
    one (like `<think>`) an added token matched in any text, as llama.cpp does."""
    if pre not in PATTERNS:
        raise CheckpointError(path, f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(PATTERNS)})")
    added = {tokens[i]: i for i, t in enumerate(types) if t in (TokenType.CONTROL, TokenType.USER_DEFINED)}
    special = {tokens[i] for i, t in enumerate(types) if t == TokenType.CONTROL}
    return TiktokenBackend(_encoding(name, PATTERNS[pre], enumerate(tokens), added), special, nfc=pre in NFC_PRE)


def from_hf_spec(name: str, spec: dict, path: Path) -> TiktokenBackend:
    """A tokenizer.json of a byte-level BPE model: its pre-tokenizer regex, an NFC normalizer
    (Qwen2) or none, its added tokens ("special": false ones are matched in any text)."""
    bpe = spec["model"]
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special", True)}
    vocab = {t: i for t, i in bpe["vocab"].items() if t not in added}
    encoding = _encoding(name, _hf_pattern(spec.get("pre_tokenizer"), path), ((i, t) for t, i in vocab.items()), added)
    return TiktokenBackend(encoding, special, nfc=_hf_nfc(spec.get("normalizer"), path))


def _hf_nfc(normalizer: dict | None, path: Path) -> bool:
    """Whether the tokenizer.json normalizer is NFC (the only one byte-level models use)."""
    steps = (normalizer or {}).get("normalizers", [normalizer] if normalizer else [])
    kinds = [s.get("type") for s in steps]
    if kinds in ([], ["NFC"]):
        return bool(kinds)
    raise CheckpointError(path, f"normalizer {kinds} is not supported for a byte-level BPE model "
                                "(supported: none, NFC)")


def _hf_pattern(pre: dict | None, path: Path) -> str:
    """The regex of a tokenizer.json pre_tokenizer (the kinds byte-level BPE models use)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return SMOLLM_PATTERN
    if kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {}):
        return steps[0]["pattern"]["Regex"]
    raise CheckpointError(path, f"pre-tokenizer {kinds} is not supported (supported: ['ByteLevel'], "
                                "['Digits', 'ByteLevel'], ['Split', 'ByteLevel'] with a regex)")
