"""Cancellation, deadlines, concurrency, loading state and engine faults, seen from the server."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tokenwire import Client, TokenwireError
from tokenwire_server.engine import FinishReason

LONG = dict(temperature=0, max_new_tokens=3000, ignore_eos=True)


def idle(served):
    return served.stats.running == 0 and served.stats.waiting == 0


def test_cancel_stops_the_work_and_frees_memory(client, served, wait_until):
    engine = served.llm
    assert wait_until(lambda: idle(served))
    cancelled_before = served.stats.finished[FinishReason.CANCELLED]
    stream = client.generate_stream("Write a very long essay about the sea.", **LONG)
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert engine.blocks.num_used > 0  # the running request holds cache blocks
    tokens_at_cancel = served.stats.generated_tokens
    stream.cancel()
    with pytest.raises(TokenwireError) as e:
        list(it)
    assert e.value.code == grpc.StatusCode.CANCELLED
    assert wait_until(lambda: idle(served))
    assert served.stats.finished[FinishReason.CANCELLED] == cancelled_before + 1
    assert served.stats.generated_tokens - tokens_at_cancel < 20  # stopped, not run to 3000
    assert wait_until(lambda: engine.blocks.num_used == 0)
    assert client.generate("Hello", temperature=0, max_new_tokens=3).usage.completion_tokens == 3


def test_expired_deadline(client, served, wait_until):
    engine = served.llm
    assert wait_until(lambda: idle(served))
    cancelled_before = served.stats.finished[FinishReason.CANCELLED]
    start = time.monotonic()
    with pytest.raises(TokenwireError) as e:
        client.generate("Write a very long essay about mountains.", timeout=1.0, **LONG)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 3
    assert wait_until(lambda: idle(served), timeout=3)
    assert served.stats.finished[FinishReason.CANCELLED] == cancelled_before + 1
    assert wait_until(lambda: engine.blocks.num_used == 0)
    with pytest.raises(TokenwireError) as e:
        client.score(["A sentence to score. " * 200], timeout=0.001)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.health() == "SERVING"


def test_concurrent_requests_are_all_served_correctly(client, served):
    prompts = ["The moon is", "Python is a", "My favourite food is", "In the year 2000,"]
    alone = [client.generate(p, temperature=0, max_new_tokens=12, ignore_eos=True).text for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: client.generate(p, temperature=0, max_new_tokens=12,
                                                           ignore_eos=True).text, prompts))
    assert together == alone


def test_health_and_tokenize_stay_responsive_during_generation(client, served, wait_until):
    done = threading.Event()

    def long_generation():
        client.generate("Write a long poem.", temperature=0, max_new_tokens=150, ignore_eos=True)
        done.set()

    threading.Thread(target=long_generation, daemon=True).start()
    assert wait_until(lambda: served.stats.running == 1)
    worst = 0.0
    while not done.is_set():
        start = time.monotonic()
        assert client.health() == "SERVING"
        client.tokenize("still here")
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.05)
    assert worst < 0.5


def test_engine_fault_fails_only_that_request(client, served, monkeypatch, caplog):
    engine = served.llm
    real = engine.sampler
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "sampler", flaky)
    with pytest.raises(TokenwireError) as e:
        client.generate("Hello", max_new_tokens=4)
    assert e.value.code == grpc.StatusCode.INTERNAL and "injected" not in e.value.message
    assert "injected fault" in caplog.text  # the trace is logged on the server
    assert client.generate("Hello", temperature=0, max_new_tokens=4).usage.completion_tokens >= 1


def test_not_serving_until_a_model_is_attached(start_server):
    bare = start_server()  # no model loaded
    with Client(bare.address, timeout=10) as c:
        assert c.health() == "NOT_SERVING"
        assert c.health("tokenwire.v1.Tokenwire") == "NOT_SERVING"
        with pytest.raises(TokenwireError) as e:
            c.generate("Hello")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
