"""The sync client's stream: the async one's events, and the call cancelled when the caller
stops early."""

import asyncio
import gc
import time

import pytest

from tokenwire import AsyncClient, Delta, Final, InputInfo
from tokenwire_server.engine import FinishReason

LONG = dict(temperature=0, max_new_tokens=3000, ignore_eos=True)


def async_events(address, prompt, **kwargs):
    async def main():
        async with AsyncClient(address, timeout=60) as c:
            return [e async for e in c.generate_stream(prompt, **kwargs)]

    return asyncio.run(main())


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=5, seed=1),
                                    dict(max_new_tokens=4, n=2, seed=7, temperature=0.8)])
def test_sync_stream_yields_the_async_streams_events(client, served, kwargs):
    stream = client.generate_stream("The sea is", ignore_eos=True, **kwargs)
    sync = list(stream)
    expected = async_events(served.address, "The sea is", ignore_eos=True, **kwargs)
    assert [type(e) for e in sync] == [type(e) for e in expected]
    assert type(sync[0]) is InputInfo and type(sync[-1]) is Final and stream.input == sync[0]
    strip = lambda e: (e.finish_reason, e.usage.completion_tokens, e.index) if type(e) is Final else e  # noqa: E731
    assert [strip(e) for e in sync] == [strip(e) for e in expected]
    assert stream.final == [e for e in sync if type(e) is Final][-1]


def test_deltas_and_result_still_work(client):
    stream = client.generate_stream("The sea is", temperature=0, max_new_tokens=6, ignore_eos=True)
    deltas = list(stream.deltas())
    assert len(deltas) == 6 and all(type(d) is Delta for d in deltas)
    assert stream.input.prompt_token_count > 0 and stream.final.usage.completion_tokens == 6
    again = client.generate_stream("The sea is", temperature=0, max_new_tokens=6, ignore_eos=True)
    assert again.result().text == "".join(d.text for d in deltas)


def _break(stream):
    for event in stream:
        if type(event) is Delta:
            break


def _close(stream):
    it = iter(stream)
    while type(next(it)) is not Delta:
        pass
    it.close()


def _with(stream):
    with stream:
        for event in stream.deltas():
            break


def _deltas_break(stream):
    for _ in stream.deltas():
        break


def _garbage(stream):
    it = iter(stream)
    while type(next(it)) is not Delta:
        pass
    del it
    gc.collect()


@pytest.mark.parametrize("stop", [_break, _close, _with, _deltas_break, _garbage])
def test_stopping_early_cancels_the_call(client, served, wait_until, stop):
    assert wait_until(lambda: served.stats.running == 0 and served.stats.waiting == 0)
    cancelled = served.stats.finished[FinishReason.CANCELLED]
    stream = client.generate_stream("Write a very long essay about the sea.", **LONG)
    stop(stream)  # `stream` stays referenced: only stopping may end the call
    stopped = time.monotonic()
    tokens = served.stats.generated_tokens
    assert wait_until(lambda: served.stats.finished[FinishReason.CANCELLED] == cancelled + 1, timeout=5)
    assert time.monotonic() - stopped < 2
    assert wait_until(lambda: served.stats.running == 0)
    assert served.stats.generated_tokens - tokens < 50  # stopped, not run to 3000
    assert stream.final is None
