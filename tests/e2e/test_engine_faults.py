"""Faults injected at each point of the engine: only the request a fault touches fails; if the
engine thread dies anyway, every call fails fast with UNAVAILABLE and health says NOT_SERVING."""

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc
from tokenwire_server.engine import EngineRequest, SamplingParams
from tokenwire_server.engine.async_engine import AsyncEngine
from tokenwire_server.errors import EngineUnavailable

POISON = 666  # the seed that marks the request a fault is injected into


def request(seed: int, max_new_tokens: int = 24) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="Count slowly from one to one hundred:", sampling=pb.SamplingParameters(
        temperature=0, seed=seed), stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True))


def poisoned(seqs) -> bool:
    return any(s.params.seed == POISON for s in seqs)


def run_side_by_side(address: str) -> tuple[list, grpc.RpcError | None]:
    """An innocent stream and a poisoned one at once: the innocent one's tokens, the poisoned one's error."""
    result, error = {}, {}

    def call(seed, key):
        with grpc.insecure_channel(address) as channel:
            try:
                result[key] = [t.id for m in pb_grpc.TokenwireStub(channel).Generate(request(seed), timeout=60)
                               if m.WhichOneof("event") == "delta" for t in m.delta.tokens]
            except grpc.RpcError as e:
                error[key] = e

    threads = [threading.Thread(target=call, args=(seed, key)) for seed, key in ((1, "good"), (POISON, "bad"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert "good" not in error, error.get("good")
    return result["good"], error.get("bad")


@pytest.fixture
def faulty(start_server, make_engine):
    return start_server(make_engine(kv_cache_tokens=4096))


@pytest.fixture
def solo(served):
    with grpc.insecure_channel(served.address) as channel:
        return [t.id for m in pb_grpc.TokenwireStub(channel).Generate(request(1), timeout=60)
                if m.WhichOneof("event") == "delta" for t in m.delta.tokens]


def test_a_fault_in_the_model_step_fails_only_its_request(faulty, solo):
    llm = faulty.llm
    execute = llm.runner.execute

    def failing(batch):
        if poisoned(s.seq for s in batch):
            raise RuntimeError("injected fault in the model")
        return execute(batch)

    llm.runner.execute = failing
    good, bad = run_side_by_side(faulty.address)
    assert bad is not None and bad.code() == grpc.StatusCode.INTERNAL
    assert good == solo  # the innocent stream ran to the end, unchanged


def test_a_fault_in_the_sampler_fails_only_its_request(faulty, solo):
    llm = faulty.llm
    sample = llm.sampler.__class__.__call__

    class Failing(llm.sampler.__class__):
        def __call__(self, logits, params, *args):
            if poisoned([type("P", (), {"params": p}) for p in params]):
                raise RuntimeError("injected fault in the sampler")
            return sample(self, logits, params, *args)

    llm.sampler = Failing()
    good, bad = run_side_by_side(faulty.address)
    assert bad is not None and bad.code() == grpc.StatusCode.INTERNAL
    assert good == solo


def test_a_fault_in_output_processing_fails_only_its_request(faulty, solo):
    llm = faulty.llm
    process = llm.processor.process

    def failing(seq, token, now):
        if seq.params.seed == POISON and len(seq.output_ids) == 3:
            raise RuntimeError("injected fault in the output processor")
        return process(seq, token, now)

    llm.processor.process = failing
    good, bad = run_side_by_side(faulty.address)
    assert bad is not None and bad.code() == grpc.StatusCode.INTERNAL
    assert good == solo
    assert llm.blocks.num_used == 0 and not llm.has_work()  # the failed request gave its memory back


def test_a_fault_delivering_outputs_fails_only_its_request(faulty, solo):
    engine = faulty.server.engine
    route = engine._route

    def failing(out):
        if engine._calls[out.request_id].request.params.seed == POISON:
            raise RuntimeError("injected fault while delivering")
        return route(out)

    engine._route = failing
    good, bad = run_side_by_side(faulty.address)
    assert bad is not None and bad.code() == grpc.StatusCode.INTERNAL
    assert good == solo
    assert engine.alive


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def test_a_dead_engine_thread_fails_every_call_fast_and_reports_not_serving(faulty, wait_until):
    engine = faulty.server.engine
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert health(faulty.address) == SERVING and health(faulty.address, "liveness") == SERVING
    errors = {}

    def stream():
        with grpc.insecure_channel(faulty.address) as channel:
            try:
                for _ in pb_grpc.TokenwireStub(channel).Generate(request(1, max_new_tokens=3000)):  # no deadline
                    pass
            except grpc.RpcError as e:
                errors["stream"] = (e.code(), time.monotonic())

    thread = threading.Thread(target=stream)
    thread.start()
    assert wait_until(lambda: faulty.stats.generated_tokens > 2, 30)

    def broken():
        raise RuntimeError("injected fault outside any request")

    faulty.llm.expired = broken  # called by the engine thread on every iteration, outside the step
    died = time.monotonic()
    thread.join(10)
    assert not thread.is_alive(), "the in-flight call hangs"
    code, when = errors["stream"]
    assert code == grpc.StatusCode.UNAVAILABLE and when - died < 5
    assert not engine.alive
    assert wait_until(lambda: health(faulty.address) == NOT_SERVING, 5)
    assert health(faulty.address, "liveness") == NOT_SERVING  # so Kubernetes restarts the pod
    with grpc.insecure_channel(faulty.address) as channel:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.TokenwireStub(channel).Generate(request(2)))  # no deadline: it must not hang
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - start < 2


def test_shutdown_fails_what_is_still_pending(make_engine):
    engine = AsyncEngine(make_engine(kv_cache_tokens=1024, max_num_seqs=1))
    engine.start()

    async def call(max_new_tokens):
        params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)
        async for _ in engine.generate(EngineRequest(str(max_new_tokens), (1, 2, 3), params)):
            pass

    async def main():
        running = asyncio.ensure_future(call(3000))
        waiting = asyncio.ensure_future(call(3001))  # queued behind it (max_num_seqs=1)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(engine.shutdown)
        for task in (running, waiting):
            with pytest.raises(EngineUnavailable):
                await asyncio.wait_for(task, 5)  # failed, not left waiting
        with pytest.raises(EngineUnavailable):
            await call(1)  # later calls are turned away at once

    asyncio.run(main())
