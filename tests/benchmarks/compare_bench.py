"""Before/after in one run: `tokenwire bench` against a server from another checkout (the
baseline) and one from this checkout, alternating, at concurrency 1 and 32.

    git worktree add /tmp/base <commit>
    .venv/bin/python tests/benchmarks/compare_bench.py --baseline /tmp/base [--rounds 3] [-- serve flags]

Both servers run the default model with the same flags; the same client (this checkout's)
drives both. Prints the median of the rounds and the ratio after / before. To price a flag,
compare this checkout with itself: --baseline . --after-flags=--batch-invariant"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from serving_bench import free_port

from tokenwire import Client
from tokenwire.bench import run

HERE = Path(__file__).resolve().parents[2]


def start(tree: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{tree / 'server'}:{tree / 'client'}"}
    server = subprocess.Popen([sys.executable, "-m", "tokenwire_server.main", "serve", "--host", "127.0.0.1",
                               "--port", str(port), "--metrics-port", "0", *flags], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    with Client(address) as c:
        for _ in range(240):
            try:
                if c.health(timeout=1) == "SERVING":
                    return server, address
            except Exception:
                pass
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"the server from {tree} did not become ready")


def measure(tree: Path, flags: list[str], concurrency: int, requests: int, tokens: int) -> dict:
    server, address = start(tree, flags)
    try:
        r = asyncio.run(run(address, concurrency=concurrency, requests=requests, prompt_tokens=tokens,
                            output_tokens=tokens, progress=False))
        assert not r.errors, r.errors
        return {"tok/s": r.output_tokens_per_s, "ttft p50": r.ttft_s["p50"], "itl p50": r.itl_s["p50"]}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of the code to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests-1", type=int, default=4)
    ap.add_argument("--requests-32", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128, help="prompt and output tokens")
    ap.add_argument("--after-flags", default="", help="serve flags for the 'after' server only")
    ap.add_argument("flags", nargs="*", help="serve flags for both servers (after --)")
    args = ap.parse_args()
    trees = {"before": args.baseline.resolve(), "after": HERE}
    flags = {"before": args.flags, "after": args.flags + shlex.split(args.after_flags)}
    results = {(name, c): [] for name in trees for c in (1, 32)}
    for i in range(args.rounds):
        for concurrency, requests in ((1, args.requests_1), (32, args.requests_32)):
            for name, tree in trees.items():
                m = measure(tree, flags[name], concurrency, requests, args.tokens)
                results[name, concurrency].append(m)
                print(f"round {i + 1} {name} c={concurrency}: {m}", file=sys.stderr)
    print(f"\nmedians of {args.rounds} rounds ({args.tokens}-token prompts, {args.tokens} new tokens)")
    print(f"{'':<14}{'tok/s':>9}{'TTFT p50 s':>12}{'ITL p50 s':>11}")
    for concurrency in (1, 32):
        med = {}
        for name in trees:
            runs = results[name, concurrency]
            med[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            m = med[name]
            print(f"{name + f' c={concurrency}':<14}{m['tok/s']:>9.1f}{m['ttft p50']:>12.3f}{m['itl p50']:>11.3f}")
        print(f"{'after/before':<14}{med['after']['tok/s'] / med['before']['tok/s']:>8.2f}x")


if __name__ == "__main__":
    main()
