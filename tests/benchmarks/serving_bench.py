"""Serving benchmark: `tokenwire bench` against a real server process at concurrency 1 and 32,
then transformers `generate` on static batches of the same sizes, in one run.

    .venv/bin/python tests/benchmarks/serving_bench.py [--requests-32 64] [--json]

Default model, 128-token prompts, 128 new tokens, greedy (end tokens ignored)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch

from tokenwire import Client
from tokenwire.bench import BASE_TEXT, format_report, run
from tokenwire_server import registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def transformers_static(path, batch: int, prompt_tokens: int, new_tokens: int, dtype) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    base = tok(BASE_TEXT * 20, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([base[i * 13:i * 13 + prompt_tokens] for i in range(batch)])
    with torch.inference_mode():
        model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt_tokens + new_tokens
    return batch * new_tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests-1", type=int, default=4)
    ap.add_argument("--requests-32", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    path = registry.resolve(registry.DEFAULT_MODEL)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tokenwire_server.main", "serve", "--port", str(port),
                               "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    try:
        with Client(f"127.0.0.1:{port}") as c:
            for _ in range(120):
                try:
                    if c.health(timeout=1) == "SERVING":
                        break
                except Exception:
                    pass
                time.sleep(0.5)
            dtype = c.info().dtype
        for concurrency, requests in ((1, args.requests_1), (32, args.requests_32)):
            rss_before = rss_mib(server.pid)
            report = asyncio.run(run(f"127.0.0.1:{port}", concurrency=concurrency, requests=requests,
                                     prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                                     progress=False))
            results[f"tokenwire c={concurrency}"] = report
            print(format_report(report), f"\n  server RSS {rss_before:.0f} -> {rss_mib(server.pid):.0f} MiB",
                  file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    hf = {}
    for batch in (1, 32):
        for hf_dtype in (torch.float32, torch.bfloat16):
            hf[f"transformers static b={batch} {str(hf_dtype)[6:]}"] = transformers_static(
                path, batch, args.prompt_tokens, args.output_tokens, hf_dtype)
    c1, c32 = results["tokenwire c=1"], results["tokenwire c=32"]
    if args.json:
        print(json.dumps({"tokenwire": {k: v.__dict__ for k, v in results.items()}, "transformers": hf,
                          "dtype": dtype}, indent=2, default=str))
        return
    print(f"\n{'':<38}{'output tok/s':>14}{'TTFT p50 s':>12}{'ITL p50 s':>11}")
    for name, r in results.items():
        print(f"{name + ' (' + dtype + ')':<38}{r.output_tokens_per_s:>14.1f}{r.ttft_s['p50']:>12.3f}"
              f"{r.itl_s['p50']:>11.3f}")
    for name, tps in hf.items():
        print(f"{name:<38}{tps:>14.1f}")
    print(f"\nconcurrency 32 / concurrency 1: {c32.output_tokens_per_s / c1.output_tokens_per_s:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
