"""The paged KV cache gives the logits of recomputing the whole sequence: alone, chunked,
batched with other sequences at other positions, and after prefix-cache hits."""

import pytest
import torch

from tokenwire_server.engine import SamplingParams
from tokenwire_server.engine.sequence import Sequence

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


def test_chunked_prefill_matches_recompute(make_engine, tokenizer):
    small_steps = make_engine(kv_cache_tokens=1024, block_size=4, max_batched_tokens=5)
    prompt = tokenizer.encode("A long prompt, prefilled five tokens at a time across several engine steps.")
    steps = list(small_steps.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True,
                                                             top_n=5)))
    check_against_recompute(small_steps, prompt, steps)


def test_batched_sequences_at_different_positions(make_engine, tokenizer):
    eng = make_engine(kv_cache_tokens=2048, block_size=8, max_batched_tokens=64)
    prompts = ["Hello", "A much longer prompt that has quite a few more tokens in it than the others",
               "Numbers: 1, 2, 3,"]
    seqs = [Sequence(tokenizer.encode(p), SamplingParams(temperature=0, max_new_tokens=6 + 3 * i, ignore_eos=True,
                                                         top_n=5)) for i, p in enumerate(prompts)]
    for s in seqs:
        eng.add(s)
    events = {s: [] for s in seqs}
    while eng.has_work():
        for s, event in eng.step():
            events[s].append(event)
    for s in seqs:
        assert len(events[s]) == s.params.max_new_tokens
        check_against_recompute(eng, s.prompt_ids, events[s])


def test_prefix_cache_hit_gives_same_output(make_engine, tokenizer):
    eng = make_engine(kv_cache_tokens=2048, block_size=8)
    system = "You are a careful assistant. Answer in one short sentence. " * 3
    prompt = tokenizer.encode(system + "What is the capital of Italy?")
    params = dict(temperature=0, max_new_tokens=10, ignore_eos=True, top_n=5)
    first = Sequence(prompt, SamplingParams(**params))
    eng.add(first)
    out1 = [e for _ in iter(eng.has_work, False) for s, e in eng.step()]
    second = Sequence(prompt, SamplingParams(**params))
    eng.add(second)
    out2 = [e for _ in iter(eng.has_work, False) for s, e in eng.step()]
    assert first.cached_tokens == 0
    assert second.cached_tokens == (len(prompt) - 1) // 8 * 8 > 0
    assert [e.token_id for e in out2] == [e.token_id for e in out1]
    check_against_recompute(eng, prompt, out2)


def test_fresh_cache_holds_no_nan(make_engine):
    """Decode attention multiplies masked (zero) probabilities with padded slots' values, so
    unused memory must be finite: uninitialised memory once produced NaN logits."""
    eng = make_engine(kv_cache_tokens=512, block_size=16)
    assert all(bool(torch.isfinite(t).all()) for t in eng.runner.cache.k + eng.runner.cache.v)
