"""The gRPC server: the Tokenwire service, standard health and reflection, lifecycle."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

from .api.servicer import SERVICE_NAME, TokenwireServicer
from .engine import LLMEngine, SamplingParams
from .engine.llm_engine import EngineConfig
from .engine.async_engine import AsyncEngine
from .limits import Limits
from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_RECEIVE_BYTES = 8 * 2**20
MAX_SEND_BYTES = 64 * 2**20


class TokenwireServer:
    """Starts serving health (NOT_SERVING) at once; serves the model once one is attached."""

    def __init__(self, host: str = "127.0.0.1", port: int = 50051, limits: Limits = Limits(),
                 metrics_port: int | None = None, log_prompts: bool = False):
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                                               ("grpc.max_send_message_length", MAX_SEND_BYTES)])
        self.host = host
        # Recorded always; served over HTTP at /metrics on metrics_port (None: not served; 0: any
        # free port). Once started, metrics_port is the bound port.
        self.metrics = Metrics()
        self.metrics_port = metrics_port
        self.servicer = TokenwireServicer(limits, self.metrics, log_prompts)
        pb_grpc.add_TokenwireServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.engine: AsyncEngine | None = None

    async def start(self) -> int:
        if self.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.metrics_port, self.host)
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        return self.port

    async def attach(self, engine: LLMEngine) -> None:
        """Start serving this engine and report SERVING."""
        self.engine = AsyncEngine(engine, self.servicer.limits, self.metrics)
        self.metrics.set_model(engine.name, engine.config.architecture,
                               str(engine.runner.dtype).removeprefix("torch."), str(engine.runner.device))
        self.engine.start()
        self.servicer.attach(self.engine)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = 5.0) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        await asyncio.to_thread(self.metrics.close)

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


def warm_up(engine: LLMEngine) -> None:
    """One short generation, so the first request does not pay for lazy initialisation."""
    ids = engine.tokenizer.encode("Hello")
    for _ in engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)):
        pass


async def serve(model_path, *, host: str, port: int, dtype: str, device: str, name: str,
                limits: Limits, engine_config: EngineConfig, grace: float = 10.0,
                metrics_port: int | None = None, log_prompts: bool = False) -> None:
    server = TokenwireServer(host, port, limits, metrics_port=metrics_port, log_prompts=log_prompts)
    bound = await server.start()
    log.info("listening on %s:%d (health NOT_SERVING while the model loads)", host, bound)
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", host, server.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def load() -> LLMEngine:
        engine = LLMEngine.from_checkpoint(model_path, dtype=dtype, device=device, name=name, config=engine_config)
        warm_up(engine)
        return engine

    loading = asyncio.ensure_future(asyncio.to_thread(load))
    await asyncio.wait([loading, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        engine = loading.result()
        await server.attach(engine)
        log.info("serving %s (%s, %s on %s) on port %d", engine.name, engine.config.architecture,
                 engine.runner.dtype, engine.runner.device, bound)
        await stop.wait()
    log.info("shutting down: finishing streams in flight (up to %.0fs)", grace)
    await server.stop(grace)
