"""Single-stream engine benchmark: prefill and decode tokens/s of tokenwire's engine beside
transformers' `generate` on the same GGUF, same prompt, same process, rounds interleaved.

    .venv/bin/python tests/benchmarks/engine_bench.py [--rounds 3] [--new-tokens 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tokenwire_server import registry
from tokenwire_server.engine import LLMEngine, SamplingParams
from tokenwire_server.engine.llm_engine import EngineConfig

PROMPT = ("You are reviewing a pull request for a gRPC inference server written in Python. "
          "The change adds continuous batching, a paged key-value cache with prefix sharing, and a "
          "sampler that applies temperature, top-k, top-p and min-p per row in a single batched pass. "
          "Summarise the risks of such a change for latency, memory use and correctness, and list "
          "the tests you would ask the author to add before merging it into the main branch.")


def ours(engine: LLMEngine, ids: list[int], new_tokens: int) -> tuple[float, float]:
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    first = None
    for _ in engine.generate(ids, params):
        first = first or time.perf_counter()
    return len(ids) / (first - start), (new_tokens - 1) / (time.perf_counter() - first)


def transformers_generate(model, ids: list[int], new_tokens: int) -> tuple[float, float]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        start = time.perf_counter()
        model(x)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
        total = time.perf_counter() - start
    return len(ids) / prefill_s, (new_tokens - 1) / (total - prefill_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=registry.DEFAULT_MODEL)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    path = registry.resolve(args.model)
    results = {}
    for dtype in args.dtypes.split(","):
        # No prefix caching: every round must compute its prompt.
        engine = LLMEngine.from_checkpoint(path, dtype=dtype, device="cpu",
                                           config=EngineConfig(kv_cache_tokens=4096, prefix_caching=False))
        ids = engine.tokenizer.encode(PROMPT)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                  dtype=getattr(torch, dtype)).eval()
        ours(engine, ids, 8), transformers_generate(hf, ids, 8)  # warm-up
        runs = {"tokenwire": [], "transformers": []}
        for _ in range(args.rounds):  # interleaved, so both see the same machine noise
            runs["tokenwire"].append(ours(engine, ids, args.new_tokens))
            runs["transformers"].append(transformers_generate(hf, ids, args.new_tokens))
        for name, rs in runs.items():
            results[f"{name} {dtype}"] = {
                "prefill_tok_s": statistics.median(r[0] for r in rs),
                "decode_tok_s": statistics.median(r[1] for r in rs),
            }
        del engine, hf
    meta = {"prompt_tokens": len(ids), "new_tokens": args.new_tokens, "rounds": args.rounds,
            "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return
    print(f"prompt {len(ids)} tokens, {args.new_tokens} new tokens greedy, median of {args.rounds} "
          f"rounds, {meta['threads']} threads")
    print(f"{'engine':<26}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, r in results.items():
        print(f"{name:<26}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>15.1f}")
    for dtype in args.dtypes.split(","):
        a, b = results[f"tokenwire {dtype}"], results[f"transformers {dtype}"]
        print(f"ratio tokenwire/transformers {dtype}: prefill {a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x, "
              f"decode {a['decode_tok_s'] / b['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
