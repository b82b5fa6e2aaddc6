"""Both tokenizer backends against the `tokenizers` library, offline: small vocabularies trained
here in each family's style (Qwen2's byte-level BPE with its regex and NFC; SentencePiece BPE
with byte fallback, Gemma's without and Llama 2/Phi-3's with the prefix space), loaded through
tokenizer.json and through a GGUF holding the same vocabulary."""

from __future__ import annotations

import json
import pickle
import time
import unicodedata

import llguidance
import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter, TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tiny_tokenizers import QWEN_TEMPLATE, qwen2_style, sentencepiece_style

from tokenwire_server.errors import CheckpointError
from tokenwire_server.tokenizer import Tokenizer
from tokenwire_server.tokenizer.bpe import QWEN2_PATTERN
from tokenwire_server.tokenizer.sentencepiece import sentencepiece_merges

CORPUS = [
    "Hello world, how are you today?",
    "def add(a, b):\n    return a + b  # sum\n\nclass Foo:\n\tpass\n",
    "Prices: $1,234.56 and 7890 items; 3.14159 is pi; 2026-11-23T10:00Z",
    "   leading spaces, trailing spaces   ",
    " one leading",
    "multiple   inner    spaces",
    "tabs\t\tand\n\n\nnew lines \n  mixed \r\n end\n",
    "\n\nstarts with new lines",
    "Emoji: 🎉🚀👍🏽 👨‍👩‍👧‍👦 ❤️",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "مرحبا بالعالم، العربية جميلة. שלום עולם, עברית יפה.",
    "Ünïcödé café naïve résumé — “quotes” ‘single’ …",
    "decomposed: cafe\u0301 n\u0303 A\u030a, Hangul \u1100\u1161\u11a8",
    "<|im_start|>user\nnot really special<|im_end|> <|endoftext|>",
    "<start_of_turn>user\nhi<end_of_turn> <bos> <|user|>x<|end|>",
    "a <think>reasoning</think> b",
    "don't they're I'll we've she'd it's",
    "x",
    " ",
    "",
]

def write_hf_dir(directory, tok: HFTokenizer, info: dict):
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(info["config"]))
    (directory / "config.json").write_text(json.dumps(
        {"eos_token_id": info["eos"], **({"bos_token_id": info["bos"]} if info["bos"] is not None else {})}))
    return directory


def write_gguf(path, architecture: str, model: str, tokens, types, *, scores=None, merges=None, pre=None,
               bos=None, eos=None, eot=None, add_bos=None, add_space_prefix=None, template=None):
    w = GGUFWriter(str(path), architecture)
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for value, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (eot, w.add_eot_token_id),
                       (add_bos, w.add_add_bos_token), (add_space_prefix, w.add_add_space_prefix),
                       (template, w.add_chat_template)):
        if value is not None:
            add(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- the three styles, each through tokenizer.json and GGUF ----

@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    # Qwen2: byte-level, tiktoken backend.
    tok, info = qwen2_style()
    out["qwen2-json"] = (tok, Tokenizer.from_hf_dir(write_hf_dir(root / "qwen2", tok, info)), info)
    spec = json.loads(tok.to_str())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [TokenType.CONTROL if t in info["control"] else TokenType.USER_DEFINED if t in info["user"]
             else TokenType.NORMAL for t in tokens]
    # llama.cpp writes a byte-level vocabulary's added tokens as their text.
    path = write_gguf(root / "qwen2.gguf", "qwen2", "gpt2", tokens, types, pre="qwen2",
                      merges=[" ".join(m) for m in spec["model"]["merges"]], eos=info["eos"][1], eot=info["eos"][0],
                      template=QWEN_TEMPLATE)
    out["qwen2-gguf"] = (tok, Tokenizer.from_gguf(GGUFReader(path), path), info)
    for name, prefix, arch in (("gemma", False, "gemma3"), ("phi3", True, "phi3")):
        tok, info = sentencepiece_style(prefix)
        out[f"{name}-json"] = (tok, Tokenizer.from_hf_dir(write_hf_dir(root / name, tok, info)), info)
        # Gemma's scores say nothing of its merge order (its token order does): written as 0.
        scores = [0.0] * len(info["tokens"]) if name == "gemma" else info["scores"]
        path = write_gguf(root / f"{name}.gguf", arch, "llama", info["tokens"], info["types"], scores=scores,
                          bos=info["bos"], eos=info["eos"][1] if prefix else info["eos"][0],
                          eot=info["eos"][0] if prefix else info["eos"][1], add_bos=True,
                          add_space_prefix=prefix, template=info["template"])
        out[f"{name}-gguf"] = (tok, Tokenizer.from_gguf(GGUFReader(path), path), info)
    return out


STYLES = ["qwen2-json", "qwen2-gguf", "gemma-json", "gemma-gguf", "phi3-json", "phi3-gguf"]


def reference_ids(hf: HFTokenizer, text: str, allow_special: bool = False) -> list[int]:
    hf.encode_special_tokens = not allow_special
    try:
        return hf.encode(text, add_special_tokens=False).ids
    finally:
        hf.encode_special_tokens = False


def test_qwen2_pre_tokenizer_splits_single_digits(tmp_path):
    """GGUF "qwen2": Llama 3's regex but one digit at a time. (A Qwen vocabulary has no digit
    merges to show it; this one has "12".)"""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    hf = HFTokenizer(models.BPE({c: i for i, c in enumerate(alphabet + ["12"])}, [("1", "2")]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    path = write_gguf(tmp_path / "digits.gguf", "qwen2", "gpt2", alphabet + ["12"], [1] * 257, merges=["1 2"],
                      pre="qwen2")
    tok = Tokenizer.from_gguf(GGUFReader(path), path)
    for text in ("12", "a 123 x12", "4512"):
        assert tok.encode(text) == hf.encode(text).ids
    assert len(tok.encode("12")) == 2


def test_backends_are_chosen_by_the_vocabulary(families):
    assert type(families["qwen2-json"][1].backend).__name__ == "TiktokenBackend"
    assert type(families["qwen2-gguf"][1].backend).__name__ == "TiktokenBackend"
    for name in ("gemma-json", "gemma-gguf", "phi3-json", "phi3-gguf"):
        assert type(families[name][1].backend).__name__ == "SentencePieceBackend"


def expected(style: str, text: str) -> str:
    """What decoding gives back: the text, NFC-normalized for Qwen2's normalizer."""
    return unicodedata.normalize("NFC", text) if style.startswith("qwen2") else text


@pytest.mark.parametrize("style", STYLES)
def test_ids_equal_tokenizers_and_round_trip(families, style):
    hf, tok, _ = families[style]
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference_ids(hf, text), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), text
        if not (tok.backend.dummy_prefix and "<think>" in text):  # (see below)
            assert tok.decode(ids) == expected(style, text), text


def test_prefix_space_after_an_added_token(families):
    """Llama 2 style: every run of text gets the prefix space, also one after an added token
    (`tokenizers` with the Prepend normalizer, and llama.cpp, alike), so that text does not
    come back unchanged: the reference's behaviour, kept."""
    hf, tok, _ = families["phi3-gguf"]
    ids = tok.encode("a<think>b", add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids) == "a<think> b"


@pytest.mark.parametrize("style", STYLES)
def test_bos_and_round_trip(families, style):
    _, tok, info = families[style]
    bos = [info["bos"]] if info["bos"] is not None else []
    assert tok.add_bos == bool(bos)
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids[:len(bos)] == bos and ids[len(bos):] == tok.encode(text, add_special_tokens=False)
        if not (tok.backend.dummy_prefix and "<think>" in text):
            # After BOS too, the prefix space is dropped (tokenizers would give "<s> Hello").
            assert tok.decode(ids) == (info["tokens"][bos[0]] if bos else "") + expected(style, text), text


@pytest.mark.parametrize("style", STYLES)
def test_special_token_text_stays_text_unless_allowed(families, style):
    hf, tok, info = families[style]
    for name in info["control"]:
        if name == "<unk>":
            continue
        sid = hf.token_to_id(name)
        text = f"a{name}b"
        assert sid not in tok.encode(text, add_special_tokens=False), name
        assert sid in tok.encode(text, add_special_tokens=False, allow_special=True), name
        assert tok.encode(text, add_special_tokens=False, allow_special=True) == reference_ids(hf, text, True)
        assert sid in tok.special_ids
    for name in info["user"]:  # added tokens not marked special are matched in any text
        uid = hf.token_to_id(name)
        assert uid in tok.encode(f"x {name} y") and uid not in tok.special_ids


@pytest.mark.parametrize("style", STYLES)
def test_spans_map_tokens_to_their_text(families, style):
    _, tok, _ = families[style]
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        spans = tok.spans(text, ids)
        utf8 = text.encode("utf-8")
        assert len(spans) == len(ids) and (not spans or spans[-1][1] == len(utf8))
        if text != expected(style, text):
            continue  # normalized: see test_spans_across_nfc_cover_the_original
        assert [s[1] for s in spans[:-1]] == [s[0] for s in spans[1:]], text  # each token's own bytes, in order
        for k, (t, (bs, be, cs, ce)) in enumerate(zip(ids, spans)):
            assert len(text[:cs].encode()) <= bs <= be <= len(text[:ce].encode()), (text, k)
            piece = tok.token_bytes(t)
            # A SentencePiece token can carry the prefix space, which is not in the text.
            assert utf8[bs:be] == piece or (tok.backend.dummy_prefix and b" " + utf8[bs:be] == piece), (text, k)


def test_spans_across_nfc_cover_the_original(families):
    _, tok, _ = families["qwen2-json"]
    text = "cafe\u0301 ok A\u030a"
    ids = tok.encode(text, add_special_tokens=False)
    spans = tok.spans(text, ids)
    utf8 = text.encode()
    assert spans[0][:3:2] == (0, 0) and spans[-1][1] == len(utf8) and spans[-1][3] == len(text)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(spans, spans[1:]))
    for t, (bs, be, cs, ce) in zip(ids, spans):
        piece = tok.token_bytes(t)
        if text[cs:ce] == unicodedata.normalize("NFC", text[cs:ce]):
            assert utf8[bs:be] == piece  # outside what normalizing changed: exact
        else:  # inside: the whole of the original it came from
            assert piece in unicodedata.normalize("NFC", text[cs:ce]).encode()
    assert b"".join(utf8[bs:be] for bs, be, cs, ce in spans if 5 <= cs and ce <= 8) == b" ok"


@pytest.mark.parametrize("style", STYLES)
def test_incremental_detokenizer_joins_to_decode(families, style):
    _, tok, _ = families[style]
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        detok = tok.detokenizer()
        streamed = "".join([detok.push(t) for t in ids] + [detok.flush()])
        # A generated continuation keeps the prefix space: " world" after "Hello,".
        assert streamed == (" " if tok.backend.dummy_prefix and text else "") + tok.decode(ids)


def test_continuation_keeps_the_space_between_prompt_and_first_word(families):
    hf, tok, _ = families["phi3-json"]
    prompt = tok.encode("Hello,")
    whole = tok.encode("Hello, world")
    generated = whole[len(prompt):]
    assert whole[:len(prompt)] == prompt
    detok = tok.detokenizer()
    assert "".join(detok.push(t) for t in generated) + detok.flush() == " world"
    assert tok.decode(whole) == "<s>Hello, world" and hf.decode(whole[1:]) == "Hello, world"


@pytest.mark.parametrize("style", STYLES)
def test_end_tokens_from_the_checkpoint(families, style):
    _, tok, info = families[style]
    assert set(tok.eos_ids) == set(info["eos"])


@pytest.mark.parametrize("style", STYLES)
def test_chat_template_renders_and_content_stays_text(families, style):
    hf, tok, info = families[style]
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
    rendered = tok.apply_chat_template(messages)
    assert "Hi there" in rendered and rendered.count("Bye") == 1
    ids = tok.encode_chat(messages)
    # Clean content: the ids of the whole rendering with its markup's special tokens, and one
    # BOS (Gemma's template writes it).
    reference = reference_ids(hf, rendered, allow_special=True)
    assert ids == (tok.prefix_ids() if reference[:1] != [info["bos"]] else []) + reference
    assert ids.count(info["bos"]) == (1 if info["bos"] is not None else 0)
    if not style.startswith("phi3"):  # (Llama 2 style adds a prefix space after each special token)
        assert tok.decode(ids) == rendered
    # Content spelling a control token stays text, here as everywhere.
    for name in info["control"]:
        if name == "<unk>":
            continue
        attack = [{"role": "user", "content": f"x{name}\nsystem"}]
        clean = [{"role": "user", "content": "x\nsystem"}]
        specials = [t for t in tok.encode_chat(attack) if t in tok.special_ids]
        assert specials == [t for t in tok.encode_chat(clean) if t in tok.special_ids], name


def test_chat_with_rstrip_special_tokens(tmp_path):
    """Phi-3 marks its chat tokens rstrip: `tokenizers` takes the whitespace after one into it.
    encode_chat's runs between special tokens do the same."""
    hf, info = sentencepiece_style(True)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=True)
                           for t in ("<|user|>", "<|assistant|>", "<|end|>")])
    tok = Tokenizer.from_hf_dir(write_hf_dir(tmp_path / "rstrip", hf, info))
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello. "}]
    rendered = tok.apply_chat_template(messages)
    reference = reference_ids(hf, rendered, allow_special=True)
    assert tok.encode_chat(messages) == tok.prefix_ids() + reference
    assert "\n" not in hf.decode(reference, skip_special_tokens=False)  # the new lines went into the tokens


def test_chat_after_a_first_only_prefix_space(tmp_path):
    """Metaspace with prepend_scheme "first" (newer Llama 2/Mistral tokenizer.json): text after a
    special token gets no prefix space, in encode_chat as in the whole rendering."""
    hf, info = sentencepiece_style(True)
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tok = Tokenizer.from_hf_dir(write_hf_dir(tmp_path / "first", hf, info))
    messages = [{"role": "user", "content": "Hi there"}]
    rendered = tok.apply_chat_template(messages)
    assert tok.encode_chat(messages) == tok.prefix_ids() + reference_ids(hf, rendered, allow_special=True)
    assert tok.decode(tok.encode_chat(messages)) == "<s>" + rendered  # no prefix space after a special token
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference_ids(hf, text) and tok.decode(ids) == hf.decode(ids), text
        # Metaspace adds no prefix space to text that starts with one, yet the decoder strips one.
        assert tok.decode(ids) == (text[1:] if text.startswith(" ") else text)


def allowed(matcher, n_vocab: int) -> set[int]:
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")[:n_vocab]
    return set(np.flatnonzero(bits).tolist())


@pytest.mark.parametrize("style", ["gemma-json", "phi3-gguf", "qwen2-json"])
def test_structured_output_masks(families, style):
    """llguidance's tokenizer from ours: a regex's masks allow exactly the tokens that continue it."""
    _, tok, _ = families[style]
    n_vocab = tok.vocab_size + 5  # a model's vocabulary can be padded past the tokenizer's
    lltok = tok.lltokenizer(n_vocab)
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_regex("ab+"), log_level=0)
    assert not matcher.is_error()
    matches = "a" + "b" * 40
    first = allowed(matcher, n_vocab)
    # Every token whose text begins a match, but byte tokens that spell a character a token
    # holds (llguidance leaves those out), and nothing else.
    want = {t for t in range(tok.vocab_size) if t not in tok.special_ids
            and (piece := tok.token_bytes(t)) and matches.encode().startswith(piece)}
    byte_token = getattr(tok.backend, "_is_byte", None) or [False] * tok.vocab_size
    a = next(t for t in want if tok.token_bytes(t) == b"a" and not byte_token[t])
    assert a in first and first <= want and all(tok.token_bytes(t) == b"a" for t in want - first)
    assert matcher.consume_token(a)
    then = allowed(matcher, n_vocab)
    assert then and all(set(tok.token_bytes(t).decode()) == {"b"} for t in then)
    assert not set(tok.eos_ids) & then  # not complete yet
    b = next(t for t in then if tok.token_bytes(t) == b"b")
    assert matcher.consume_token(b)
    assert set(tok.eos_ids) <= allowed(matcher, n_vocab)  # complete: the model's end tokens end it


@pytest.mark.parametrize("style", ["gemma-gguf", "phi3-json", "qwen2-json"])
def test_tokenizer_pickles(families, style):
    _, tok, _ = families[style]
    copy = pickle.loads(pickle.dumps(tok))
    for text in CORPUS:
        assert copy.encode(text) == tok.encode(text)
        assert copy.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    assert copy.special_ids == tok.special_ids


def test_unsupported_tokenizers_are_named(tmp_path):
    d = tmp_path / "unigram"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(CheckpointError, match="'Unigram'.*supported: BPE"):
        Tokenizer.from_hf_dir(d)
    path = write_gguf(tmp_path / "t5.gguf", "t5", "t5", ["<pad>", "a"], [3, 1], scores=[0.0, 0.0])
    with pytest.raises(CheckpointError, match="'t5'.*'gpt2'.*'llama'"):
        Tokenizer.from_gguf(GGUFReader(path), path)
    path = write_gguf(tmp_path / "pre.gguf", "llama", "gpt2", ["a", "b"], [1, 1], merges=[], pre="no-such-pre")
    with pytest.raises(CheckpointError, match="'no-such-pre'.*qwen2"):
        Tokenizer.from_gguf(GGUFReader(path), path)
    d = tmp_path / "nfkc"
    tok, info = qwen2_style()
    tok.normalizer = normalizers.NFKC()
    write_hf_dir(d, tok, info)
    with pytest.raises(CheckpointError, match="normalizer.*NFKC"):
        Tokenizer.from_hf_dir(d)


def test_merges_of_a_large_vocabulary_take_seconds():
    """256k pieces (SentencePiece-sized, as Gemma's): building the merges stays in seconds."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ▁éüñ中文"
    pieces, seen = list(letters), set(letters)
    while len(pieces) < 256_000:  # grown by joining pieces, as BPE vocabularies are
        p = pieces[rng.randrange(len(pieces))] + pieces[rng.randrange(min(500, len(pieces)))]
        if p not in seen and len(p) <= 16:
            seen.add(p)
            pieces.append(p)
    start = time.perf_counter()
    merges = sentencepiece_merges(pieces, [-float(i) for i in range(len(pieces))], [True] * len(pieces))
    elapsed = time.perf_counter() - start
    assert len(merges) >= len(pieces) - len(letters)
    assert elapsed < 20, elapsed


def test_tokenize_rpc_spans_come_from_the_tokenizer(families):
    """The Tokenize RPC's spans with a prefix space: the first token covers "Hello", not a byte
    more (by concatenated bytes, every span would be one byte off)."""
    from tokenwire_server.api.text_workers import tokenize_result

    _, tok, _ = families["phi3-json"]
    text = "Hello 中"
    ids = tok.encode(text, add_special_tokens=False)
    result = tokenize_result(tok.prefix_ids(), ids, tok.token_bytes, tok.spans, text, None, True)
    spans = [(s.byte_start, s.byte_end, s.char_start, s.char_end) for s in result.tokens]
    assert spans[0] == (0, 0, 0, 0) and result.tokens[0].text == "<s>"  # BOS: an empty span
    assert spans[-1][1] == len(text.encode()) and spans[-1][3] == len(text)
    assert [text.encode()[bs:be] for bs, be, _, _ in spans[1:]] == \
        [tok.token_bytes(t).lstrip(b" ") if k == 0 else tok.token_bytes(t) for k, t in enumerate(ids)]
