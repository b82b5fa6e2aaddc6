"""The gRPC server: the Tokenwire service, standard health and reflection, lifecycle."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api import handlers
from .api.http import HttpApi
from .api.servicer import SERVICE_NAME, TokenwireServicer
from .engine import LLMEngine, SamplingParams
from .engine.llm_engine import EngineConfig
from .engine.async_engine import AsyncEngine
from .errors import ConfigError
from .limits import MAX_RECEIVE_BYTES, MAX_SEND_BYTES, Limits
from .metrics import Metrics
from .security import ApiKeyInterceptor

log = logging.getLogger(__name__)

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
    0: any free port; once started, the bound port); http_port: the OpenAI-compatible HTTP API
    (api/http.py; None: not served, 0: any free port), with http_tls the TLS files behind
    `credentials` (cert, key, client CA or None)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 50051, limits: Limits = Limits(),
                 metrics_port: int | None = None, log_prompts: bool = False,
                 credentials: grpc.ServerCredentials | None = None, api_keys: frozenset[str] = frozenset(),
                 health_port: int | None = None, http_port: int | None = None, http_tls: tuple | None = None):
        self.host = host
        self.metrics = Metrics()  # recorded always, whether or not it is served
        self.metrics_port = metrics_port
        interceptors = []
        if api_keys:
            interceptors.append(ApiKeyInterceptor(api_keys, self._denied))
        self.server = grpc.aio.server(interceptors=interceptors, options=GRPC_OPTIONS)
        self.servicer = TokenwireServicer(limits, self.metrics, log_prompts)
        handlers.add_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server)
        self.port = _bind(self.server, host, port, "--port", credentials)
        # The health port is served by a sync server on threads of its own, with its own health
        # servicer (kept in step by _set_health): it answers even while the event loop is busy.
        self.health_server: grpc.Server | None = None
        self.thread_health = health.HealthServicer()
        self.health_port = health_port
        if health_port is not None:
            self.health_server = grpc.server(ThreadPoolExecutor(2, thread_name_prefix="tokenwire-health"),
                                             options=GRPC_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.thread_health, self.health_server)
            self.health_port = _bind(self.health_server, host, health_port, "--health-port")
        self.engine: AsyncEngine | None = None
        self.http = HttpApi(self.servicer, api_keys, http_tls) if http_port is not None else None
        self.http_port = http_port

    async def start(self) -> int:
        if self.http is not None:  # first: a taken port fails before anything else starts
            self.http_port = await self.http.start(self.host, self.http_port)
        if self.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.metrics_port, self.host)
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._set_health(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        return self.port

    async def attach(self, engine: LLMEngine) -> None:
        """Start serving this engine and report SERVING."""
        # What is alive now (modules, model, tokenizer) lives as long as the server: frozen out of
        # the collector's scans, a full collection takes a millisecond instead of ~0.4 s, during
        # which it holds the GIL and so stalls every thread (event loop, engine).
        gc.freeze()
        loop = asyncio.get_running_loop()
        engine.observer = self.metrics
        self.engine = AsyncEngine(engine, on_death=lambda _: loop.call_soon_threadsafe(self._engine_died))
        self.metrics.set_model(engine.name, engine.config.architecture,
                               str(engine.runner.dtype).removeprefix("torch."), str(engine.runner.device))
        self.engine.start()
        await asyncio.to_thread(self.servicer.attach, self.engine)
        await self._set_readiness(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown (SIGTERM): readiness NOT_SERVING and new calls UNAVAILABLE at once;
        calls in flight get up to `timeout` seconds to finish; then everything stops."""
        self.servicer.draining = True
        await self.stop(timeout)

    async def stop(self, grace: float | None = 5.0) -> None:
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING)
        http = self.http.stop(grace) if self.http is not None else asyncio.sleep(0)
        await asyncio.gather(self.server.stop(grace), http)  # refuse new calls; wait for those in flight up to grace
        await self._set_health(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.health_server is not None:
            await asyncio.to_thread(self.health_server.stop(0).wait)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        self.servicer.close()
        await asyncio.to_thread(self.metrics.close)

    def _engine_died(self) -> None:
        """The engine thread is gone (its calls failed with UNAVAILABLE): report NOT_SERVING on
        readiness and liveness, so the pod is restarted."""
        asyncio.ensure_future(self._set_not_serving())

    async def _set_not_serving(self) -> None:
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._set_health(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_readiness(self, status) -> None:
        for name in READINESS_SERVICES:
            await self._set_health(name, status)

    async def _set_health(self, service: str, status) -> None:
        """The one way to change a health status: both servicers (main port, health port) agree."""
        self.thread_health.set(service, status)
        await self.health.set(service, status)

    def _denied(self, method: str) -> None:
        service, _, name = method.lstrip("/").partition("/")
        if service == SERVICE_NAME:
            self.metrics.on_rpc(name, "UNAUTHENTICATED", "grpc")
        log.info("denied %s: missing or unknown API key", method)


def _bind(server: grpc.aio.Server | grpc.Server, host: str, port: int, flag: str,
          credentials: grpc.ServerCredentials | None = None) -> int:
    address = f"{host}:{port}"
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError as e:  # grpc's "Failed to bind": the port is taken or the host is not ours
        raise ConfigError(f"{flag} {port}: cannot listen on {address} ({e})") from None


def warm_up(engine: LLMEngine) -> None:
    """One short generation, so the first request does not pay for lazy initialisation
    (constrained: structured output's tokenizer takes 0.15 s to build, and its threads start)."""
    ids = engine.tokenizer.encode("Hello")
    constraint = engine.constraints.compile("regex", "[a-z ]{1,12}")
    for _ in engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True,
                                                 constraint=constraint)):
        pass


async def serve(model_path, *, host: str, port: int, dtype: str, device: str, name: str,
                limits: Limits, engine_config: EngineConfig, drain_timeout: float = 30.0, **options) -> None:
    """Run until SIGTERM or SIGINT, then drain (a second signal stops at once).
    options: TokenwireServer's (metrics_port, health_port, credentials, api_keys, log_prompts)."""
    signals = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the ports open: once health answers, SIGTERM drains
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    server = TokenwireServer(host, port, limits, **options)
    bound = await server.start()
    log.info("listening on %s:%d%s (health NOT_SERVING while the model loads)", host, bound,
             " with TLS" if options.get("credentials") else "")
    if server.health_port is not None:
        log.info("health alone, in plaintext, on %s:%d", host, server.health_port)
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", host, server.metrics_port)
    if server.http_port is not None:
        log.info("OpenAI-compatible HTTP on %s://%s:%d/v1", "https" if options.get("http_tls") else "http", host,
                 server.http_port)

    loading = _load_in_background(loop, model_path, dtype=dtype, device=device, name=name, config=engine_config)
    first_signal = asyncio.ensure_future(signals.get())
    await asyncio.wait([loading, first_signal], return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        if loading.exception() is not None:
            await server.stop(0)  # closed here, while the loop runs (not noisily at exit)
            raise loading.exception()
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
    if not loading.done():
        # A thread cannot be stopped, and the load may take minutes: leave now, without it.
        log.info("stopped (while the model was loading)")
        logging.shutdown()
        os._exit(0)
    log.info("stopped")


def _load_in_background(loop: asyncio.AbstractEventLoop, model_path, **options) -> asyncio.Future:
    """Load and warm up the engine on a daemon thread of our own (asyncio.to_thread's pool would
    make the process wait for it at exit); the future holds the engine or the load's error."""
    done = loop.create_future()

    def settle(engine, error) -> None:
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(engine)

    def load() -> None:
        engine, error = None, None
        try:
            engine = LLMEngine.from_checkpoint(model_path, **options)
            warm_up(engine)
        except BaseException as e:  # handed to serve(), which raises it
            error = e
        try:
            loop.call_soon_threadsafe(settle, engine, error)
        except RuntimeError:  # the loop has closed: nobody waits for this engine any more
            pass

    threading.Thread(target=load, name="tokenwire-load", daemon=True).start()
    return done
