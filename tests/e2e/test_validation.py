"""Every validation rule: the right status, the field named, nothing generated."""

import grpc
import pytest

from tokenwire import TokenwireError
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LONG_TEXT = "word " * 9000  # about 9,000 tokens: longer than the 8,192-token context


def expect(call, field, code=INVALID):
    with pytest.raises(TokenwireError) as e:
        call()
    assert e.value.code == code, e.value
    assert e.value.field == field, e.value.field_violations
    assert e.value.field_violations[0][1]  # a description a person can read
    return e.value


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "sampling.temperature"),
    (dict(temperature=float("nan")), "sampling.temperature"),
    (dict(temperature=float("inf")), "sampling.temperature"),
    (dict(top_p=0.0), "sampling.top_p"),
    (dict(top_p=1.01), "sampling.top_p"),
    (dict(top_k=-1), "sampling.top_k"),
    (dict(min_p=-0.01), "sampling.min_p"),
    (dict(min_p=1.5), "sampling.min_p"),
    (dict(seed=2**63), "sampling.seed"),
    (dict(max_new_tokens=0), "stopping.max_new_tokens"),
    (dict(max_new_tokens=4097), "stopping.max_new_tokens"),
    (dict(stop=[f"s{i}" for i in range(17)]), "stopping.stop_sequences"),
    (dict(stop=["ok", ""]), "stopping.stop_sequences[1]"),
    (dict(stop=["x" * 257]), "stopping.stop_sequences[0]"),
    (dict(stop_token_ids=[49152]), "stopping.stop_token_ids[0]"),
    (dict(time_limit=-1.0), "stopping.time_limit_seconds"),
    (dict(top_n=21), "response.top_n"),
    (dict(truncate_input_tokens=0), "truncate_input_tokens"),
    (dict(repetition_penalty=0.0), "sampling.repetition_penalty"),
    (dict(presence_penalty=3.0), "sampling.presence_penalty"),
    (dict(frequency_penalty=-2.5), "sampling.frequency_penalty"),
    (dict(logit_bias={49152: 1.0}), "sampling.logit_bias"),
    (dict(logit_bias={5: -101.0}), "sampling.logit_bias"),
    (dict(min_new_tokens=20, max_new_tokens=10), "stopping.min_new_tokens"),
])
def test_generate_parameters(client, served, kwargs, field):
    before = served.stats.generated_tokens
    expect(lambda: client.generate("Hello", **kwargs), field)
    assert served.stats.generated_tokens == before  # rejected before any work


def test_generate_inputs(client, served):
    expect(lambda: client.generate(""), "text")
    expect(lambda: client.generate(token_ids=[]), "token_ids.ids")
    expect(lambda: client.generate(token_ids=[1, 2, 49152]), "token_ids.ids")
    expect(lambda: client.generate(LONG_TEXT, max_new_tokens=1), "text")
    expect(lambda: client.generate(messages=[{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]),
           "chat.messages[1].role")
    expect(lambda: client.generate(messages=[]), "chat.messages")
    with grpc.insecure_channel(served.address) as channel:  # a request with no input at all
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.TokenwireStub(channel).Generate(pb.GenerateRequest()))
    assert e.value.code() == INVALID and "input" in e.value.details()


def test_long_prompt_is_kept_when_truncation_is_asked(client):
    g = client.generate(LONG_TEXT, truncate_input_tokens=64, max_new_tokens=2, temperature=0)
    assert g.truncated and g.prompt_token_count == 64


def test_tokenize_detokenize_and_score_inputs(client):
    expect(lambda: client.tokenize([]), "texts")
    expect(lambda: client.tokenize(["a"] * 257), "texts")
    expect(lambda: client.tokenize("x", encoding="nope"), "encoding")
    expect(lambda: client.tokenize("x", truncate_input_tokens=0), "truncate_input_tokens")
    expect(lambda: client.detokenize([0, 1, 10**6]), "ids[2]")
    expect(lambda: client.score([]), "items")
    expect(lambda: client.score(["Hello world", "Hi"]), "items[1].text")  # one token: nothing to score
    expect(lambda: client.score([("context", "")]), "items[0].pair.continuation")
    expect(lambda: client.score([("", "continuation")]), "items[0].pair.context")
    expect(lambda: client.score([LONG_TEXT]), "items[0].text")
    expect(lambda: client.score(["Hello world"], top_n=21), "top_n")


def test_server_keeps_serving_after_bad_requests(client):
    for _ in range(3):
        with pytest.raises(TokenwireError):
            client.generate("x", top_p=9.0)
    assert client.generate("Hello", temperature=0, max_new_tokens=2).usage.completion_tokens >= 1
