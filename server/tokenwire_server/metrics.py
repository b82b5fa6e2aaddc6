"""Prometheus metrics: every definition and every recording, in one place.

One `Metrics` per server, on a registry of its own (several servers in one process never
clash). The engine reports to it as its observer (`on_request`, `on_step`, `on_token`,
`on_finish`, `on_score`, with plain values: the engine imports nothing from here); the RPC
layer through `on_rpc`. prometheus-client is thread-safe, so both threads record directly.
`stats` reads the same counters back: tests and operators see one source."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from .errors import ConfigError

# CPU serving: from milliseconds (a decode step of a small model) to tens of seconds (a long
# prompt behind a busy batch).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        # Per generated sequence (a request with n samples counts n times).
        self.ttft = Histogram("tokenwire_time_to_first_token_seconds",
                              "Arrival to the first generated token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tokenwire_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a sequence", buckets=ITL_BUCKETS,
                             registry=r)
        self.e2e = Histogram("tokenwire_e2e_request_latency_seconds",
                             "Arrival to the last token of a generation (not counting cancelled ones)",
                             buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("tokenwire_queue_time_seconds", "Arrival to first scheduled (generation and score)",
                               buckets=QUEUE_BUCKETS, registry=r)
        self.waiting = Gauge("tokenwire_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.running = Gauge("tokenwire_requests_running", "Sequences in the running batch", registry=r)
        self.batch_size = Gauge("tokenwire_batch_size", "Sequences in the last engine step (0 when idle)",
                                registry=r)
        self.kv_usage = Gauge("tokenwire_kv_cache_usage_ratio",
                              "Fraction of KV cache blocks held by sequences (0..1)", registry=r)
        self.prompt_tokens = Counter("tokenwire_prompt_tokens", "Prompt tokens admitted (generation and score)",
                                     registry=r)
        self.generation_tokens = Counter("tokenwire_generation_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("tokenwire_prefix_cache_hit_tokens",
                                     "Prompt tokens taken from the prefix cache instead of computed", registry=r)
        self.finished = Counter("tokenwire_requests_finished", "Generated sequences finished, by reason",
                                ["finish_reason"], registry=r)
        self.preemptions = Counter("tokenwire_preemptions", "Sequences preempted to free KV cache", registry=r)
        self.scored_items = Counter("tokenwire_scored_items", "Score items completed", registry=r)
        self.rpcs = Counter("tokenwire_requests", "Requests by protocol (grpc, http), method and final status code "
                            "(gRPC's names, for both protocols)", ["protocol", "method", "code"], registry=r)
        self.model = Info("tokenwire_model", "The model being served", registry=r)
        self._last_token: dict = {}  # (request id, sample) -> when its last token came; engine thread only
        self.stats = Stats(self)
        self._http = self._http_thread = None  # the /metrics server, when serving

    # ---- the engine (its observer) ----

    def on_request(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)  # n samples share one prompt: counted once

    def on_step(self, batch_size: int, kv_usage: float, waiting: int, running: int, preempted: int = 0) -> None:
        self.batch_size.set(batch_size)
        self.kv_usage.set(kv_usage)
        self.waiting.set(waiting)
        self.running.set(running)
        if preempted:
            self.preemptions.inc(preempted)

    def on_token(self, key, now: float, ttft: float | None = None, queue: float | None = None) -> None:
        """key: (request id, sample); ttft and queue come with a sample's first token."""
        self.generation_tokens.inc()
        if ttft is not None:
            self.ttft.observe(ttft)
        if queue is not None:
            self.queue.observe(queue)
        last = self._last_token.get(key)
        if last is not None:
            self.itl.observe(now - last)
        self._last_token[key] = now

    def on_finish(self, key, reason, e2e: float | None, cached_tokens: int) -> None:
        """A generated sample left the engine; reason None: it failed."""
        self._last_token.pop(key, None)
        self.cached_tokens.inc(cached_tokens)
        if reason is not None:
            self.finished.labels(finish_reason=reason.value).inc()
        if e2e is not None:
            self.e2e.observe(e2e)

    def on_score(self, queue: float, cached_tokens: int) -> None:
        self.scored_items.inc()
        self.queue.observe(queue)
        self.cached_tokens.inc(cached_tokens)

    # ---- the RPC layer ----

    def on_rpc(self, method: str, code: str, protocol: str = "grpc") -> None:
        self.rpcs.labels(protocol=protocol, method=method, code=code).inc()

    def set_model(self, name: str, architecture: str, dtype: str, device: str) -> None:
        self.model.info({"model": name, "architecture": architecture, "dtype": dtype, "device": device})

    # ---- exposition ----

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP on a daemon thread; returns the bound port (port 0: any free one)."""
        try:
            self._http, self._http_thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"--metrics-port {port}: cannot listen on {host}:{port} ({e.strerror})") from None
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http_thread.join(5)
            self._http = self._http_thread = None


class Stats:
    """The counters read back from the registry (what /metrics shows), by name."""

    def __init__(self, metrics: Metrics):
        self._registry = metrics.registry

    def _value(self, name: str, **labels) -> float:
        return self._registry.get_sample_value(name, labels) or 0.0

    waiting = property(lambda self: int(self._value("tokenwire_requests_waiting")))
    running = property(lambda self: int(self._value("tokenwire_requests_running")))
    generated_tokens = property(lambda self: int(self._value("tokenwire_generation_tokens_total")))
    prompt_tokens = property(lambda self: int(self._value("tokenwire_prompt_tokens_total")))
    cached_tokens = property(lambda self: int(self._value("tokenwire_prefix_cache_hit_tokens_total")))
    scored_items = property(lambda self: int(self._value("tokenwire_scored_items_total")))
    preemptions = property(lambda self: int(self._value("tokenwire_preemptions_total")))

    @property
    def finished(self) -> _Finished:
        """stats.finished[FinishReason.X]: generated sequences finished for that reason."""
        return _Finished(self)


class _Finished:
    def __init__(self, stats: Stats):
        self._stats = stats

    def __getitem__(self, reason) -> int:
        return int(self._stats._value("tokenwire_requests_finished_total", finish_reason=reason.value))
