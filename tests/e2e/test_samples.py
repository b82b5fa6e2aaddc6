"""n samples of one prompt: one prefill shared, one stream index per sample, seeds seed + i."""

import grpc
import pytest

from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc
from tokenwire_server.engine import SamplingParams

PROMPT = ("The three most important inventions of the last century were, in no particular order and with "
          "a short reason for each one, written for a curious twelve-year-old reader, the following:")


def sampled(**kw):
    return SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=12, ignore_eos=True, **kw)


def run(engine, ids, params, n=1):
    """Each sample's tokens, and its last output (with seed and usage), by index."""
    tokens, finals = {i: [] for i in range(n)}, {}
    for out in engine.generate(ids, params, n=n):
        tokens[out.index].append(out.token_id)
        if out.finished:
            finals[out.index] = out
    return [tokens[i] for i in range(n)], [finals[i] for i in range(n)]


def test_samples_share_the_prompt_without_prefix_caching(make_engine, tokenizer):
    engine = make_engine(kv_cache_tokens=2048, prefix_caching=False)
    ids = tokenizer.encode(PROMPT)
    assert len(ids) > 2 * 16
    outs, finals = run(engine, ids, sampled(seed=7), n=3)
    shared = (len(ids) - 1) // 16 * 16  # whole blocks before the last prompt token
    assert [f.usage.cached_tokens for f in finals] == [0, shared, shared]
    assert [f.seed for f in finals] == [7, 8, 9]
    assert engine.blocks.num_used == 0  # shared blocks were all given back
    # Each sample equals a request of its own with seed + i.
    for i, out in enumerate(outs):
        assert run(engine, ids, sampled(seed=7 + i))[0][0] == out
    assert len({tuple(o) for o in outs}) > 1


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(served.address) as channel:
        yield pb_grpc.TokenwireStub(channel)


def test_generate_n_streams_every_sample(stub, client):
    req = pb.GenerateRequest(text=PROMPT, n=3, sampling=pb.SamplingParameters(temperature=0.9, seed=123),
                             stopping=pb.StoppingCriteria(max_new_tokens=10, ignore_eos=True))
    events = list(stub.Generate(req, timeout=60))
    assert events[0].WhichOneof("event") == "input" and events[0].input.seed == 123
    assert sum(e.WhichOneof("event") == "input" for e in events) == 1
    texts, finals = {0: "", 1: "", 2: ""}, {}
    for e in events[1:]:
        if e.WhichOneof("event") == "delta":
            assert e.delta.index not in finals  # nothing after a sample's Final
            texts[e.delta.index] += e.delta.text
        else:
            finals[e.final.index] = e.final
    assert sorted(finals) == [0, 1, 2] and events[-1].WhichOneof("event") == "final"
    assert all(f.usage.completion_tokens == 10 for f in finals.values())
    assert all(finals[i].usage.cached_tokens >= 16 for i in (1, 2))  # the shared prompt
    for i in range(3):  # each sample replays alone with seed + i
        alone = client.generate(PROMPT, temperature=0.9, seed=123 + i, max_new_tokens=10, ignore_eos=True)
        assert alone.text == texts[i]


def test_n_above_the_limit_is_rejected(stub, client):
    limit = client.info().limits.max_samples
    assert limit == 16
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(text="Hi", n=limit + 1), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("n:")


def test_client_collects_every_sample(client):
    kw = dict(temperature=0.9, seed=77, max_new_tokens=8, ignore_eos=True)
    samples = client.generate_samples(PROMPT, n=2, **kw)
    assert [s.seed for s in samples] == [77, 77]  # the request's seed; sample i used seed + i
    for i, s in enumerate(samples):
        assert s.usage.completion_tokens == 8 and s.finish_reason == "length"
        assert s.text == client.generate(PROMPT, **{**kw, "seed": 77 + i}).text


def test_sample_seeds_wrap_within_the_valid_range(make_engine, tokenizer):
    engine = make_engine(kv_cache_tokens=1024)
    outs, finals = run(engine, tokenizer.encode("Hi"), sampled(seed=2**63 - 1), n=2)
    assert [f.seed for f in finals] == [2**63 - 1, 0]  # both are accepted and generate
    assert all(len(o) == 12 for o in outs)


def test_tokens_between_matches_slicing_the_whole_sequence():
    from tokenwire_server.engine.sequence import Sequence

    seq = Sequence([1, 2, 3, 4], sampled())
    seq.output_ids += [5, 6, 7]
    for start in range(8):
        for end in range(start, 8):
            assert seq.tokens_between(start, end) == seq.tokens[start:end]
