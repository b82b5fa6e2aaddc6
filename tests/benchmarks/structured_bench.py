"""Structured output, measured: throughput at concurrency 8 with every request constrained
against the same traffic unconstrained (one server, alternating, in one run); compile time of
the test schemas, cold and cached; and the per-step mask time (fill + apply) at batch 1 and 32,
replayed along the outputs the model wrote.

    .venv/bin/python tests/benchmarks/structured_bench.py [--rounds 3] [-- serve flags]"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(HERE / "tests" / "e2e"))

from compare_bench import start  # noqa: E402
from test_structured_output import SCHEMAS  # noqa: E402

from tokenwire import Client  # noqa: E402
from tokenwire_server import registry  # noqa: E402
from tokenwire_server.checkpoint_files import open_gguf  # noqa: E402
from tokenwire_server.engine.structured import ConstraintCompiler, allowed_tokens, mask_logits  # noqa: E402
from tokenwire_server.tokenizer import Tokenizer  # noqa: E402

CONCURRENCY = 8


def traffic(client: Client, lengths: list[int] | None, requests: int) -> tuple[float, list, list[int]]:
    """Output tokens/s of `requests` generations, CONCURRENCY at a time, their texts and
    lengths. Constrained when lengths is None; else free, each as long as its constrained twin
    (ignore_eos), so that both carry the same prompts and output lengths."""
    names = list(SCHEMAS)
    def one(i):
        schema, ask = SCHEMAS[names[i % len(names)]]
        kwargs = dict(json_schema=schema, max_new_tokens=200) if lengths is None else \
            dict(max_new_tokens=lengths[i], ignore_eos=True)
        g = client.generate(messages=[{"role": "user", "content": ask}], temperature=1.0, seed=i, **kwargs)
        return g.usage.completion_tokens, (names[i % len(names)], g.text)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        done = list(pool.map(one, range(requests)))
    return sum(n for n, _ in done) / (time.perf_counter() - t0), [t for _, t in done], [n for n, _ in done]


def mask_times(tokenizer: Tokenizer, compiler: ConstraintCompiler, outputs: list[tuple[str, str]],
               vocab: int) -> dict[int, tuple[float, float]]:
    """Median seconds of one step's fill and unpack (overlapped with the model) and apply (on
    the engine thread), at batch 1 and 32, over matcher states met along the outputs (the state after
    each of their tokens)."""
    states = []
    for name, text in outputs:
        m = compiler.compile("json_schema", json.dumps(SCHEMAS[name][0])).matcher()
        for token in tokenizer.encode(text, add_special_tokens=False):
            states.append(m.deep_copy())
            if not m.consume_token(token):
                break
    out = {}
    for batch in (1, 32):
        fills, applies = [], []
        for start_ in range(0, len(states) - batch, max(1, batch // 4)):
            group = [s.deep_copy() for s in states[start_:start_ + batch]]
            rows = torch.zeros(batch, vocab)
            t0 = time.perf_counter()
            allowed = allowed_tokens(group, vocab)
            t1 = time.perf_counter()
            mask_logits(rows, allowed)
            fills.append(t1 - t0)
            applies.append(time.perf_counter() - t1)
        out[batch] = statistics.median(fills), statistics.median(applies)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("flags", nargs="*", help="serve flags (after --)")
    args = ap.parse_args()

    server, address = start(HERE, args.flags)
    outputs = []
    try:
        with Client(address, timeout=600) as client:
            _, _, lengths = traffic(client, None, CONCURRENCY)  # warm both paths
            traffic(client, lengths, CONCURRENCY)
            rates = {True: [], False: []}
            for i in range(args.rounds):
                rate, texts, lengths = traffic(client, None, args.requests)
                rates[True].append(rate)
                outputs += texts
                rate, _, _ = traffic(client, lengths, args.requests)
                rates[False].append(rate)
                print(f"round {i + 1}: constrained {rates[True][-1]:.1f}, free {rate:.1f} tok/s", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    con, free = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"\nconcurrency {CONCURRENCY}, medians of {args.rounds} rounds of {args.requests} requests")
    print(f"  all constrained (the 3 test schemas): {con:.1f} tok/s")
    print(f"  unconstrained, the same lengths:      {free:.1f} tok/s")
    print(f"  ratio: {con / free:.2f}x")

    path = registry.pull(registry.DEFAULT_MODEL)
    tokenizer = Tokenizer.from_gguf(open_gguf(path), path)
    vocab = tokenizer.vocab_size
    compiler = ConstraintCompiler(tokenizer, vocab)
    t0 = time.perf_counter()
    compiler.compile("regex", "x")
    print(f"\nllguidance tokenizer, built once: {1e3 * (time.perf_counter() - t0):.0f} ms")
    for name, (schema, _) in SCHEMAS.items():
        text = json.dumps(schema)
        cold = []
        for i in range(5):  # a fresh compiler each time, its tokenizer built beforehand
            fresh = ConstraintCompiler(tokenizer, vocab)
            fresh.compile("regex", "x")
            t0 = time.perf_counter()
            fresh.compile("json_schema", text)
            cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(100):
            compiler.compile("json_schema", text)
        cached = (time.perf_counter() - t0) / 100
        print(f"compile {name:<7} cold {1e3 * statistics.median(cold):6.2f} ms   cached {1e6 * cached:6.1f} us")
    times = mask_times(tokenizer, compiler, outputs, vocab)
    for batch, (fill, apply) in times.items():
        print(f"mask per step at batch {batch:>2}: fill {1e3 * fill:.3f} ms (beside the model), "
              f"apply {1e3 * apply:.3f} ms (median over the states of {len(outputs)} outputs)")


if __name__ == "__main__":
    main()
