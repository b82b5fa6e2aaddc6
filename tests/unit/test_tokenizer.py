"""Tokenizer parity with transformers, round trips, special tokens, detokenizing, chat templates."""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from tokenwire_server.errors import InvalidArgument
from tokenwire_server.tokenizer import named_encoding

CORPUS = [
    "Hello world, how are you today?",
    "def add(a, b):\n    return a + b  # sum\n\nclass Foo:\n\tpass\n",
    "Prices: $1,234.56 and 7890 items; 3.14159 is pi; 2026-11-23T10:00Z",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\n\n\nnew lines \n  mixed \r\n end",
    "Emoji: 🎉🚀👍🏽 👨‍👩‍👧‍👦 ❤️",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "Привет, мир! Ελληνικά. עברית. العربية. हिन्दी. ไทย.",
    "Ünïcödé café naïve résumé — “quotes” ‘single’ …",
    "<|im_start|>user\nnot really special<|im_end|> <|endoftext|>",
    "don't they're I'll we've she'd it's",
    "URL https://example.com/path?q=1&r=2#frag and email a.b@c.de",
    "",
]


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_transformers(tokenizer, hf_tokenizer, text):
    # transformers parses special-token text in input by default; ours does not: compare with
    # that option on.
    expected = hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.encode(text) == expected


@pytest.mark.parametrize("text", CORPUS + ["a  1", "x \n\n42  7", "\x00\x01 binary \xff"])
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def smollm_reference(model_path):
    """SmolLM2's own tokenizer.json pre-tokenizer (digits split off first, then GPT-2's byte-level
    regex) over the GGUF's vocabulary, built with the `tokenizers` library."""
    from gguf import GGUFReader

    reader = GGUFReader(model_path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def test_whitespace_before_digits_follows_smollm_pretokenizer(tokenizer, model_path):
    """transformers' GGUF reader maps `smollm` to plain GPT-2 splitting, which differs only on
    whitespace runs right before a digit; the model's own tokenizer.json (and llama.cpp) split
    digits first. We follow the model's own."""
    reference = smollm_reference(model_path)
    for text in CORPUS + ["a  1", "x \n\n42  7", "1 2 3\n\n4", "  9", "item\t\t3"]:
        assert tokenizer.encode(text) == reference.encode(text).ids, text


def test_special_token_text_stays_text_unless_allowed(tokenizer):
    text = "<|im_start|>"
    assert tokenizer.encode(text) != [1]
    assert 1 not in tokenizer.encode(text)
    assert tokenizer.encode(text, allow_special=True) == [1]


def test_named_encoding_counts_for_other_models():
    enc = named_encoding("cl100k_base")
    ids = enc.encode("tokenwire counts tokens for other models")
    assert 0 < len(ids) < 12 and enc.decode(ids) == "tokenwire counts tokens for other models"
    with pytest.raises(InvalidArgument) as e:
        named_encoding("no_such_encoding")
    assert e.value.field == "encoding"


@pytest.mark.parametrize("text", ["🎉🚀 ok", "中文测试 饕餮", "naïve 👨‍👩‍👧"])
def test_incremental_detokenizer_never_emits_half_characters(tokenizer, text):
    ids = tokenizer.encode(text)

    def whole(b):
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(whole(tokenizer.token_bytes(i)) for i in ids)  # some token splits a character
    detok = tokenizer.detokenizer()
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_chat_template_matches_transformers(tokenizer, hf_tokenizer):
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    ]
    for messages in conversations:
        for add in (True, False):
            assert tokenizer.apply_chat_template(messages, add_generation_prompt=add) == \
                hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)


def test_chat_template_rejects_unknown_roles_and_empty(tokenizer):
    with pytest.raises(InvalidArgument) as e:
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}])
    assert e.value.field == "messages[1].role"
    with pytest.raises(InvalidArgument) as e:
        tokenizer.apply_chat_template([])
    assert e.value.field == "messages"


def test_chat_template_is_sandboxed():
    from jinja2.exceptions import SecurityError

    from tokenwire_server.tokenizer.chat_template import ChatTemplate

    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises((SecurityError, InvalidArgument)):
        evil.render([{"role": "user", "content": "x"}])
