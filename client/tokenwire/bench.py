"""`tokenwire bench`: drive a running server and measure what users feel.

Time to first token, inter-token latency and end-to-end latency (p50/p90/p99), request and
token throughput, errors by status. Load is a fixed concurrency (closed loop) or a request
rate (open loop, Poisson arrivals).

Two protocols, one load loop and one report: tokenwire's gRPC API, or with protocol="http"
any OpenAI-compatible server (tokenwire's own HTTP API, llama.cpp's llama-server, vLLM) through
streamed POST /v1/completions. A protocol only tokenizes the prompts and runs one request;
the load, the timing and the figures are shared, so the two are measured the same way."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx

from .client import AsyncClient
from .errors import TokenwireError
from .types import Delta, Final

HEAD_TOKENS = 4  # random tokens that start each prompt
_random = random.Random()  # seeded afresh by each process: runs share no prompt
BASE_TEXT = ("The history of computing is a story of people who turned ideas about numbers, logic and "
             "language into machines. Early mechanical calculators gave way to electronic computers, "
             "then to personal computers, networks and phones that fit in a pocket. ")


class BenchError(Exception):
    """Nothing could be measured: the server is unreachable, lists no model, there are no prompts."""


class RequestFailed(BenchError):
    """One HTTP request failed. `name` is what Report.errors counts it under ("HTTP 503",
    "connection", "timeout"), as a gRPC failure is counted under its status name."""

    def __init__(self, name: str, detail: str = ""):
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name


@dataclass
class Sample:
    ttft: float  # seconds to the first generated token
    itl: list[float]  # seconds between consecutive tokens
    e2e: float
    output_tokens: int
    prompt_tokens: int


@dataclass
class Report:
    requests: int
    errors: dict[str, int]
    duration_s: float
    request_throughput: float  # completed requests per second
    output_tokens_per_s: float
    total_tokens_per_s: float  # prompt + output
    output_tokens: int  # summed over the completed requests
    prompt_tokens: int
    ttft_s: dict[str, float]
    itl_s: dict[str, float]
    e2e_s: dict[str, float]
    settings: dict = field(default_factory=dict)


@dataclass
class _Load:
    """What to send and how hard: the settings both protocols share."""
    concurrency: int
    rate: float | None
    prompt_tokens: int
    output_tokens: int
    requests: int | None
    duration: float | None
    warmup: int
    temperature: float
    prompts_file: str | None


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def pct(p):
        return v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))]

    return {"p50": statistics.median(v), "p90": pct(90), "p99": pct(99), "mean": statistics.fmean(v)}


# ---- shared: one request's clock, prompts, the load loop, the report ----

class _Stopwatch:
    """One request's timing, from the arrivals of the messages that carry generated tokens (a
    gRPC Delta, an SSE chunk): a message is what a user sees appear."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start
        self.gaps: list[float] = []
        self.messages = 0

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now - self.start
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.messages += 1

    def sample(self, output_tokens: int, prompt_tokens: int) -> Sample:
        return Sample(self.first or 0.0, self.gaps, time.perf_counter() - self.start, output_tokens, prompt_tokens)


async def _prompts(proto, prompt_tokens: int, count: int, prompts_file: str | None) -> list:
    """Prompts as token ids of exactly `prompt_tokens` tokens, through the server's own
    tokenizer, or the texts of a file, one per line. Each starts with a few tokens drawn at
    random, so that no two prompts, of this run or an earlier one, share a first cache block:
    the prefix cache does not flatter the numbers."""
    if prompts_file:
        try:
            with open(prompts_file) as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise BenchError(f"--prompts-file {prompts_file}: {e.strerror}") from None
        if not prompts:
            raise BenchError(f"--prompts-file {prompts_file}: no prompts in it")
        return prompts
    base = await proto.tokenize(BASE_TEXT * (prompt_tokens // 30 + 8))
    if base is None:
        print(f"note: the server has no tokenizer endpoint: sending text prompts of about {prompt_tokens} tokens "
              f"instead of exactly {prompt_tokens}", file=sys.stderr)
        return _text_prompts(prompt_tokens, count)
    vocab, head = sorted(set(base)), min(HEAD_TOKENS, prompt_tokens)
    out = []
    for i in range(count):
        start = (i * 13) % (len(base) - prompt_tokens)
        out.append([_random.choice(vocab) for _ in range(head)] + base[start:start + prompt_tokens - head])
    return out


def _text_prompts(prompt_tokens: int, count: int) -> list[str]:
    """Without the server's tokenizer: texts of about `prompt_tokens` tokens (English text
    runs about 4 tokens to 3 words), each starting at a different word."""
    words = BASE_TEXT.split()
    n = max(1, round(prompt_tokens * 3 / 4))
    cycle = words * (n // len(words) + 2)
    return [f"{_random.randrange(10**9)} " + " ".join(cycle[i % len(words):i % len(words) + n - 1])
            for i in range(count)]


class _Progress:
    def __init__(self, total: int | None, duration: float | None):
        self.total, self.duration, self.done, self.start = total, duration, 0, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.tokens = 0

    def tick(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        elapsed = time.monotonic() - self.start
        frac = self.done / self.total if self.total else min(1.0, elapsed / self.duration)
        line = (f"[{'#' * int(frac * 30):<30}] {self.done} requests, {elapsed:.0f}s, "
                f"{self.tokens / max(elapsed, 1e-9):.1f} output tok/s")
        if self.tty:
            sys.stderr.write("\r" + line)
        elif self.done % 10 == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


async def _measure(proto, pool: list, load: _Load, progress: bool) -> tuple[list[Sample], Counter, float]:
    """The measured part: (samples of the requests that completed, failures by name, seconds)."""
    samples: list[Sample] = []
    errors: Counter = Counter()
    bar = _Progress(load.requests, load.duration) if progress else None
    start = time.monotonic()
    issued = 0

    def more() -> bool:
        if load.requests is not None:
            return issued < load.requests
        return time.monotonic() - start < load.duration

    def next_prompt():
        nonlocal issued
        prompt = pool[issued % len(pool)]
        issued += 1
        return prompt

    async def one(prompt):
        tokens = 0
        try:
            s = await proto.send(prompt, load.output_tokens)
            samples.append(s)
            tokens = s.output_tokens
        except Exception as e:
            name = proto.failure(e)
            if name is None:  # not the server's answer but a bug here: let it show
                raise
            errors[name] += 1
        if bar:
            bar.tick(tokens)

    if load.rate is None:  # closed loop: each worker sends its next request when its last one ends
        async def worker():
            while more():
                await one(next_prompt())
        await asyncio.gather(*(worker() for _ in range(load.concurrency)))
    else:  # open loop: arrivals do not wait for answers, as independent users' do not
        tasks = []
        while more():
            tasks.append(asyncio.ensure_future(one(next_prompt())))
            await asyncio.sleep(random.expovariate(load.rate))
        await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    if bar:
        bar.close()
    return samples, errors, elapsed


async def _bench(proto, load: _Load, settings: dict, progress: bool) -> Report:
    pool = await _prompts(proto, load.prompt_tokens, max(load.requests or 0, 512), load.prompts_file)
    for i in range(load.warmup):  # compile paths, fill caches: not measured; a failure here stops the bench
        try:
            await proto.send(pool[(-1 - i) % len(pool)], min(load.output_tokens, 8))
        except RequestFailed as e:
            raise BenchError(f"warmup request failed: {e}") from None
    samples, errors, elapsed = await _measure(proto, pool, load, progress)
    elapsed = max(elapsed, 1e-9)
    out_tokens = sum(s.output_tokens for s in samples)
    in_tokens = sum(s.prompt_tokens for s in samples)
    return Report(
        requests=len(samples), errors=dict(errors), duration_s=elapsed,
        request_throughput=len(samples) / elapsed, output_tokens_per_s=out_tokens / elapsed,
        total_tokens_per_s=(out_tokens + in_tokens) / elapsed, output_tokens=out_tokens, prompt_tokens=in_tokens,
        ttft_s=percentiles([s.ttft for s in samples]),
        itl_s=percentiles([g for s in samples for g in s.itl]),
        e2e_s=percentiles([s.e2e for s in samples]),
        settings={**settings, **asdict(load)})


# ---- the protocols: each has tokenize(text) -> ids (None: no tokenizer), send(prompt,
# output_tokens) -> Sample, and failure(exception) -> the name Report.errors counts it under ----

class _Grpc:
    """tokenwire's own API: one GenerateStream a request."""

    def __init__(self, client: AsyncClient, temperature: float):
        self.client, self.temperature = client, temperature

    async def tokenize(self, text: str) -> list[int]:
        return (await self.client.tokenize(text))[0].ids

    async def send(self, prompt, output_tokens: int) -> Sample:
        kwargs = dict(max_new_tokens=output_tokens, ignore_eos=True, temperature=self.temperature)
        if isinstance(prompt, str):
            kwargs["prompt"] = prompt
        else:
            kwargs["token_ids"] = prompt
        watch = _Stopwatch()
        tokens, prompt_count = 0, 0
        async for event in self.client.generate_stream(**kwargs):
            if isinstance(event, Delta):
                watch.token()
                tokens += len(event.tokens)
            elif isinstance(event, Final):
                prompt_count = event.usage.prompt_tokens
        return watch.sample(tokens, prompt_count)

    @staticmethod
    def failure(e: Exception) -> str | None:
        """The name a failed request is counted under; None: not the server's answer."""
        return e.code.name if isinstance(e, TokenwireError) else None


def api_root(url: str) -> str:
    """The server's root from the API base given: http://h:8000/v1, http://h:8000/v1/ and
    http://h:8000 all give http://h:8000. Completions are under <root>/v1, but vLLM's and
    llama-server's /tokenize (and tokenwire's) sit at the root."""
    root = url.strip().rstrip("/")
    if root.endswith("/v1"):
        root = root[:-len("/v1")]
    return root if "://" in root else "http://" + root


def _why(e: Exception) -> str:
    return str(e) or type(e).__name__  # (some httpx errors have no message)


def _http_client(api_key: str | None, timeout: float) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # No cap on connections: the bench sets the concurrency itself, and httpx's default pool of
    # 100 would queue requests in the client, where the wait would pass for time to first token.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits)


async def _first_model(http: httpx.AsyncClient, root: str) -> str:
    url = root + "/v1/models"
    try:
        response = await http.get(url)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {url}: {_why(e)}") from None
    if response.status_code != 200:
        raise BenchError(f"GET {url}: HTTP {response.status_code}: {response.text[:300]}")
    try:
        return response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"GET {url} lists no model: name one with --model") from None


def _carries_token(chunk: dict) -> bool:
    """Whether an SSE chunk delivers generated output: a choice with text, or one not yet
    finished (a token that ends mid-character has empty text). llama-server closes with a chunk
    of empty text, the finish reason and the usage: that one is no token."""
    return any(c.get("text") or c.get("finish_reason") is None for c in chunk.get("choices") or ())


class _Http:
    """Any OpenAI-compatible server: one streamed POST /v1/completions a request."""

    def __init__(self, http: httpx.AsyncClient, root: str, model: str, temperature: float, timeout: float):
        self.http, self.root, self.model = http, root, model
        self.temperature, self.timeout = temperature, timeout

    async def tokenize(self, text: str) -> list[int] | None:
        """Token ids from the server's tokenizer: vLLM's and tokenwire's request shape first, then
        llama-server's (which answers the first with no tokens). None when neither works."""
        for body in ({"model": self.model, "prompt": text, "add_special_tokens": False}, {"content": text}):
            try:
                response = await self.http.post(self.root + "/tokenize", json=body)
            except httpx.HTTPError as e:
                raise BenchError(f"cannot reach {self.root}/tokenize: {_why(e)}") from None
            try:
                tokens = response.json().get("tokens") if response.status_code == 200 else None
            except (ValueError, AttributeError):
                tokens = None
            if tokens and all(isinstance(t, int) for t in tokens):
                return tokens
        return None

    async def send(self, prompt, output_tokens: int) -> Sample:
        body = {"model": self.model, "prompt": prompt, "max_tokens": output_tokens, "temperature": self.temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        try:
            # (httpx's timeout bounds each read; this bounds the whole request, as a gRPC deadline does)
            return await asyncio.wait_for(self._stream(body, prompt), self.timeout)
        except asyncio.TimeoutError:
            raise RequestFailed("timeout", f"not done after {self.timeout}s") from None
        except httpx.TimeoutException as e:
            raise RequestFailed("timeout", _why(e)) from None
        except httpx.TransportError as e:  # refused, reset, closed mid-stream
            raise RequestFailed("connection", _why(e)) from None
        except httpx.HTTPError as e:
            raise RequestFailed("bad response", _why(e)) from None

    async def _stream(self, body: dict, prompt) -> Sample:
        watch = _Stopwatch()
        usage = None
        async with self.http.stream("POST", self.root + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread())[:300].decode("utf-8", "replace")
                raise RequestFailed(f"HTTP {response.status_code}", detail)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = _chunk(data)
                if _carries_token(chunk):
                    watch.token()
                usage = chunk.get("usage") or usage
        usage = usage or {}
        # The server's counts when it gives them (vLLM may put several tokens in one chunk), else
        # one token a chunk, and the prompt as sent (a text's length in tokens is unknown here).
        output = usage.get("completion_tokens")
        prompt_count = usage.get("prompt_tokens")
        return watch.sample(watch.messages if output is None else output,
                            (len(prompt) if isinstance(prompt, list) else 0) if prompt_count is None else prompt_count)

    @staticmethod
    def failure(e: Exception) -> str | None:
        """The name a failed request is counted under; None: not the server's answer."""
        return e.name if isinstance(e, RequestFailed) else None


def _chunk(data: str) -> dict:
    """One SSE event's JSON. An error after the stream began comes as an event of its own."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise RequestFailed("bad response", f"not JSON: {data[:100]}") from None
    if not isinstance(chunk, dict):
        raise RequestFailed("bad response", f"not a JSON object: {data[:100]}")
    error = chunk.get("error")
    if error is not None:
        code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
        raise RequestFailed(f"stream error {code}" if code else "stream error", str(error)[:300])
    return chunk


# ---- entry point ----

async def run(target: str | list[str], *, concurrency: int = 1, rate: float | None = None, prompt_tokens: int = 128,
              output_tokens: int = 128, requests: int | None = None, duration: float | None = None,
              warmup: int = 2, temperature: float = 0.0, prompts_file: str | None = None,
              timeout: float = 600.0, progress: bool = True, client_options: dict | None = None,
              protocol: str = "grpc", model: str | None = None) -> Report:
    """Load `target` and measure it.

    protocol "grpc": target is a tokenwire address, several (balanced) or a grpc target;
    client_options are AsyncClient keyword arguments (api_key, TLS certificates).
    protocol "http": target is an OpenAI-compatible API's base URL (http://host:8000/v1, the /v1
    optional); model defaults to the first the server lists; of client_options only api_key is
    used (sent as 'Authorization: Bearer').
    timeout: seconds for one request. Raises BenchError when nothing could be measured."""
    if requests is None and duration is None:
        requests = max(4 * concurrency, 8)
    load = _Load(concurrency, rate, prompt_tokens, output_tokens, requests, duration, warmup, temperature, prompts_file)
    if protocol == "grpc":
        async with AsyncClient(target, timeout=timeout, **(client_options or {})) as client:
            return await _bench(_Grpc(client, temperature), load, dict(protocol="grpc", target=target), progress)
    if protocol == "http":
        root = api_root(target)
        async with _http_client((client_options or {}).get("api_key"), timeout) as http:
            model = model or await _first_model(http, root)
            return await _bench(_Http(http, root, model, temperature, timeout), load,
                                dict(protocol="http", target=root + "/v1", model=model), progress)
    raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")


def format_report(r: Report) -> str:
    target = " ".join(str(r.settings[k]) for k in ("protocol", "target", "model") if r.settings.get(k))
    lines = [f"{r.requests} requests in {r.duration_s:.1f}s "
             f"(concurrency {r.settings['concurrency'] if r.settings.get('rate') is None else '-'}, "
             f"rate {r.settings.get('rate') or '-'}, {r.settings['prompt_tokens']} prompt / "
             f"{r.settings['output_tokens']} output tokens)" + (f" against {target}" if target else ""),
             f"  throughput: {r.request_throughput:.2f} req/s, {r.output_tokens_per_s:.1f} output tok/s, "
             f"{r.total_tokens_per_s:.1f} total tok/s",
             f"  errors: {r.errors or 'none'}",
             f"  {'':<22}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}"]
    for name, d in (("time to first token s", r.ttft_s), ("inter-token latency s", r.itl_s),
                    ("end-to-end latency s", r.e2e_s)):
        if d:
            lines.append(f"  {name:<22}" + "".join(f"{d[k]:>9.3f}" for k in ("p50", "p90", "p99", "mean")))
    return "\n".join(lines)


def report_dict(r: Report) -> dict:
    return asdict(r)
