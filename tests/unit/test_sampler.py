"""The sampler's filters and randomness, the stopping rules and parameter validation."""

import pytest
import torch

from tokenwire_server.engine import FinishReason, SamplingParams
from tokenwire_server.engine.sampler import Sampler
from tokenwire_server.engine.output_processor import SampleState
from tokenwire_server.engine.sequence import Sequence
from tokenwire_server.errors import InvalidArgument
from tokenwire_server.limits import Limits

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def draw(params: SamplingParams, n=4000, logits=LOGITS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = logits.expand(n, -1).clone()
    return Sampler()(batch, [params] * n, [gen] * n)


def test_greedy_is_argmax():
    logits = torch.randn(8, 100)
    assert torch.equal(Sampler()(logits, [SamplingParams(temperature=0)] * 8, [None] * 8), logits.argmax(-1))


def test_temperature_one_follows_the_distribution():
    counts = torch.bincount(draw(SamplingParams(temperature=1.0), n=20000), minlength=4) / 20000
    torch.testing.assert_close(counts, PROBS, atol=0.015, rtol=0)


def test_temperature_sharpens_and_flattens():
    cold = torch.bincount(draw(SamplingParams(temperature=0.25)), minlength=4) / 4000
    hot = torch.bincount(draw(SamplingParams(temperature=4.0)), minlength=4) / 4000
    assert cold[0] > 0.85 and hot[0] < 0.4 and hot[3] > 0.1


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=2), {0, 1}),
    (SamplingParams(top_k=1), {0}),
    (SamplingParams(top_p=0.8), {0, 1}),  # 0.5 + 0.3 reaches 0.8: token 2 is cut
    (SamplingParams(top_p=0.81), {0, 1, 2}),
    (SamplingParams(top_p=0.1), {0}),  # the top token always stays
    (SamplingParams(min_p=0.5), {0, 1}),  # p >= 0.5 * 0.5
    (SamplingParams(min_p=0.2), {0, 1, 2}),
    (SamplingParams(top_k=3, top_p=0.6), {0, 1}),
])
def test_filters_keep_exactly_the_allowed_tokens(params, allowed):
    assert set(draw(params).tolist()) == allowed


def test_seeded_rows_do_not_depend_on_the_batch():
    params = SamplingParams(temperature=1.0, seed=7)
    logits = torch.randn(1, 1000)
    alone = int(Sampler()(logits, [params], [torch.Generator().manual_seed(7)]))
    others = torch.randn(2, 1000)
    batch = torch.cat([others[:1], logits, others[1:]])
    gens = [torch.Generator().manual_seed(s) for s in (1, 7, 3)]
    mixed = Sampler()(batch, [SamplingParams(temperature=0.7), params, SamplingParams(temperature=0)], gens)
    assert int(mixed[1]) == alone
    assert int(mixed[2]) == int(others[1].argmax())


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(seed=-1), "seed"),
    (dict(stop_sequences=["a"] * 17), "stop_sequences"), (dict(stop_sequences=["a", ""]), "stop_sequences[1]"),
    (dict(stop_sequences=["a" * 257]), "stop_sequences[0]"), (dict(time_limit=0.0), "time_limit"),
    (dict(top_n=21), "top_n"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        SamplingParams(**kwargs).validate()
    assert e.value.field == field


def test_server_limit_on_max_new_tokens():
    with pytest.raises(InvalidArgument, match="server limit"):
        SamplingParams(max_new_tokens=5000).validate(Limits(max_new_tokens=4096))


class _Tokens:
    """A tokenizer stand-in: token 2 ends the text, every other token is one letter."""

    eos_ids = (2,)
    special_ids = frozenset({2})

    def detokenizer(self):
        from tokenwire_server.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(lambda i: b"x")


def rules(params: SamplingParams, prompt_len: int = 10, context_len: int = 100) -> SampleState:
    return SampleState(Sequence([1] * prompt_len, params), _Tokens(), context_len)


def test_stopping_rules():
    stop = rules(SamplingParams(max_new_tokens=5, stop_token_ids=[42]))
    assert stop.finish_reason(7, 1, 0.0) is None
    assert stop.finish_reason(2, 1, 0.0) is FinishReason.EOS
    assert stop.finish_reason(42, 1, 0.0) is FinishReason.STOP_TOKEN
    assert stop.finish_reason(7, 5, 0.0) is FinishReason.LENGTH
    assert rules(SamplingParams(ignore_eos=True)).finish_reason(2, 1, 0.0) is None
    assert rules(SamplingParams(max_new_tokens=50), 95).finish_reason(7, 5, 0.0) is FinishReason.CONTEXT_LIMIT
    assert rules(SamplingParams(time_limit=0.5)).finish_reason(7, 1, 0.6) is FinishReason.TIME_LIMIT


def test_stop_token_ids_must_be_in_the_vocabulary():
    with pytest.raises(InvalidArgument) as e:
        SamplingParams(stop_token_ids=[3, 100]).validate(vocab_size=50)
    assert e.value.field == "stop_token_ids[1]"


def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0)]
    out = Sampler._adjust(logits, params, [([0], [1])], None)
    # Seen tokens 0 (prompt) and 1 (output): positive divided, negative multiplied; others unchanged.
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]


def test_presence_and_frequency_penalties_rule():
    logits = torch.zeros(1, 5)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    out = Sampler._adjust(logits, params, [([4, 4], [3, 3, 1])], None)
    # Output tokens only (the prompt's 4 is untouched): -presence - frequency * count.
    assert out.tolist() == [[0.0, -0.75, 0.0, -1.0, 0.0]]


def test_logit_bias_bans_and_favours():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    banned = Sampler()(logits, [SamplingParams(temperature=0, logit_bias={0: -100.0})], [None])
    assert banned.tolist() == [1]
    favoured = Sampler()(logits, [SamplingParams(temperature=0, logit_bias={3: 10.0})], [None])
    assert favoured.tolist() == [3]
    draws = draw(SamplingParams(temperature=1.0, logit_bias={0: -100.0}), n=2000)
    assert 0 not in set(draws.tolist())


def test_banned_tokens_are_never_chosen():
    logits = torch.tensor([[1.0, 9.0, 2.0]])  # token 1 (say, the end token) is the favourite
    assert Sampler()(logits, [SamplingParams(temperature=0)], [None], None, [[1]]).tolist() == [2]


@pytest.mark.parametrize("kwargs, field", [
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"), (dict(logit_bias={5: 101.0}), "logit_bias"),
    (dict(logit_bias={10**6: 1.0}), "logit_bias"), (dict(min_new_tokens=300, max_new_tokens=10), "min_new_tokens"),
])
def test_penalty_validation(kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        SamplingParams(**kwargs).validate(vocab_size=1000)
    assert e.value.field == field
