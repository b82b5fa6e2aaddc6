"""lm-evaluation-harness against the HTTP API, as the README shows it: `local-completions` with
the remote tokenizer (our /tokenize, /detokenize, /tokenizer_info), on a task kept in the repo,
with no hub access. Every loglikelihood it gets must be what the Score RPC says."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = Path(__file__).with_name("lm_eval")


def test_lm_eval_loglikelihoods_equal_score(served, client, tmp_path):
    """The session server computes in float32: eval-grade numbers."""
    args = f"model={served.llm.name},base_url={served.http_url}/completions,tokenizer_backend=remote," \
           "num_concurrent=4,max_retries=1"
    run = subprocess.run([str(Path(sys.executable).with_name("lm_eval")), "--model", "local-completions",
                          "--model_args", args, "--include_path", str(TASK_DIR), "--tasks", "tokenwire_mc",
                          "--output_path", str(tmp_path), "--log_samples"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "|tokenwire_mc|" in run.stdout
    samples = [json.loads(line) for line in open(glob.glob(f"{tmp_path}/*/samples_tokenwire_mc_*.jsonl")[0])]
    assert len(samples) == 20
    pairs = [(a["arg_0"], a["arg_1"], s["filtered_resps"][int(k.rsplit("_", 1)[1])])
             for s in samples for k, a in s["arguments"].items()]
    assert len(pairs) == 80
    scored = client.score([(context, continuation) for context, continuation, _ in pairs])
    for (context, continuation, (loglikelihood, greedy)), want in zip(pairs, scored):
        assert float(loglikelihood) == pytest.approx(want.logprob_sum, abs=1e-4), (context, continuation)
        assert (greedy == "True") == want.is_greedy
    accuracy = json.load(open(glob.glob(f"{tmp_path}/*/results_*.json")[0]))["results"]["tokenwire_mc"]["acc,none"]
    assert accuracy >= 0.5  # (the model knows most of these facts: a sanity check on the wiring)
