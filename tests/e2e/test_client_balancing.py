"""One client over several replicas: round-robin balancing, retries on UNAVAILABLE, and a
Generate that is never re-run once it has streamed. Real tokenwire servers on 127.0.0.1 (a
server without a model answers model RPCs with UNAVAILABLE), plus one scripted gRPC server where
the exact number of attempts matters."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from concurrent import futures

import grpc
import pytest
from tokenwire import AsyncClient, Client, TokenwireError
from tokenwire._channel import resolve_target
from tokenwire.cli import main as cli_main
from tokenwire.v1 import tokenwire_pb2 as pb

TEXT = "The cat sat on the mat."


@pytest.fixture
def replica(start_server, make_engine):
    """A serving replica with a small engine of its own (same weights)."""
    return lambda: start_server(make_engine(kv_cache_tokens=2048))


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def scored(*servers) -> list[int]:
    return [s.stats.scored_items for s in servers]


# ---- balancing ----

def test_calls_spread_over_every_replica(replica):
    servers = [replica() for _ in range(3)]
    with Client([s.address for s in servers], timeout=30) as client:
        for _ in range(30):
            assert client.score([TEXT])[0].token_count > 0
    counts = scored(*servers)
    assert sum(counts) == 30 and min(counts) >= 5, counts  # round robin: about 10 each


@pytest.mark.parametrize("form", ["comma", "list", "hostnames"])
def test_address_forms_are_equivalent(form, replica):
    a, b = replica(), replica()
    ports = [s.address.rsplit(":", 1)[1] for s in (a, b)]
    target = {"comma": f"{a.address}, {b.address}", "list": [a.address, b.address],
              "hostnames": ",".join(f"localhost:{p}" for p in ports)}[form]
    with Client(target, timeout=30) as client:
        for _ in range(8):
            client.score([TEXT])
    assert min(scored(a, b)) >= 2, scored(a, b)


def test_target_parsing():
    a, b = "127.0.0.1:5001", "127.0.0.1:5002"
    assert resolve_target([a, b]) == resolve_target(f"{a},{b}") == resolve_target(f" {a} , {b}, ") \
        == (f"ipv4:{a},{b}", a)
    target, authority = resolve_target("localhost:5001,localhost:5002")  # resolved here, once
    assert target.startswith(("ipv4:", "ipv6:")) and authority == "localhost:5001"
    assert all(re.search(rf"127\.0\.0\.1\]?:{p}(,|$)", target) for p in (5001, 5002)), target
    # one address, or a grpc target, goes to grpc untouched (its DNS resolver: every A record)
    for single in ("localhost:5001", [a], "dns:///tokenwire.svc:50051", f"ipv4:{a},{b}", "unix:/tmp/tw.sock"):
        assert resolve_target(single) == ((single[0] if isinstance(single, list) else single), None)
    # both families in one target: IPv4 as IPv4-mapped IPv6
    assert resolve_target("[::1]:5001,127.0.0.1:5002")[0] == "ipv6:[::1]:5001,[::ffff:127.0.0.1]:5002"
    for bad in ("", " , ", [], "a:1,b", "a:1,::1:2", f"{a},dns:///b:2", "dns:///a:1,b:2", "a:1,b:99999"):
        with pytest.raises(ValueError):
            resolve_target(bad)
    with pytest.raises(OSError):
        resolve_target("no-such-host.invalid:1,nor-this.invalid:2")
    assert resolve_target(f"no-such-host.invalid:1,{a}") == (f"ipv4:{a}", "no-such-host.invalid:1")


def test_ipv4_mapped_target_reaches_an_ipv4_server(replica):
    a = replica()
    with Client(["[::1]:1", a.address], timeout=30) as client:  # nothing listens on [::1]:1
        assert client.target.startswith("ipv6:")
        for _ in range(3):
            client.score([TEXT])
    assert scored(a) == [3]


def test_several_addresses_connect_directly_despite_http_proxy(replica, monkeypatch):
    # grpc routes a multi-address target through HTTP_PROXY, ignoring NO_PROXY (grpc/grpc#40366)
    a, b = replica(), replica()
    for name in ("grpc_proxy", "https_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://{closed_port()}")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with Client([a.address, b.address], timeout=10) as client:
        assert client.info().architecture == "llama"


# ---- retries of idempotent calls ----

def test_server_rejections_leave_the_call_retryable(start_server):
    # gRPC commits a call, and never retries it, once response headers arrive (gRFC A6, "When
    # Retries are Valid"). A server that sends its initial metadata before it knows the outcome
    # turns every UNAVAILABLE into a final error: it must send headers with the first message
    # (or the unary response), so that a rejection is Trailers-Only.
    loading = start_server()
    channel = grpc.insecure_channel(loading.address)
    try:
        model_info = channel.unary_unary("/tokenwire.v1.Tokenwire/ModelInfo", pb.ModelInfoRequest.SerializeToString)
        generate = channel.unary_stream("/tokenwire.v1.Tokenwire/Generate", pb.GenerateRequest.SerializeToString)
        for name, call in (("ModelInfo", lambda: model_info(pb.ModelInfoRequest(), timeout=10)),
                           ("Generate", lambda: list(generate(pb.GenerateRequest(text="x"), timeout=10)))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not e.value.initial_metadata(), (
                f"{name}: the server sent response headers {e.value.initial_metadata()} before failing, "
                "which commits the call: clients cannot retry it on another replica")
    finally:
        channel.close()


def _every_idempotent_call(client: Client, rounds: int = 6) -> None:
    for _ in range(rounds):
        ids = client.tokenize(TEXT)[0].ids
        assert client.detokenize(ids) == TEXT
        assert client.score([TEXT])[0].token_count == len(ids) - 1
        assert client.info().architecture == "llama"


def test_idempotent_calls_move_off_a_replica_without_model(replica, start_server):
    good, loading = replica(), start_server()  # no model: UNAVAILABLE "the model is not loaded yet"
    with Client([loading.address, good.address], timeout=30) as client:
        _every_idempotent_call(client)
    assert scored(good) == [6]


def test_idempotent_calls_move_off_a_closed_port(replica):
    good = replica()
    with Client([closed_port(), good.address], timeout=30) as client:
        _every_idempotent_call(client)
    assert scored(good) == [6]


def test_async_client_retries_onto_the_healthy_replica(replica, start_server):
    good, loading = replica(), start_server()

    async def main():
        async with AsyncClient(f"{loading.address},{good.address}", timeout=30) as client:
            for _ in range(4):
                ids = (await client.tokenize(TEXT))[0].ids
                assert await client.detokenize(ids) == TEXT
                assert (await client.score([TEXT]))[0].token_count > 0
                assert (await client.info()).architecture == "llama"
                g = await client.generate("Hello", temperature=0, max_new_tokens=2, ignore_eos=True)
                assert g.usage.completion_tokens == 2

    asyncio.run(main())
    assert scored(good) == [4]


def test_without_retries_unavailable_surfaces_at_once(replica, start_server):
    good, loading = replica(), start_server()
    with Client(loading.address, timeout=30, retries=False) as client:
        start = time.monotonic()
        with pytest.raises(TokenwireError) as e:
            client.tokenize(TEXT)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "not loaded" in e.value.message
        assert time.monotonic() - start < 1.0  # with retries: 4 backoffs, about 1.5 s
    outcomes = []
    with Client([loading.address, good.address], timeout=30, retries=False) as client:
        for _ in range(6):
            try:
                client.score([TEXT])
                outcomes.append("ok")
            except TokenwireError as e:
                assert e.code == grpc.StatusCode.UNAVAILABLE
                outcomes.append("unavailable")
    assert set(outcomes) == {"ok", "unavailable"}, outcomes  # round robin: every other call


# ---- Generate ----

def test_generate_is_retried_only_before_its_first_message(replica, start_server):
    good, loading = replica(), start_server()
    with Client([loading.address, good.address], timeout=60) as client:
        for _ in range(4):  # round robin: every other one is first sent to the replica without a model
            g = client.generate("Hello", temperature=0, max_new_tokens=2, ignore_eos=True)
            assert g.usage.completion_tokens == 2
    assert good.stats.generated_tokens == 8


def test_generate_cut_off_mid_stream_is_not_rerun(replica, tokenizer):
    a, b = replica(), replica()
    prompt = "Once upon a time"
    with Client([a.address, b.address], timeout=60) as client:
        stream = client.generate_stream(prompt, temperature=0, max_new_tokens=200, ignore_eos=True)
        deltas = iter(stream)
        got = [next(deltas), next(deltas)]
        serving, other = (a, b) if a.stats.prompt_tokens else (b, a)
        assert stream.input is not None and other.stats.prompt_tokens == 0
        serving.run(serving.server.stop(0))
        with pytest.raises(TokenwireError):
            for delta in deltas:  # what was already on the wire, then the error
                got.append(delta)  # noqa: PERF402 (keep what came before the error)
        assert stream.final is None and 2 <= len(got) < 200
        time.sleep(0.5)  # a retry, had there been one, would have reached the other replica by now
        assert other.stats.prompt_tokens == 0 and other.stats.generated_tokens == 0
        assert serving.stats.prompt_tokens == len(tokenizer.encode(prompt))  # one attempt, once
        assert client.score([TEXT])[0].token_count > 0  # the client carries on with the other replica
    assert scored(other) == [1]


class ScriptedServer:
    """A gRPC server for the Tokenwire service that fails on purpose and counts the attempts."""

    def __init__(self, generate_sends_first: bool):
        self.attempts = {"Tokenize": 0, "Generate": 0}

        def tokenize(request, context):
            self.attempts["Tokenize"] += 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted")

        def generate(request, context):
            self.attempts["Generate"] += 1
            if generate_sends_first:
                yield pb.GenerateResponse(input=pb.InputInfo(prompt_token_count=1, seed=7))
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted")

        handler = grpc.method_handlers_generic_handler("tokenwire.v1.Tokenwire", {
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                tokenize, pb.TokenizeRequest.FromString, pb.TokenizeResponse.SerializeToString),
            "Generate": grpc.unary_stream_rpc_method_handler(
                generate, pb.GenerateRequest.FromString, pb.GenerateResponse.SerializeToString)})
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        self.server.add_generic_rpc_handlers([handler])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


@pytest.fixture
def scripted():
    servers = []

    def start(generate_sends_first: bool) -> ScriptedServer:
        servers.append(ScriptedServer(generate_sends_first))
        return servers[-1]

    yield start
    for s in servers:
        s.server.stop(0)


@pytest.mark.parametrize("retries", [True, False])
def test_attempts_per_call(scripted, retries):
    before, after = scripted(generate_sends_first=False), scripted(generate_sends_first=True)
    attempts = 5 if retries else 1
    with Client(before.address, timeout=30, retries=retries) as client:
        with pytest.raises(TokenwireError) as e:
            client.tokenize("x")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(TokenwireError):
            client.generate("x")
    assert before.attempts == {"Tokenize": attempts, "Generate": attempts}
    with Client(after.address, timeout=30, retries=retries) as client:
        stream = client.generate_stream("x")
        with pytest.raises(TokenwireError) as e:
            list(stream)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and stream.input.seed == 7
    assert after.attempts["Generate"] == 1  # committed by its first message: never re-sent


# ---- the command ----

def test_cli_takes_several_servers(replica, start_server, capsys):
    good, loading = replica(), start_server()
    for _ in range(4):
        assert cli_main(["--server", f"{loading.address},{good.address}", "--json", "score", TEXT]) == 0
    assert scored(good) == [4]
    capsys.readouterr()
    assert cli_main(["--server", f"{good.address},dns:///x:1", "info"]) == 2
    assert "--server" in capsys.readouterr().err


def test_bench_spreads_over_several_servers(replica, capsys):
    a, b = replica(), replica()
    assert cli_main(["--server", f"{a.address},{b.address}", "--json", "bench", "--requests", "4",
                     "--prompt-tokens", "8", "--output-tokens", "2", "--warmup", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == 4 and not report["errors"]
    assert a.stats.generated_tokens > 0 and b.stats.generated_tokens > 0
