"""The SentencePiece BPE backend (Gemma, Phi-3, Mistral, Llama 2): the `tokenizers` library,
which does byte fallback and the '▁' handling exactly, from the model's tokenizer.json or from a
GGUF vocabulary with scores. tiktoken cannot express either."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gguf import TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from ..errors import CheckpointError
from .offsets import Span, offset_spans, token_spans

SPACE = "\u2581"  # '▁', SentencePiece's space
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# Rust's char::is_whitespace, which an added token's lstrip/rstrip strips (Python's isspace
# also takes \x1c-\x1f).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009" \
             "\u200a\u2028\u2029\u202f\u205f\u3000"


class SentencePieceBackend:
    def __init__(self, spec: str, path: Path | str = "tokenizer.json"):
        """spec: a tokenizer.json (text) of a BPE model in SentencePiece's style."""
        self.spec = spec
        data = json.loads(spec)
        self.dummy_prefix = _decoder_strips_prefix(data.get("decoder"), path)
        # Two instances, never reconfigured (threads share them): user text keeps special-token
        # text as text; the other matches it (allow_special). Added tokens not marked special
        # are matched by both, as `tokenizers` does.
        self._plain = Tokenizer.from_str(spec)
        self._plain.encode_special_tokens = True
        self._specials = Tokenizer.from_str(spec)
        # Text after a special token is not at the start of the text: a Metaspace that adds the
        # prefix space to the first piece only ("first") must not add it there.
        if '"prepend_scheme": "first"' in json.dumps(data.get("pre_tokenizer")):
            after = dict(data, pre_tokenizer=_never_prepend(data["pre_tokenizer"]))
            self._after_special = Tokenizer.from_str(json.dumps(after))
            self._after_special.encode_special_tokens = True
        else:
            self._after_special = self._plain
        added = self._plain.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        self._strip = {i: (t.lstrip, t.rstrip) for i, t in added.items() if t.special and (t.lstrip or t.rstrip)}
        vocab = self._plain.get_vocab(with_added_tokens=True)
        self.n_vocab = max(vocab.values(), default=-1) + 1
        byte_fallback = bool(data["model"].get("byte_fallback"))
        self._bytes: list[bytes | None] = [None] * self.n_vocab
        self._is_byte = [False] * self.n_vocab
        for piece, i in vocab.items():
            m = BYTE_PIECE.fullmatch(piece) if byte_fallback and i not in added else None
            self._is_byte[i] = m is not None
            # The decoder's work per token: '▁' is a space, <0xXX> is that byte.
            self._bytes[i] = bytes([int(m.group(1), 16)]) if m else piece.replace(SPACE, " ").encode("utf-8")

    def __reduce__(self):  # the tokenizer.json pickles small and fast; the instances are rebuilt
        return type(self), (self.spec,)

    def encode_plain(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        return self._specials.encode(text, add_special_tokens=False).ids

    def encode_pieces(self, pieces: list[str | int]) -> list[int]:
        """Runs of plain text and special ids, encoded as `tokenizers` encodes the text they join
        into when the specials are matched: each run on its own (normalizers apply per run), a
        special token's lstrip/rstrip taking the whitespace beside it, and the first-only prefix
        space only at the start."""
        ids: list[int] = []
        for k, p in enumerate(pieces):
            if isinstance(p, int):
                ids.append(p)
                continue
            if k + 1 < len(pieces) and self._strip.get(pieces[k + 1], (False,))[0]:
                p = p.rstrip(WHITESPACE)
            if k > 0 and self._strip.get(pieces[k - 1], (False, False))[1]:
                p = p.lstrip(WHITESPACE)
            ids += (self._after_special if k > 0 else self._plain).encode(p, add_special_tokens=False).ids
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._bytes[token_id] if 0 <= token_id < self.n_vocab else None
        if piece is None:
            raise KeyError(token_id)
        return piece

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.token_bytes(t) for t in ids)

    def spans(self, text: str, ids: list[int]) -> list[Span]:
        """From `tokenizers`' offsets (characters of the original text, across its normalizer)."""
        for instance in (self._plain, self._specials):
            encoding = instance.encode(text, add_special_tokens=False)
            if encoding.ids == ids:
                return offset_spans(text, encoding.offsets, [self.token_bytes(t) for t in ids],
                                    [self._is_byte[t] for t in ids])
        return token_spans([self.token_bytes(t) for t in ids], text)  # not text's encoding: by bytes

    def lltokenizer(self, n_vocab: int, eos_ids: tuple[int, ...]):
        import llguidance

        return llguidance.LLTokenizer(self.spec, n_vocab=n_vocab, eos_token=list(eos_ids))


def _decoder_strips_prefix(decoder: dict | None, path) -> bool:
    """Whether the decoder drops one leading space (the prefix space the normalizer or
    pre-tokenizer added); and a check that it is the decoding token_bytes implements."""
    steps = (decoder or {}).get("decoders", [decoder] if decoder else [])
    strips = False
    for s in steps:
        kind = s.get("type")
        if kind == "Replace" and s.get("pattern", {}).get("String") == SPACE and s.get("content") == " ":
            continue
        if kind in ("ByteFallback", "Fuse"):
            continue
        if kind == "Strip" and s.get("content") == " " and s.get("stop", 0) == 0 and s.get("start", 0) <= 1:
            strips = strips or s.get("start", 0) == 1
            continue
        if kind == "Metaspace" and s.get("replacement", SPACE) == SPACE:
            strips = strips or s.get("prepend_scheme", "always" if s.get("add_prefix_space", True) else "never") \
                != "never"
            continue
        raise CheckpointError(path, f"decoder {[x.get('type') for x in steps]} is not supported for a "
                                    "SentencePiece-style model (supported: Replace '▁', ByteFallback, Fuse, "
                                    "Strip, Metaspace)")
    return strips


def _never_prepend(pre: dict) -> dict:
    if pre.get("type") == "Sequence":
        return dict(pre, pretokenizers=[_never_prepend(p) for p in pre["pretokenizers"]])
    if pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first":
        return dict(pre, prepend_scheme="never")
    return pre


def is_sentencepiece_style(spec: dict) -> bool:
    """A tokenizer.json BPE model in SentencePiece's style: byte fallback or '▁' for spaces
    (byte-level models spell bytes in GPT-2's printable alphabet instead)."""
    parts = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")])
    return bool(spec["model"].get("byte_fallback")) or "Metaspace" in parts or "ByteFallback" in parts


def from_hf_spec(spec: dict, path: Path) -> SentencePieceBackend:
    return SentencePieceBackend(json.dumps(spec), path)


# ---- from a GGUF vocabulary (tokenizer.ggml.model "llama") ----

def sentencepiece_merges(pieces: list[str], scores: list[float], usable: list[bool]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's: every pair of pieces whose concatenation is a
    piece, best first by that piece's score (SentencePiece merges the pair whose result scores
    highest). Ties as transformers' generate_merges breaks them (longer left, then longer right,
    then vocabulary order), so our merges equal those of a tokenizer.json converted by it.
    Control, unknown, byte and unused pieces are neither parts nor results, as SentencePiece
    never merges into them. One pass over every split point of every piece: linear in the
    vocabulary's characters (about a second for 256k pieces)."""
    index: dict[str, int] = {}
    for i, p in enumerate(pieces):
        if usable[i]:
            index.setdefault(p, i)
    merges = []
    for i, piece in enumerate(pieces):
        if not usable[i] or index[piece] != i:
            continue
        local = []
        for k in range(1, len(piece)):
            left, right = index.get(piece[:k]), index.get(piece[k:])
            if left is not None and right is not None:
                local.append((left, right))
        local.sort()
        merges += [(scores[i], len(pieces[left]), len(pieces[right]), left, right) for left, right in local]
    # Stable sort, best first; Python keeps the order of equal keys with reverse=True too.
    merges.sort(key=lambda m: m[:3], reverse=True)
    return [(pieces[left], pieces[right]) for *_, left, right in merges]


def from_gguf_vocab(tokens: list[str], scores: list[float] | None, types: list[int], merges: list[str] | None,
                    add_space_prefix: bool, architecture: str) -> SentencePieceBackend:
    """A SentencePiece BPE vocabulary as llama.cpp writes it, as a `tokenizers` BPE with byte
    fallback. The prefix space comes from a normalizer, as SentencePiece and llama.cpp add it:
    before every run of text, also one that starts with a space (Metaspace would not)."""
    tokens = list(tokens)
    if architecture in GEMMA_ARCHITECTURES:
        # Gemma files store tokens of several spaces with real spaces, while the text they
        # match is spelled with '▁'; and Gemma's scores do not follow its merge order, its
        # token order does (both as transformers reads them).
        tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]
    scores = list(scores) if scores is not None else [-float(i) for i in range(len(tokens))]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        mergeable = [t in (TokenType.NORMAL, TokenType.USER_DEFINED) for t in types]
        pairs = sentencepiece_merges(tokens, scores, mergeable)
    unk = next((tokens[i] for i, t in enumerate(types) if t == TokenType.UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    replace = normalizers.Replace(" ", SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if add_space_prefix else replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == TokenType.CONTROL and vocab.get(tokens[i]) == i])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == TokenType.USER_DEFINED and vocab.get(tokens[i]) == i])
    return SentencePieceBackend(tok.to_str(), "GGUF vocabulary")
