"""The paged KV cache gives the logits of recomputing the whole sequence: alone, chunked,
batched with other sequences at other positions, after prefix-cache hits, and whatever the
slots it does not use hold."""

import math

import pytest
import torch

from tokenwire_server.engine import EngineRequest, SamplingParams

ATOL = 1e-4


def check_against_recompute(engine, prompt, steps, top_n=5):
    """Every generated token's logprob and top-N equal a whole-sequence recompute's."""
    seq = list(prompt)
    for step in steps:
        logp = torch.log_softmax(engine.runner.logits(seq)[-1], -1)
        assert step.logprob == pytest.approx(float(logp[step.token_id]), abs=ATOL)
        top = logp.topk(top_n)
        assert [i for i, _ in step.token.top] == top.indices.tolist()
        assert [lp for _, lp in step.token.top] == pytest.approx(top.values.tolist(), abs=ATOL)
        seq.append(step.token_id)


def test_cached_decode_matches_recompute(engine, tokenizer):
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. Then")
    steps = list(engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, top_n=5)))
    check_against_recompute(engine, prompt, steps)


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_chunked_prefill_matches_recompute(make_engine, tokenizer, batch_invariant):
    small_steps = make_engine(kv_cache_tokens=1024, block_size=4, max_batched_tokens=5, batch_invariant=batch_invariant)
    prompt = tokenizer.encode("A long prompt, prefilled five tokens at a time across several engine steps.")
    steps = list(small_steps.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True,
                                                             top_n=5)))
    check_against_recompute(small_steps, prompt, steps)


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_batched_sequences_at_different_positions(make_engine, tokenizer, batch_invariant):
    eng = make_engine(kv_cache_tokens=2048, block_size=8, max_batched_tokens=64, batch_invariant=batch_invariant)
    prompts = ["Hello", "A much longer prompt that has quite a few more tokens in it than the others",
               "Numbers: 1, 2, 3,"]
    requests = [EngineRequest(str(i), tuple(tokenizer.encode(p)), SamplingParams(
        temperature=0, max_new_tokens=6 + 3 * i, ignore_eos=True, top_n=5)) for i, p in enumerate(prompts)]
    for r in requests:
        eng.add_request(r)
    outputs = {r.request_id: [] for r in requests}
    while eng.has_work():
        for out in eng.step():
            outputs[out.request_id].append(out)
    for r in requests:
        assert len(outputs[r.request_id]) == r.params.max_new_tokens
        check_against_recompute(eng, r.prompt_ids, outputs[r.request_id])


def test_prefix_cache_hit_gives_same_output(make_engine, tokenizer):
    eng = make_engine(kv_cache_tokens=2048, block_size=8)
    system = "You are a careful assistant. Answer in one short sentence. " * 3
    prompt = tokenizer.encode(system + "What is the capital of Italy?")
    params = dict(temperature=0, max_new_tokens=10, ignore_eos=True, top_n=5)
    out1 = list(eng.generate(prompt, SamplingParams(**params)))
    out2 = list(eng.generate(prompt, SamplingParams(**params)))
    assert out1[-1].usage.cached_tokens == 0
    assert out2[-1].usage.cached_tokens == (len(prompt) - 1) // 8 * 8 > 0
    assert [e.token_id for e in out2] == [e.token_id for e in out1]
    check_against_recompute(eng, prompt, out2)


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_padded_decode_ignores_garbage_in_unused_slots(make_engine, tokenizer, batch_invariant):
    """Decode rows of different lengths read as many slots as the longest: the padded ones are
    the unwritten tail of a row's last block and block 0 standing in for missing blocks. They
    hold whatever the memory held (torch.empty, an evicted prefix), so fill every slot of every
    layer with NaN first: outputs must stay finite and equal a whole-sequence recompute."""
    eng = make_engine(kv_cache_tokens=512, block_size=16, max_batched_tokens=256, batch_invariant=batch_invariant)
    for t in eng.runner.cache.k + eng.runner.cache.v:
        t.fill_(float("nan"))
    prompts = ["Hi", "Numbers: 1, 2, 3,",
               "A longer prompt that spans several blocks of sixteen tokens, so that the others are padded to it."]
    requests = [EngineRequest(f"pad{i}", tuple(tokenizer.encode(p)), SamplingParams(
        temperature=0, max_new_tokens=4, ignore_eos=True, top_n=5)) for i, p in enumerate(prompts)]
    assert len({len(r.prompt_ids) for r in requests}) == 3
    for r in requests:
        eng.add_request(r)
    outputs = {r.request_id: [] for r in requests}
    while eng.has_work():
        step = eng.step()
        assert len(step) == len(requests)  # all prefilled in one step, then decoded together
        for out in step:
            outputs[out.request_id].append(out)
    for r in requests:
        outs = outputs[r.request_id]
        assert all(math.isfinite(o.logprob) and all(math.isfinite(lp) for _, lp in o.token.top) for o in outs)
        check_against_recompute(eng, r.prompt_ids, outs)
