"""A real tokenwire gRPC server over TCP on 127.0.0.1, port 0, serving the session's engine
from a background event loop; clients connect to it like any other process would."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from tokenwire import Client
from tokenwire_server.server import TokenwireServer


@dataclass
class RunningServer:
    server: TokenwireServer
    loop: asyncio.AbstractEventLoop
    address: str

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def stats(self):
        return self.server.metrics.stats  # what /metrics shows

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (servers started with http_port)."""
        return f"http://127.0.0.1:{self.server.http_port}/v1"

    @property
    def llm(self):
        """The LLMEngine this server steps (only its own thread may step it)."""
        return self.server.engine.engine


@pytest.fixture(scope="session")
def event_loop_thread():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


async def _start(engine=None, **options) -> TokenwireServer:
    server = TokenwireServer("127.0.0.1", 0, **options)
    await server.start()
    if engine is not None:
        await server.attach(engine)
    return server


@pytest.fixture(scope="session")
def served(make_engine, event_loop_thread):
    # An engine of its own (same weights): tests may call the session engine directly
    # without racing this server's engine thread.
    server = asyncio.run_coroutine_threadsafe(_start(make_engine(kv_cache_tokens=32768), http_port=0, metrics_port=0),
                                              event_loop_thread).result(60)
    running = RunningServer(server, event_loop_thread, f"127.0.0.1:{server.port}")
    yield running
    running.run(server.stop(0))


@pytest.fixture(scope="session")
def client(served):
    with Client(served.address, timeout=120) as c:
        yield c


@pytest.fixture
def start_server(event_loop_thread):
    """Start extra servers (optionally without a model) for a test; stopped after it. Options go
    to TokenwireServer (metrics_port=0: serve /metrics on a free port, server.metrics_port)."""
    started = []

    def start(engine=None, **options) -> RunningServer:
        server = asyncio.run_coroutine_threadsafe(_start(engine, **options), event_loop_thread).result(60)
        started.append(server)
        return RunningServer(server, event_loop_thread, f"127.0.0.1:{server.port}")

    yield start
    for server in started:
        asyncio.run_coroutine_threadsafe(server.stop(0), event_loop_thread).result(30)


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def wait_until():
    """Poll a condition on the server until it holds (False after the timeout)."""
    return _wait_until
