"""Prometheus metrics, scraped over HTTP from a real server while clients call it over TCP."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenwire import Client, TokenwireError
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

FIVE = dict(temperature=0, max_new_tokens=5, ignore_eos=True)
LONG = dict(temperature=0, max_new_tokens=2000, ignore_eos=True)


class Scrape:
    """One GET of /metrics, parsed the way Prometheus reads it."""

    def __init__(self, running):
        url = f"http://127.0.0.1:{running.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            self.text = response.read().decode()
        self.samples = {}
        self.types = {}
        for family in text_string_to_metric_families(self.text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[s.name, tuple(sorted(s.labels.items()))] = s.value

    def __call__(self, name: str, **labels) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


@pytest.fixture
def metered(start_server, make_engine):
    """A server of its own (its counters start at zero) serving /metrics on a free port."""
    return start_server(make_engine(kv_cache_tokens=2048), metrics_port=0)


def test_every_metric_is_exposed_with_its_type(metered):
    m = Scrape(metered)
    expected = {
        "tokenwire_time_to_first_token_seconds": "histogram", "tokenwire_inter_token_latency_seconds": "histogram",
        "tokenwire_e2e_request_latency_seconds": "histogram", "tokenwire_queue_time_seconds": "histogram",
        "tokenwire_requests_waiting": "gauge", "tokenwire_requests_running": "gauge",
        "tokenwire_batch_size": "gauge", "tokenwire_kv_cache_usage_ratio": "gauge",
        "tokenwire_prompt_tokens": "counter", "tokenwire_generation_tokens": "counter",
        "tokenwire_prefix_cache_hit_tokens": "counter", "tokenwire_requests_finished": "counter",
        "tokenwire_requests": "counter", "tokenwire_preemptions": "counter",
        "tokenwire_model_info": "gauge",  # an Info reads as a gauge of value 1 in the text format
    }
    assert {name: m.types.get(name) for name in expected} == expected
    llm = metered.llm
    assert m("tokenwire_model_info", model=llm.name, architecture=llm.config.architecture, dtype="float32",
             device="cpu") == 1
    for name in ("tokenwire_requests_running", "tokenwire_requests_waiting", "tokenwire_kv_cache_usage_ratio",
                 "tokenwire_generation_tokens_total", "tokenwire_time_to_first_token_seconds_count"):
        assert (name, ()) in m.samples and m(name) == 0, name
    # CPU-sized buckets: from milliseconds to tens of seconds.
    bounds = {float(dict(labels)["le"]) for (name, labels) in m.samples
              if name == "tokenwire_time_to_first_token_seconds_bucket"}
    assert min(bounds) <= 0.01 and max(b for b in bounds if b != float("inf")) >= 30


def test_counts_match_the_requests_made(metered):
    before = Scrape(metered)
    with Client(metered.address, timeout=60) as client:
        gens = [client.generate(f"Count to ten, take {i}:", **FIVE) for i in range(3)]
        with pytest.raises(TokenwireError) as e:
            client.generate("x", top_p=1.5)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        client.tokenize(["one", "two"])
        client.score([("The capital of France is", " Paris")])
        client.info()
        assert client.health() == "SERVING"
    after = Scrape(metered)

    def delta(name, **labels):
        return after(name, **labels) - before(name, **labels)

    assert [g.usage.completion_tokens for g in gens] == [5, 5, 5]
    assert delta("tokenwire_generation_tokens_total") == 15
    assert delta("tokenwire_requests_finished_total", finish_reason="length") == 3
    assert delta("tokenwire_requests_total", protocol="grpc", method="Generate", code="OK") == 3
    assert delta("tokenwire_requests_total", protocol="grpc", method="Generate", code="INVALID_ARGUMENT") == 1
    for method in ("Tokenize", "Score", "ModelInfo"):
        assert delta("tokenwire_requests_total", protocol="grpc", method=method, code="OK") == 1, method
    assert not any(dict(labels).get("method") == "Check" for _, labels in after.samples)  # health is not counted
    assert delta("tokenwire_time_to_first_token_seconds_count") == 3
    assert delta("tokenwire_e2e_request_latency_seconds_count") == 3
    assert delta("tokenwire_inter_token_latency_seconds_count") == 3 * 4
    assert delta("tokenwire_queue_time_seconds_count") == 3 + 1  # the three generations and the score item
    # Prompt tokens: each generation's prompt plus the score item's tokens.
    score_tokens = len(metered.llm.tokenizer.encode("The capital of France is")) + \
        len(metered.llm.tokenizer.encode(" Paris", add_special_tokens=False))
    assert delta("tokenwire_prompt_tokens_total") == sum(g.usage.prompt_tokens for g in gens) + score_tokens
    # Latencies are real times: the sum of TTFTs lies within the requests' total times.
    ttft_sum = delta("tokenwire_time_to_first_token_seconds_sum")
    assert 0 < ttft_sum <= sum(g.usage.total_seconds for g in gens) + 0.01
    assert delta("tokenwire_time_to_first_token_seconds_bucket", le="+Inf") == 3


def test_prefix_cache_hits_are_counted(metered):
    prompt = "You are a helpful assistant who answers in one short sentence. " * 4 + "Hello"
    before = Scrape(metered)
    with Client(metered.address, timeout=60) as client:
        first = client.generate(prompt, **FIVE)
        second = client.generate(prompt, **FIVE)
    after = Scrape(metered)
    assert first.usage.cached_tokens == 0 and second.usage.cached_tokens >= 32
    assert after("tokenwire_prefix_cache_hit_tokens_total") - before("tokenwire_prefix_cache_hit_tokens_total") \
        == second.usage.cached_tokens


def test_gauges_during_and_after_a_generation(metered, wait_until):
    before = Scrape(metered)
    assert before("tokenwire_kv_cache_usage_ratio") == 0
    with Client(metered.address, timeout=120) as client:
        stream = client.generate_stream("Write a very long story about a lighthouse.", **LONG)
        it = stream.deltas()
        for _ in range(3):
            next(it)
        during = Scrape(metered)
        assert during("tokenwire_requests_running") == 1
        assert during("tokenwire_requests_waiting") == 0
        assert during("tokenwire_batch_size") == 1
        assert 0 < during("tokenwire_kv_cache_usage_ratio") < 1
        assert during("tokenwire_generation_tokens_total") >= 3
        stream.cancel()
        with pytest.raises(TokenwireError):
            list(it)

    def settled():
        m = Scrape(metered)
        return (m("tokenwire_requests_running") == 0 and m("tokenwire_kv_cache_usage_ratio") == 0
                and m("tokenwire_batch_size") == 0
                and m("tokenwire_requests_total", protocol="grpc", method="Generate", code="CANCELLED") == 1)

    assert wait_until(settled)
    after = Scrape(metered)
    assert after("tokenwire_requests_finished_total", finish_reason="cancelled") == 1
    assert after("tokenwire_requests_total", protocol="grpc", method="Generate", code="OK") == 0
    assert after("tokenwire_e2e_request_latency_seconds_count") == 0  # cancelled ones are not latencies


def test_deadline_exceeded_is_counted(metered, wait_until):
    with Client(metered.address) as client:
        with pytest.raises(TokenwireError) as e:
            client.generate("Write a very long essay about rivers.", timeout=0.5, **LONG)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: Scrape(metered)("tokenwire_requests_total", protocol="grpc", method="Generate",
                                              code="DEADLINE_EXCEEDED") == 1)
    m = Scrape(metered)
    assert m("tokenwire_requests_total", protocol="grpc", method="Generate", code="CANCELLED") == 0


def test_overload_is_counted_as_resource_exhausted(start_server, make_engine):
    running = start_server(make_engine(kv_cache_tokens=1024, max_queued=0), metrics_port=0)
    with Client(running.address, timeout=30) as client:
        with pytest.raises(TokenwireError) as e:
            client.generate("Hello", **FIVE)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    m = Scrape(running)
    assert m("tokenwire_requests_total", protocol="grpc", method="Generate", code="RESOURCE_EXHAUSTED") == 1
    assert m("tokenwire_generation_tokens_total") == 0


def test_servers_in_one_process_keep_their_own_metrics(start_server):
    a, b = start_server(metrics_port=0), start_server(metrics_port=0)  # no model: every RPC is UNAVAILABLE
    assert a.server.metrics_port != b.server.metrics_port
    with grpc.insecure_channel(a.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.TokenwireStub(channel).Tokenize(pb.TokenizeRequest(texts=["hi"]), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert Scrape(a)("tokenwire_requests_total", protocol="grpc", method="Tokenize", code="UNAVAILABLE") == 1
    assert Scrape(b)("tokenwire_requests_total", protocol="grpc", method="Tokenize", code="UNAVAILABLE") == 0


def test_metrics_are_off_by_default_and_stop_with_the_server(start_server):
    assert start_server().server.metrics_port is None
    running = start_server(metrics_port=0)
    port = running.server.metrics_port
    assert port > 0 and "tokenwire_requests_running" in Scrape(running).text
    running.run(running.server.stop(0))
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
