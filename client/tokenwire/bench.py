"""`tokenwire bench`: drive a running server over gRPC and measure what users feel.

Time to first token, inter-token latency and end-to-end latency (p50/p90/p99), request and
token throughput, errors by status. Load is a fixed concurrency (closed loop) or a request
rate (open loop, Poisson arrivals)."""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from .client import AsyncClient
from .errors import TokenwireError
from .types import Delta, Final

BASE_TEXT = ("The history of computing is a story of people who turned ideas about numbers, logic and "
             "language into machines. Early mechanical calculators gave way to electronic computers, "
             "then to personal computers, networks and phones that fit in a pocket. ")


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
    ttft_s: dict[str, float]
    itl_s: dict[str, float]
    e2e_s: dict[str, float]
    settings: dict = field(default_factory=dict)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def pct(p):
        return v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))]

    return {"p50": statistics.median(v), "p90": pct(90), "p99": pct(99), "mean": statistics.fmean(v)}


async def _prompts(client: AsyncClient, prompt_tokens: int, count: int, prompts_file: str | None) -> list:
    """Prompts as token ids of exactly `prompt_tokens` tokens (each different, so the prefix
    cache does not flatter the numbers), or the texts of a file, one per line."""
    if prompts_file:
        with open(prompts_file) as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    base = (await client.tokenize(BASE_TEXT * (prompt_tokens // 30 + 8)))[0].ids
    out = []
    for i in range(count):
        start = (i * 13) % (len(base) - prompt_tokens)
        out.append(base[start:start + prompt_tokens])
    return out


async def _one(client: AsyncClient, prompt, output_tokens: int, temperature: float) -> Sample:
    kwargs = dict(max_new_tokens=output_tokens, ignore_eos=True, temperature=temperature)
    if isinstance(prompt, str):
        kwargs["prompt"] = prompt
    else:
        kwargs["token_ids"] = prompt
    start = time.perf_counter()
    last, first, gaps, tokens, prompt_count = None, None, [], 0, 0
    async for event in client.generate_stream(**kwargs):
        now = time.perf_counter()
        if isinstance(event, Delta):
            tokens += len(event.tokens)
            if first is None:
                first = now - start
            else:
                gaps.append(now - last)
            last = now
        elif isinstance(event, Final):
            prompt_count = event.usage.prompt_tokens
    return Sample(first or 0.0, gaps, time.perf_counter() - start, tokens, prompt_count)


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


async def run(target: str | list[str], *, concurrency: int = 1, rate: float | None = None, prompt_tokens: int = 128,
              output_tokens: int = 128, requests: int | None = None, duration: float | None = None,
              warmup: int = 2, temperature: float = 0.0, prompts_file: str | None = None,
              timeout: float = 600.0, progress: bool = True, client_options: dict | None = None) -> Report:
    """client_options: AsyncClient keyword arguments (api_key, TLS certificates)."""
    if requests is None and duration is None:
        requests = max(4 * concurrency, 8)
    settings = dict(target=target, concurrency=concurrency, rate=rate, prompt_tokens=prompt_tokens,
                    output_tokens=output_tokens, requests=requests, duration=duration, warmup=warmup,
                    temperature=temperature, prompts_file=prompts_file)
    async with AsyncClient(target, timeout=timeout, **(client_options or {})) as client:
        pool = await _prompts(client, prompt_tokens, max(requests or 0, 512), prompts_file)
        for i in range(warmup):  # compile paths, fill caches: not measured
            await _one(client, pool[-1 - i], min(output_tokens, 8), temperature)
        samples: list[Sample] = []
        errors: Counter = Counter()
        bar = _Progress(requests, duration) if progress else None
        start = time.monotonic()
        issued = 0

        def more() -> bool:
            if requests is not None:
                return issued < requests
            return time.monotonic() - start < duration

        async def one(prompt):
            try:
                s = await _one(client, prompt, output_tokens, temperature)
                samples.append(s)
                tokens = s.output_tokens
            except TokenwireError as e:
                errors[e.code.name] += 1
                tokens = 0
            if bar:
                bar.tick(tokens)

        if rate is None:
            async def worker():
                nonlocal issued
                while more():
                    prompt = pool[issued % len(pool)]
                    issued += 1
                    await one(prompt)
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            tasks = []
            while more():
                tasks.append(asyncio.ensure_future(one(pool[issued % len(pool)])))
                issued += 1
                await asyncio.sleep(random.expovariate(rate))
            await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
        if bar:
            bar.close()
    out_tokens = sum(s.output_tokens for s in samples)
    in_tokens = sum(s.prompt_tokens for s in samples)
    return Report(
        requests=len(samples), errors=dict(errors), duration_s=elapsed,
        request_throughput=len(samples) / elapsed, output_tokens_per_s=out_tokens / elapsed,
        total_tokens_per_s=(out_tokens + in_tokens) / elapsed,
        ttft_s=percentiles([s.ttft for s in samples]),
        itl_s=percentiles([g for s in samples for g in s.itl]),
        e2e_s=percentiles([s.e2e for s in samples]), settings=settings)


def format_report(r: Report) -> str:
    lines = [f"{r.requests} requests in {r.duration_s:.1f}s "
             f"(concurrency {r.settings['concurrency'] if r.settings.get('rate') is None else '-'}, "
             f"rate {r.settings.get('rate') or '-'}, {r.settings['prompt_tokens']} prompt / "
             f"{r.settings['output_tokens']} output tokens)",
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
