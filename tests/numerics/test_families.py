"""Each decoder family against transformers: a tiny random checkpoint made by transformers'
own classes, with the family's structural options (biases, q/k norms, Gemma's norms and
soft-capping, sliding windows, per-layer rotary bases, Phi-3's fused tensors and longrope),
loaded from safetensors and from GGUF by our loaders."""

import pytest
import torch
from tiny_models import FAMILIES, WINDOW, build, write_gguf

from tokenwire_server.engine import EngineRequest, LLMEngine, SamplingParams
from tokenwire_server.engine.llm_engine import EngineConfig
from tokenwire_server.model.loader import load_model

ATOL = RTOL = 1e-4
LENGTH = 5 * WINDOW + 3  # past every sliding window


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family name, transformers' model, its safetensors directory, its GGUF file)."""
    directory = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, directory)
    gguf = directory / "model.gguf"
    write_gguf(request.param, ref, gguf)
    return request.param, ref, directory, gguf


def load(name, path):
    """Our model from path. Phi-3 is served within its original context here, where
    transformers takes the short rotary factors for these short sequences (the long ones
    have a test of their own)."""
    return load_model(path, max_context=64 if name == "phi3" else None)


def ids(n, seed=1):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


def reference_logits(ref, tokens):
    with torch.inference_mode():
        return ref(tokens[None]).logits[0]


def our_logits(model, tokens):
    with torch.inference_mode():
        return model(tokens, torch.arange(len(tokens)))


def test_config_names_the_family(family):
    name, _, directory, gguf = family
    assert load_model(directory).config.architecture == name
    assert load_model(gguf).config.architecture == ("llama" if name == "mistral" else name)


def test_safetensors_logits_match_transformers(family):
    name, ref, directory, _ = family
    tokens = ids(LENGTH)
    torch.testing.assert_close(our_logits(load(name, directory), tokens), reference_logits(ref, tokens),
                               atol=ATOL, rtol=RTOL)


def test_gguf_logits_match_transformers(family):
    name, ref, _, gguf = family
    # llama.cpp's Mistral and Qwen2 files carry no sliding window: compare within it.
    tokens = ids(WINDOW if name in ("mistral", "qwen2") else LENGTH)
    torch.testing.assert_close(our_logits(load(name, gguf), tokens), reference_logits(ref, tokens),
                               atol=ATOL, rtol=RTOL)


@pytest.fixture(scope="module")
def engine_of(tokenizer):
    """An engine over a loaded tiny model (the default model's tokenizer stands in: only ids matter)."""
    def make(model, **config):
        return LLMEngine(model, tokenizer, torch.device("cpu"), torch.float32, "tiny",
                         EngineConfig(kv_cache_tokens=4096, block_size=4, **config))
    return make


def test_greedy_continuation_matches_transformers(family, engine_of):
    name, ref, directory, _ = family
    prompt = ids(12, seed=2)
    seq = prompt.tolist()
    with torch.inference_mode():  # transformers' greedy choice, with the end token allowed as ours is
        for _ in range(32):
            seq.append(int(reference_logits(ref, torch.tensor(seq))[-1].argmax()))
    expected = seq[12:]
    engine = engine_of(load(name, directory))
    got = [o.token_id for o in engine.generate(prompt.tolist(), SamplingParams(temperature=0, max_new_tokens=32,
                                                                            ignore_eos=True))]
    assert got == expected


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_cached_and_batched_decoding_match_whole_sequence(family, engine_of, batch_invariant):
    """Sequences of several lengths decode together from the paged cache, prompts prefilled in
    chunks: every step's logprobs equal the whole sequence's logits computed at once."""
    name, _, directory, _ = family
    model = load(name, directory)
    engine = engine_of(model, max_batched_tokens=7, batch_invariant=batch_invariant)
    requests = [EngineRequest(str(i), tuple(ids(n, seed=10 + i).tolist()), SamplingParams(
        temperature=0, max_new_tokens=12, ignore_eos=True, top_n=3)) for i, n in enumerate((3, 11, 2 * WINDOW + 1))]
    for r in requests:
        engine.add_request(r)
    outputs = {r.request_id: [] for r in requests}
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    for r in requests:
        seq = list(r.prompt_ids) + [o.token_id for o in outputs[r.request_id]]
        logp = torch.log_softmax(our_logits(model, torch.tensor(seq)), -1)
        for i, out in enumerate(outputs[r.request_id]):
            pos = len(r.prompt_ids) + i - 1
            assert out.logprob == pytest.approx(float(logp[pos, out.token_id]), abs=ATOL)
            assert [t for t, _ in out.token.top] == logp[pos].topk(3).indices.tolist()


def test_phi3_long_factors_follow_the_served_context(tmp_path):
    """Served past its original context, Phi-3 rotates with the long factors, as transformers
    does for a sequence that long; served within it, with the short ones."""
    ref = build("phi3", tmp_path)
    long_seq = ids(100)  # past original_max_position_embeddings (64)
    torch.testing.assert_close(our_logits(load_model(tmp_path), long_seq), reference_logits(ref, long_seq),
                               atol=ATOL, rtol=RTOL)
    short_seq = ids(40)
    short_served = load_model(tmp_path, max_context=64)
    torch.testing.assert_close(our_logits(short_served, short_seq), reference_logits(ref, short_seq),
                               atol=ATOL, rtol=RTOL)
    assert not torch.allclose(our_logits(load_model(tmp_path), short_seq), reference_logits(ref, short_seq),
                              atol=10 * ATOL)


def test_gemma_query_pre_attn_scalar(tmp_path):
    """Gemma 2 27B scales queries by a number other than the head size."""
    ref = build("gemma2", tmp_path, query_pre_attn_scalar=24)
    tokens = ids(LENGTH)
    torch.testing.assert_close(our_logits(load_model(tmp_path), tokens), reference_logits(ref, tokens),
                               atol=ATOL, rtol=RTOL)


def test_phi3_partial_rotary(tmp_path):
    """Phi-4-mini's layout: a fraction of each head rotates."""
    ref = build("phi3", tmp_path, rope_scaling=None, partial_rotary_factor=0.5)
    tokens = ids(LENGTH)
    torch.testing.assert_close(our_logits(load_model(tmp_path), tokens), reference_logits(ref, tokens),
                               atol=ATOL, rtol=RTOL)


# Families whose GGUF transformers reads with every option our tiny configs set (it reads no
# Qwen3 head size, no Gemma soft-caps or windows, no Phi-3 longrope).
TRANSFORMERS_READS_GGUF = ("llama", "mistral", "qwen2")


@pytest.mark.parametrize("name", TRANSFORMERS_READS_GGUF)
def test_transformers_reads_our_gguf_alike(tmp_path, name):
    """Where transformers reads a family's GGUF itself, it gives our logits too (a check on the
    files the tests write, beside our loader)."""
    from transformers import AutoModelForCausalLM
    gguf = tmp_path / "model.gguf"
    write_gguf(name, build(name, tmp_path), gguf)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokens = ids(LENGTH)
    torch.testing.assert_close(our_logits(load(name, gguf), tokens), reference_logits(theirs, tokens),
                               atol=ATOL, rtol=RTOL)
