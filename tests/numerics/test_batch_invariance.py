"""Batch invariance: in the batch-invariant mode a row's numbers are bit-identical whatever is
beside it. Checked for each part that could change with the batch (matrix products, attention)
and for whole requests through the engine."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tokenwire_server.engine import EngineRequest, SamplingParams
from tokenwire_server.model.kv_cache import KEY_TILE as TILE
from tokenwire_server.model.kv_cache import tiled_attention
from tokenwire_server.model.linear import Linear, batch_invariant

DTYPES = [torch.float32, torch.bfloat16]
NKV, G, HD = 3, 3, 64  # the default model's attention shape


def padded(x: torch.Tensor, keys: int) -> torch.Tensor:
    """(NKV, n, HD) -> (NKV, keys, HD), repeating the last key as the runner does."""
    return torch.cat([x, x[:, -1:].expand(NKV, keys - x.shape[1], HD)], 1)


def whole_tiles(n: int) -> int:
    return -(-n // TILE) * TILE


def prompt_in_chunks(q, k, v, cuts: list[int]) -> torch.Tensor:
    """Attention of a prompt's queries (L, NKV, G, HD), computed chunk by chunk as the engine does."""
    bounds = [0, *cuts, q.shape[0]]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        S = whole_tiles(b)
        mask = (torch.arange(S)[None] <= torch.arange(a, b)[:, None])[None]
        out.append(tiled_attention(q[a:b].transpose(0, 1), padded(k[:, :b], S), padded(v[:, :b], S), mask,
                                   TILE).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_query_row_does_not_depend_on_chunking_or_on_the_rows_beside_it(dtype):
    rng = random.Random(0)
    torch.manual_seed(0)
    L = 300
    q, k, v = torch.randn(L, NKV, G, HD).to(dtype), torch.randn(NKV, L, HD).to(dtype), torch.randn(NKV, L, HD).to(dtype)
    whole = prompt_in_chunks(q, k, v, [])
    for _ in range(10):
        cuts = sorted(rng.sample(range(1, L), rng.randint(1, 8)))
        assert torch.equal(prompt_in_chunks(q, k, v, cuts), whole), cuts
    for _ in range(10):  # position p as a decode row among others of any length
        p, D = rng.randrange(L), rng.randint(1, 40)
        me = rng.randrange(D)
        lengths = [rng.randint(1, 600) for _ in range(D)]
        lengths[me] = p + 1
        S = whole_tiles(max(lengths))
        rows = [(k[:, :n], v[:, :n], q[p]) if i == me else
                (torch.randn(NKV, n, HD).to(dtype), torch.randn(NKV, n, HD).to(dtype), torch.randn(NKV, G, HD).to(dtype))
                for i, n in enumerate(lengths)]
        keys = torch.stack([padded(r[0], S) for r in rows], 1).reshape(NKV * D, S, HD)
        values = torch.stack([padded(r[1], S) for r in rows], 1).reshape(NKV * D, S, HD)
        queries = torch.stack([r[2] for r in rows], 1).reshape(NKV * D, 1, G, HD)
        mask = (torch.arange(S)[None] < torch.tensor(lengths)[:, None])[None, :, None]
        out = tiled_attention(queries, keys, values, mask.expand(NKV, D, 1, S).reshape(NKV * D, 1, S), TILE)
        assert torch.equal(out.view(NKV, D, G, HD)[:, me], whole[p]), (p, D)


def test_tiled_attention_is_attention():
    torch.manual_seed(1)
    T, L = 37, 150
    q, k, v = torch.randn(T, NKV, G, HD), torch.randn(NKV, L, HD), torch.randn(NKV, L, HD)
    got = prompt_in_chunks(torch.cat([torch.zeros(L - T, NKV, G, HD), q]), k, v, [L - T])[L - T:]
    mask = torch.arange(L)[None] <= torch.arange(L - T, L)[:, None]
    want = F.scaled_dot_product_attention(q.reshape(T, NKV * G, HD).transpose(0, 1)[None], k[None], v[None],
                                          attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(got.reshape(T, NKV * G, HD), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (576, 49152)])  # the model's products
def test_a_linear_row_does_not_depend_on_the_rows_beside_it_or_the_threads(dtype, shape):
    torch.manual_seed(2)
    layer = Linear(*shape, bias=False).to(dtype)
    x = torch.randn(600, shape[0]).to(dtype)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode(), batch_invariant():
            alone = torch.cat([layer(x[i:i + 1]) for i in range(0, 600, 37)])
            for n, t in [(3, 1), (5, threads), (17, 1), (100, threads), (600, threads), (600, 1)]:
                torch.set_num_threads(t)
                batch = layer(x[:n])[::37]
                assert torch.equal(batch, alone[:len(batch)]), (n, t)
    finally:
        torch.set_num_threads(threads)


def run(engine, requests) -> dict[str, list]:
    got = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_work():
        for out in engine.step():
            if out.request_id in got:
                got[out.request_id].append((out.index, out.token_id, out.logprob, tuple(out.token.top)))
    return got


def test_requests_alone_and_in_mixed_traffic_give_the_same_bits(make_engine, engine, tokenizer):
    """Greedy, seeded, penalised, n-sample and constrained requests, alone and then beside
    prompts of other lengths being prefilled in chunks while others decode (some constrained),
    in a cache small enough to preempt."""
    compile_ = engine.constraints.compile
    constraints = {6: compile_("regex", "[a-z ,]{30,60}\\."),
                   7: compile_("json_schema", '{"type": "object", "properties": {"city": {"type": "string"}, '
                                              '"people": {"type": "integer"}}, "required": ["city", "people"]}')}

    def params(i):
        if i < 3:
            return SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, top_n=3)
        return SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_new_tokens=40 if i in constraints else 12,
                              ignore_eos=True, top_n=3, presence_penalty=0.5 if i == 5 else 0.0,
                              constraint=constraints.get(i))
    texts = ["The sea is", "Paris is a city", "Prime numbers are", "The moon", "Music makes", "Bread is baked",
             "Some words", "A city as JSON:"]
    subjects = [EngineRequest(f"s{i}", tuple(tokenizer.encode(t)), params(i), n=2 if i in (4, 7) else 1)
                for i, t in enumerate(texts)]
    others = [EngineRequest(f"o{i}", tuple(tokenizer.encode(f"Story {i}: once upon a time " * (1 + 12 * i))),
                            SamplingParams(temperature=1.0, seed=i, max_new_tokens=8 + 6 * i, ignore_eos=True,
                                           constraint=compile_("json_object", True) if i == 1 else None))
              for i in range(5)]
    alone = {}
    for r in subjects:
        alone |= run(make_engine(kv_cache_tokens=1024, batch_invariant=True), [r])
    mixed_engine = make_engine(kv_cache_tokens=640, max_batched_tokens=96, batch_invariant=True)
    mixed = run(mixed_engine, others[:3] + subjects + others[3:])
    assert mixed_engine.num_preemptions > 0
    for r in subjects:
        assert mixed[r.request_id] == alone[r.request_id], r.request_id
    for i in constraints:  # and they are what they were asked to be
        assert len(alone[f"s{i}"]) > 8
