"""Three server processes on this machine behind one balanced client: every replica takes its
share (seen in its own /metrics), and one replica drained by SIGTERM mid-run finishes its
streams, turns new calls away, and exits 0, while the client carries on with the others."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tokenwire import Client, TokenwireError


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Replica:
    def __init__(self, model_path, log_path):
        self.port, self.health_port, self.metrics_port = free_ports(3)
        self.address = f"127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tokenwire_server.main", "serve", "--model", str(model_path),
             "--host", "127.0.0.1", "--port", str(self.port), "--health-port", str(self.health_port),
             "--metrics-port", str(self.metrics_port), "--kv-cache-tokens", "4096", "--threads", "1",
             "--drain-timeout", "60", "--http-port", "0"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def readiness(self) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status = stub.Check(health_pb2.HealthCheckRequest(service="tokenwire.v1.Tokenwire"), timeout=2).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def wait_ready(self, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.process.poll() is None, open(self.log.name).read()
            try:
                if self.readiness() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"replica on {self.port} not ready after {timeout}s")

    def count(self, method: str, code: str = "OK") -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "tokenwire_requests_total" and s.labels == {"protocol": "grpc", "method": method, "code": code}:
                    return s.value
        return 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def replicas(model_path, tmp_path_factory):
    logs = tmp_path_factory.mktemp("replicas")
    started = [Replica(model_path, logs / f"replica{i}.log") for i in range(3)]
    try:
        for r in started:
            r.wait_ready()
        yield started
    finally:
        for r in started:
            r.stop()


def test_load_spreads_over_every_replica(replicas):
    with Client([r.address for r in replicas], timeout=60) as client:
        for _ in range(12):
            assert client.generate("Hello", temperature=0, max_new_tokens=2, ignore_eos=True).usage \
                .completion_tokens == 2
    served = [r.count("Generate") for r in replicas]
    assert sum(served) == 12 and all(n >= 2 for n in served), served


def test_sigterm_drains_one_replica_while_the_others_serve(replicas):
    draining, others = replicas[0], replicas[1:]
    before = sum(r.count("Tokenize") + r.count("Generate") for r in others)
    # Streams in flight on the replica that will drain: each must complete whole.
    results, errors, started = [], [], threading.Barrier(3)

    def stream():
        try:
            with Client(draining.address, timeout=120, retries=False) as c:
                s = c.generate_stream("Tell me a long story about a lighthouse keeper.", temperature=0,
                                      max_new_tokens=120, ignore_eos=True)
                it = iter(s)
                next(it)  # streaming has begun
                started.wait(30)
                for _ in it:
                    pass
                results.append(s.final)
        except Exception as e:  # reported below
            errors.append(e)
            started.abort()

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait(60)
    draining.process.send_signal(signal.SIGTERM)
    # Readiness flips at once (the health port stays up through the drain).
    end = time.monotonic() + 5
    while draining.readiness() != "NOT_SERVING":
        assert time.monotonic() < end, "readiness did not flip"
        time.sleep(0.05)
    assert all(t.is_alive() for t in threads), "streams ended before the drain could be observed"
    with Client(draining.address, timeout=10, retries=False) as direct:
        with pytest.raises(TokenwireError) as e:
            direct.tokenize("turned away")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    # The balanced client keeps working: calls move to the other replicas.
    with Client([r.address for r in replicas], timeout=60) as client:
        for i in range(6):
            assert client.tokenize(f"still served {i}")[0].token_count > 0
            assert client.generate("Hi", temperature=0, max_new_tokens=2, ignore_eos=True).usage \
                .completion_tokens == 2
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [f.finish_reason for f in results] == ["length", "length"]
    assert [f.usage.completion_tokens for f in results] == [120, 120]
    assert draining.process.wait(60) == 0
    log = open(draining.log.name).read()
    assert "draining" in log and "stopped" in log
    assert sum(r.count("Tokenize") + r.count("Generate") for r in others) == before + 12
