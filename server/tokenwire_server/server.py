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
from .errors import ConfigError
from .limits import Limits
from .metrics import Metrics
from .security import ApiKeyInterceptor

log = logging.getLogger(__name__)

MAX_RECEIVE_BYTES = 8 * 2**20
MAX_SEND_BYTES = 64 * 2**20
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                # A second server on a taken port must fail, not silently share its traffic.
                ("grpc.so_reuseport", 0)]


# Health: "" and the Tokenwire service report readiness (NOT_SERVING until the model has loaded
# and warmed up, and again once a drain starts); "liveness" is SERVING while the process runs.
READINESS_SERVICES = ("", SERVICE_NAME)
LIVENESS_SERVICE = "liveness"
HEALTH_METHODS = "/grpc.health.v1.Health/"


class TokenwireServer:
    """Starts serving health (NOT_SERVING) at once; serves the model once one is attached.

    credentials: TLS (security.server_credentials) for the main port; api_keys: required from
    every caller but health; health_port: a second, plaintext port serving health alone (the
    kubelet's gRPC probes cannot speak TLS); metrics_port: /metrics over HTTP (None: not served,
    0: any free port; once started, the bound port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 50051, limits: Limits = Limits(),
                 metrics_port: int | None = None, log_prompts: bool = False,
                 credentials: grpc.ServerCredentials | None = None, api_keys: frozenset[str] = frozenset(),
                 health_port: int | None = None):
        self.host = host
        self.metrics = Metrics()  # recorded always, whether or not it is served
        self.metrics_port = metrics_port
        interceptors = []
        if api_keys:
            interceptors.append(ApiKeyInterceptor(api_keys, self._denied))
        self.server = grpc.aio.server(interceptors=interceptors, options=GRPC_OPTIONS)
        self.servicer = TokenwireServicer(limits, self.metrics, log_prompts)
        pb_grpc.add_TokenwireServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server)
        self.port = _bind(self.server, host, port, "--port", credentials)
        self.health_server: grpc.aio.Server | None = None
        self.health_port = health_port
        if health_port is not None:
            self.health_server = grpc.aio.server(options=GRPC_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = _bind(self.health_server, host, health_port, "--health-port")
        self.engine: AsyncEngine | None = None

    async def start(self) -> int:
        if self.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.metrics_port, self.host)
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        return self.port

    async def attach(self, engine: LLMEngine) -> None:
        """Start serving this engine and report SERVING."""
        self.engine = AsyncEngine(engine, self.servicer.limits, self.metrics)
        self.metrics.set_model(engine.name, engine.config.architecture,
                               str(engine.runner.dtype).removeprefix("torch."), str(engine.runner.device))
        self.engine.start()
        self.servicer.attach(self.engine)
        await self._set_readiness(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown (SIGTERM): readiness NOT_SERVING and new calls UNAVAILABLE at once;
        calls in flight get up to `timeout` seconds to finish; then everything stops."""
        self.servicer.draining = True
        await self.stop(timeout)

    async def stop(self, grace: float | None = 5.0) -> None:
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)  # refuses new calls; waits for those in flight up to grace
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        await asyncio.to_thread(self.metrics.close)

    async def _set_readiness(self, status) -> None:
        for name in READINESS_SERVICES:
            await self.health.set(name, status)

    def _denied(self, method: str) -> None:
        service, _, name = method.lstrip("/").partition("/")
        if service == SERVICE_NAME:
            self.metrics.on_rpc(name, "UNAUTHENTICATED")
        log.info("denied %s: missing or unknown API key", method)


def _bind(server: grpc.aio.Server, host: str, port: int, flag: str,
          credentials: grpc.ServerCredentials | None = None) -> int:
    address = f"{host}:{port}"
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError as e:  # grpc's "Failed to bind": the port is taken or the host is not ours
        raise ConfigError(f"{flag} {port}: cannot listen on {address} ({e})") from None


def warm_up(engine: LLMEngine) -> None:
    """One short generation, so the first request does not pay for lazy initialisation."""
    ids = engine.tokenizer.encode("Hello")
    for _ in engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)):
        pass


async def serve(model_path, *, host: str, port: int, dtype: str, device: str, name: str,
                limits: Limits, engine_config: EngineConfig, drain_timeout: float = 30.0, **options) -> None:
    """Run until SIGTERM or SIGINT, then drain (a second signal stops at once).
    options: TokenwireServer's (metrics_port, health_port, credentials, api_keys, log_prompts)."""
    server = TokenwireServer(host, port, limits, **options)
    bound = await server.start()
    log.info("listening on %s:%d%s (health NOT_SERVING while the model loads)", host, bound,
             " with TLS" if options.get("credentials") else "")
    if server.health_port is not None:
        log.info("health alone, in plaintext, on %s:%d", host, server.health_port)
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", host, server.metrics_port)
    signals = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)

    def load() -> LLMEngine:
        engine = LLMEngine.from_checkpoint(model_path, dtype=dtype, device=device, name=name, config=engine_config)
        warm_up(engine)
        return engine

    loading = asyncio.ensure_future(asyncio.to_thread(load))
    first_signal = asyncio.ensure_future(signals.get())
    await asyncio.wait([loading, first_signal], return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        engine = loading.result()
        await server.attach(engine)
        log.info("serving %s (%s, %s on %s) on port %d", engine.name, engine.config.architecture,
                 engine.runner.dtype, engine.runner.device, bound)
    sig = await first_signal
    log.info("%s: draining (readiness NOT_SERVING, new calls UNAVAILABLE, up to %gs for calls in flight)",
             signal.Signals(sig).name, drain_timeout)

    async def force_on_second_signal():
        sig = await signals.get()
        log.warning("%s again: stopping now", signal.Signals(sig).name)
        await server.server.stop(0)

    forcing = asyncio.ensure_future(force_on_second_signal())
    await server.drain(drain_timeout)
    forcing.cancel()
    log.info("stopped")
