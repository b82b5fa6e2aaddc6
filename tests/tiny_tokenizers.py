"""Small tokenizers in each family's style, built offline with the `tokenizers` library:
Qwen2's byte-level BPE (its split regex, NFC, ChatML specials) and SentencePiece BPE with byte
fallback, Gemma's (no prefix space) and Llama 2 / Phi-3's (a prefix space). Each comes with
its chat template and end tokens, as a model directory holds them."""

from __future__ import annotations

import json
from pathlib import Path

from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from tokenwire_server.tokenizer.bpe import QWEN2_PATTERN

TRAINING = """The quick brown fox jumps over the lazy dog. Hello world, how are you today? I am fine,
thank you. def add(a, b):\n    return a + b\nclass Foo:\n\tpass\nPrices: $1,234.56 and 7890 items; 3.14159 is pi.
Tokenizers split text into tokens; tokens are numbers the model reads. Naïve café résumé.
中文测试，日本語のテキスト。العربية جميلة. עברית יפה. Привет, мир! 🎉🚀 emoji here.
""" * 3

QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3_TEMPLATE = ("{% for m in messages %}{{ '<|' + m.role + '|>' + '\n' + m.content + '<|end|>' + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


# ---- building the reference tokenizers ----

def qwen2_style() -> tuple[HFTokenizer, dict]:
    """Byte-level BPE with Qwen2's split regex and NFC normalizer, specials after the vocabulary."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TRAINING], trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    v = tok.get_vocab()
    config = {"chat_template": QWEN_TEMPLATE, "add_bos_token": False, "eos_token": "<|im_end|>"}
    return tok, {"config": config, "eos": [v["<|im_end|>"], v["<|endoftext|>"]], "template": QWEN_TEMPLATE,
                 "bos": None, "control": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "user": ["<think>", "</think>"]}


def sentencepiece_style(prefix: bool) -> tuple[HFTokenizer, dict]:
    """SentencePiece BPE as converted to tokenizer.json: byte tokens <0x00>..<0xFF>, pieces whose
    score is their merge order, merges of every pair of pieces by the result's score (see
    reference_merges). prefix: Llama 2/Phi-3 (a prefix space, and a decoder that strips it);
    otherwise Gemma."""
    trainer_tok = HFTokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    trainer_tok.train_from_iterator([TRAINING], trainers.BpeTrainer(vocab_size=500, show_progress=False))
    learned = sorted(trainer_tok.get_vocab().items(), key=lambda kv: kv[1])
    if prefix:
        control, user = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"], ["<think>", "</think>"]
    else:
        control, user = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], ["<think>", "</think>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    pieces = [p for p, _ in learned if p not in byte_pieces]
    tokens = control + byte_pieces + user + pieces
    types = ([TokenType.UNKNOWN if t == "<unk>" else TokenType.CONTROL for t in control] + [TokenType.BYTE] * 256
             + [TokenType.USER_DEFINED] * len(user) + [TokenType.NORMAL] * len(pieces))
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = [t for t, ty in zip(tokens, types) if ty == TokenType.NORMAL]
    tok = HFTokenizer(models.BPE(vocab, reference_merges(normal, vocab), unk_token="<unk>", fuse_unk=True,
                                 byte_fallback=True))
    replace = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    # Phi-3 marks its chat tokens rstrip: the whitespace after one is part of it.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    template = PHI3_TEMPLATE if prefix else GEMMA_TEMPLATE
    eos = [vocab["<|end|>"], vocab["</s>"]] if prefix else [vocab["<eos>"], vocab["<end_of_turn>"]]
    bos = vocab["<s>" if prefix else "<bos>"]
    config = {"chat_template": template, "add_bos_token": True, "bos_token": tokens[bos]}
    return tok, {"config": config, "eos": eos, "bos": bos, "template": template, "tokens": tokens,
                 "types": types, "scores": [-float(i) for i in range(len(tokens))], "control": control, "user": user}


def reference_merges(normal: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Straightforwardly: every split of every piece into two pieces, by the piece's rank."""
    merges = []
    normal = set(normal)
    for piece in sorted(normal, key=lambda p: vocab[p]):
        for k in sorted(range(1, len(piece)), key=lambda k: (vocab.get(piece[:k], 0), vocab.get(piece[k:], 0))):
            if piece[:k] in normal and piece[k:] in normal:
                merges.append((piece[:k], piece[k:]))
    return merges




STYLES = ("qwen2", "gemma", "phi3")


def build_style(style: str) -> tuple[HFTokenizer, dict]:
    return qwen2_style() if style == "qwen2" else sentencepiece_style(prefix=style == "phi3")


def save_tokenizer(style: str, directory: Path) -> tuple[HFTokenizer, dict]:
    """tokenizer.json and tokenizer_config.json of the style in directory; returns the
    `tokenizers` tokenizer and its info (eos ids, bos id, ...) for the model's config."""
    tok, info = build_style(style)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(info["config"]))
    return tok, info
