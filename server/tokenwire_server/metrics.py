"""Prometheus metrics: every definition and every recording, in one place.

One `Metrics` per server, on a registry of its own (several servers in one process never
clash). The engine thread reports to it through `on_add`, `on_step`, `on_token` and
`on_finish` (the engine imports nothing from here); the RPC layer through `on_rpc`.
prometheus-client is thread-safe, so both threads record directly."""

from __future__ import annotations

import weakref

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
        self.rpcs = Counter("tokenwire_requests", "RPCs by method and final gRPC status code", ["method", "code"],
                            registry=r)
        self.model = Info("tokenwire_model", "The model being served", registry=r)
        self._last_token: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine thread only
        self._http = self._http_thread = None  # the /metrics server, when serving

    # ---- the engine thread ----

    def on_add(self, seq) -> None:
        if seq.parent is None:  # later samples share the first one's prompt
            self.prompt_tokens.inc(len(seq.prompt_ids))

    def on_step(self, batch_size: int, kv_usage: float, waiting: int, running: int, preempted: int = 0) -> None:
        self.batch_size.set(batch_size)
        self.kv_usage.set(kv_usage)
        self.waiting.set(waiting)
        self.running.set(running)
        if preempted:
            self.preemptions.inc(preempted)

    def on_token(self, seq, now: float) -> None:
        self.generation_tokens.inc()
        last = self._last_token.get(seq)
        if last is None:
            if seq.first_token is not None:
                self.ttft.observe(seq.first_token - seq.arrival)
            if seq.started is not None:
                self.queue.observe(seq.started - seq.arrival)
        else:
            self.itl.observe(now - last)
        self._last_token[seq] = now

    def on_finish(self, seq) -> None:
        self._last_token.pop(seq, None)
        self.cached_tokens.inc(seq.cached_tokens)
        if seq.score_from is not None:  # a score item: only its queue time
            if seq.started is not None:
                self.queue.observe(seq.started - seq.arrival)
            return
        if seq.finish_reason is None:
            return
        self.finished.labels(finish_reason=seq.finish_reason.value).inc()
        if seq.finish_reason.value != "cancelled" and seq.finished is not None:
            self.e2e.observe(seq.finished - seq.arrival)

    # ---- the RPC layer ----

    def on_rpc(self, method: str, code: str) -> None:
        self.rpcs.labels(method=method, code=code).inc()

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
