"""Request ids in metadata and the one log line per request, over real TCP."""

from __future__ import annotations

import json
import logging
import re

import grpc
import pytest

from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc
from tokenwire_server.logs import JsonFormatter, TextFormatter

SECRET = "The secret word is pelican"
HEX32 = re.compile(r"[0-9a-f]{32}")


def generate_request(text: str = SECRET, **stopping) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParameters(temperature=0),
                              stopping=pb.StoppingCriteria(**{"max_new_tokens": 5, "ignore_eos": True, **stopping}))


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(served.address) as channel:
        yield pb_grpc.TokenwireStub(channel)


@pytest.fixture
def request_log(caplog):
    caplog.set_level(logging.INFO, logger="tokenwire.requests")

    def lines(request_id: str | None = None) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "tokenwire.requests"
                and (request_id is None or r.fields["request_id"] == request_id)]
    return lines


def test_the_id_a_client_sends_comes_back(stub):
    _, call = stub.Tokenize.with_call(pb.TokenizeRequest(texts=["hi"]), metadata=[("x-request-id", "abc-123")],
                                      timeout=30)
    assert dict(call.initial_metadata())["x-request-id"] == "abc-123"
    assert dict(call.trailing_metadata())["x-request-id"] == "abc-123"
    stream = stub.Generate(generate_request(), metadata=[("x-request-id", "gen-7")], timeout=60)
    assert dict(stream.initial_metadata())["x-request-id"] == "gen-7"  # with the first message
    assert len(list(stream)) == 1 + 5 + 1  # input info, five deltas, final
    assert dict(stream.trailing_metadata())["x-request-id"] == "gen-7"


def test_an_id_is_made_when_none_or_an_unusable_one_is_sent(stub):
    _, call = stub.ModelInfo.with_call(pb.ModelInfoRequest(), timeout=30)
    made = dict(call.initial_metadata())["x-request-id"]
    assert HEX32.fullmatch(made)
    _, again = stub.ModelInfo.with_call(pb.ModelInfoRequest(), timeout=30)
    assert dict(again.initial_metadata())["x-request-id"] != made
    _, call = stub.ModelInfo.with_call(pb.ModelInfoRequest(), metadata=[("x-request-id", "has a space")],
                                       timeout=30)
    assert HEX32.fullmatch(dict(call.initial_metadata())["x-request-id"])


def test_failures_carry_the_id(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Detokenize(pb.DetokenizeRequest(ids=[10**8]), metadata=[("x-request-id", "bad-ids")], timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(e.value.trailing_metadata())["x-request-id"] == "bad-ids"
    bad = pb.GenerateRequest(text="x", sampling=pb.SamplingParameters(top_p=1.5))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(bad, metadata=[("x-request-id", "bad-top-p")], timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(e.value.trailing_metadata())["x-request-id"] == "bad-top-p"
    # No response headers before the outcome is known: a failure stays retryable (Trailers-Only).
    assert not e.value.initial_metadata()


def test_one_line_per_request_with_its_numbers_and_no_prompt(stub, served, request_log):
    final = list(stub.Generate(generate_request(), metadata=[("x-request-id", "log-1")], timeout=60))[-1].final
    stub.Tokenize(pb.TokenizeRequest(texts=[SECRET]), metadata=[("x-request-id", "log-2")], timeout=30)
    [line] = request_log("log-1")
    f = line.fields
    assert line.levelno == logging.INFO
    assert (f["method"], f["status"], f["model"]) == ("Generate", "OK", served.llm.name)
    assert f["prompt_tokens"] == final.usage.prompt_tokens > 0
    assert f["generated_tokens"] == final.usage.completion_tokens == 5
    assert f["cached_tokens"] == final.usage.cached_tokens
    assert f["finish_reason"] == "length"
    assert 0 <= f["queue_seconds"] <= f["first_token_seconds"] <= f["total_seconds"]
    assert f["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    [tok_line] = request_log("log-2")
    assert (tok_line.fields["method"], tok_line.fields["status"]) == ("Tokenize", "OK")
    assert tok_line.fields["prompt_tokens"] == len(served.llm.tokenizer.encode(SECRET))
    assert "first_token_seconds" not in tok_line.fields
    for record in (line, tok_line):
        assert "prompt" not in record.fields
        text, obj = TextFormatter().format(record), json.loads(JsonFormatter().format(record))
        assert "pelican" not in text and "pelican" not in json.dumps(obj)
        assert "request_id=log-" in text and " status=OK " in text
        assert obj["request_id"].startswith("log-") and obj["logger"] == "tokenwire.requests"


def test_failed_and_cancelled_requests_are_logged(stub, request_log, wait_until):
    with pytest.raises(grpc.RpcError):
        stub.Detokenize(pb.DetokenizeRequest(ids=[10**8]), metadata=[("x-request-id", "log-bad")], timeout=30)
    [line] = request_log("log-bad")
    assert (line.fields["method"], line.fields["status"]) == ("Detokenize", "INVALID_ARGUMENT")
    stream = stub.Generate(generate_request(max_new_tokens=2000), metadata=[("x-request-id", "log-cancel")],
                           timeout=60)
    it = iter(stream)
    next(it), next(it)
    stream.cancel()
    assert wait_until(lambda: len(request_log("log-cancel")) == 1)
    [line] = request_log("log-cancel")
    assert line.fields["status"] == "CANCELLED"
    assert 1 <= line.fields["generated_tokens"] < 2000


def test_prompts_are_logged_only_when_asked(start_server, make_engine, request_log):
    running = start_server(make_engine(kv_cache_tokens=1024), log_prompts=True)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.TokenwireStub(channel)
        list(stub.Generate(generate_request(), metadata=[("x-request-id", "with-prompt")], timeout=60))
        stub.Tokenize(pb.TokenizeRequest(texts=[SECRET, "two"]), metadata=[("x-request-id", "tok-prompt")],
                      timeout=30)
    [line] = request_log("with-prompt")
    assert SECRET in line.fields["prompt"]
    assert SECRET in TextFormatter().format(line)
    [line] = request_log("tok-prompt")
    assert line.fields["prompt"] == [SECRET, "two"]
    assert json.loads(JsonFormatter().format(line))["prompt"] == [SECRET, "two"]
