"""Where a decode step's time goes, at batch 1 and batch 32: the engine as the server runs it
(default model, bfloat16, 4-bit layers for small steps), B sequences decoding together.

    .venv/bin/python tests/benchmarks/step_profile.py [--batches 1 32] [--steps 40] [--top 15] [--compile-max-rows 64]

Prints, per batch size: the median step time and its parts (schedule, model, sample, the
rest of the engine's bookkeeping), then torch.profiler's operators by self CPU time over a
few steps."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tokenwire_server import registry
from tokenwire_server.engine import EngineRequest, LLMEngine, SamplingParams
from tokenwire_server.engine.llm_engine import EngineConfig


class Timed:
    """Wraps a callable and keeps how long each call took."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.times.append(time.perf_counter() - start)


def decoding_engine(path, batch: int, dtype: str, compile_max_rows: int = 0) -> LLMEngine:
    engine = LLMEngine.from_checkpoint(path, dtype=dtype, device="cpu",
                                       config=EngineConfig(kv_cache_tokens=65536, prefix_caching=False,
                                                           compile_max_rows=compile_max_rows))
    for i in range(batch):
        prompt = engine.tokenizer.encode(f"Request {i}: tell me a long story about the sea and the sky.")
        engine.add_request(EngineRequest(str(i), tuple(prompt), SamplingParams(
            temperature=0, max_new_tokens=10_000, ignore_eos=True)))
    while any(not s.num_computed >= len(s.prompt_ids) for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill
    return engine


def measure(engine: LLMEngine, steps: int) -> dict:
    runner, sampler, scheduler = engine.runner, engine.sampler, engine.scheduler
    parts = {"model": Timed(runner.execute), "sample": Timed(sampler.__call__), "schedule": Timed(scheduler.schedule)}
    runner.execute, scheduler.schedule = parts["model"], parts["schedule"]
    engine.sampler = parts["sample"]
    totals = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        totals.append(time.perf_counter() - start)
    runner.execute, scheduler.schedule, engine.sampler = parts["model"].fn, parts["schedule"].fn, sampler
    out = {"step": statistics.median(totals)}
    out.update({k: statistics.median(v.times) for k, v in parts.items()})
    out["rest"] = out["step"] - out["model"] - out["sample"] - out["schedule"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile-max-rows", type=int, default=64, help="as the server's flag (0: eager steps)")
    args = ap.parse_args()
    path = registry.resolve(registry.DEFAULT_MODEL)
    for batch in args.batches:
        engine = decoding_engine(path, batch, args.dtype, args.compile_max_rows)
        measure(engine, 5)  # warm
        t = measure(engine, args.steps)
        print(f"\n== batch {batch}: step {t['step'] * 1e3:.2f} ms ({batch / t['step']:.1f} tok/s): model "
              f"{t['model'] * 1e3:.2f}, sample {t['sample'] * 1e3:.2f}, schedule {t['schedule'] * 1e3:.2f}, "
              f"rest {t['rest'] * 1e3:.2f} ms (medians of {args.steps} steps, {torch.get_num_threads()} threads)")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        del engine


if __name__ == "__main__":
    main()
