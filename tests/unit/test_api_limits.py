"""Bounds the API keeps without a server: error text clipped to fit gRPC's metadata limit, tiny
temperatures treated as greedy, a cap on stop_token_ids."""

import pytest

from tokenwire_server.api.errors import MAX_DESCRIPTION_BYTES, clip
from tokenwire_server.engine.sampling_params import MIN_TEMPERATURE, SamplingParams
from tokenwire_server.errors import InvalidArgument
from tokenwire_server.limits import Limits


@pytest.mark.parametrize("text", ["x" * 5000, "é" * 5000, "日本" * 2000, "a" + "😀" * 3000 + " (expected one of: a, b)"])
def test_clip_keeps_both_ends_within_the_byte_budget(text):
    clipped = clip(text, MAX_DESCRIPTION_BYTES)
    assert len(clipped.encode()) <= MAX_DESCRIPTION_BYTES
    assert " ... " in clipped and clipped[:1] == text[:1] and clipped[-1:] == text[-1:]
    assert clip("short", MAX_DESCRIPTION_BYTES) == "short"


def test_temperatures_below_the_floor_are_greedy():
    for t in (0.0, 1e-40, 1e-30, MIN_TEMPERATURE / 2):
        assert SamplingParams(temperature=t).greedy, t
    for t in (MIN_TEMPERATURE, 0.1, 1.0):
        assert not SamplingParams(temperature=t).greedy, t


def test_stop_token_ids_are_counted_against_the_limit():
    limits = Limits()
    SamplingParams(stop_token_ids=[1] * limits.max_stop_token_ids).validate(limits, 100)
    with pytest.raises(InvalidArgument) as e:
        SamplingParams(stop_token_ids=[1] * (limits.max_stop_token_ids + 1)).validate(limits, 100)
    assert e.value.field == "stop_token_ids"
