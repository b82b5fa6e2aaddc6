"""`--batch-invariant`: a request's tokens and logprobs are the same alone and in mixed
traffic (other prompts of other lengths and sampling parameters, prompts being computed beside
streams decoding), through a real server in its default dtype."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tokenwire import Client

from .server_process import server_process

SUBJECTS = ["the sea", "Paris", "cats", "prime numbers", "the moon", "music", "bread", "a city", "a date", "chess"]
# Structured output: constrained rows in the batch keep the mode's promise too.
CONSTRAINED = {7: dict(json_schema={"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                                                     "population": {"type": "integer"}},
                                    "required": ["name", "population"], "additionalProperties": False}),
               8: dict(regex=r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]")}


@pytest.fixture(scope="module")
def invariant_server(model_path, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("invariant") / "server.log"
    with server_process(model_path, log_path, "--batch-invariant") as address:
        yield address


def subject(client: Client, i: int):
    """One request under test: what it returned, down to every logprob's bits."""
    messages = [{"role": "user", "content": f"Tell me about {SUBJECTS[i]}."}]
    if i == len(SUBJECTS) - 1:  # scoring, the prompt-side path
        scored = client.score([(f"A few words about {SUBJECTS[i]}:", " it is old, and it is loved.")])[0]
        return [(t.id, t.logprob) for t in scored.tokens]
    if i < 4:
        params = dict(temperature=0)
    else:
        params = dict(temperature=0.8, top_p=0.95, seed=100 + i, repetition_penalty=1.1 if i % 2 else 1.0)
    if i == 6:  # two samples of one prompt
        gens = client.generate_samples(messages=messages, n=2, max_new_tokens=24, ignore_eos=True, logprobs=True,
                                       top_n=2, **params)
    else:
        gens = [client.generate(messages=messages, max_new_tokens=24 + 4 * i, ignore_eos=True, logprobs=True,
                                top_n=2, **params, **CONSTRAINED.get(i, {}))]
    return [[(t.id, t.logprob, [(p.id, p.logprob) for p in t.top]) for t in g.tokens] for g in gens]


def other(client: Client, i: int, stop: threading.Event) -> int:
    """Traffic beside the subjects: prompts of 10 to 700 tokens, sampled, some long-running, some
    constrained."""
    prompt = f"Story number {i}: once upon a time, " * (1 + 9 * i)
    seen = 0
    for _ in client.generate_stream(prompt, max_new_tokens=20 + 15 * i, ignore_eos=True, temperature=1.0,
                                    seed=i, top_k=40 if i % 2 else 0, json_object=i % 3 == 0):
        seen += 1
        if stop.is_set():
            break
    return seen


def test_tokens_and_logprobs_do_not_depend_on_the_batch(invariant_server):
    info = subprocess.run([str(Path(sys.executable).with_name("tokenwire")), "info", "--server", invariant_server],
                          capture_output=True, text=True, timeout=60).stdout
    assert "batch_invariant    True" in info  # as the README shows it
    with Client(invariant_server, timeout=300) as client:
        alone = [subject(client, i) for i in range(len(SUBJECTS))]
        stop = threading.Event()
        with ThreadPoolExecutor(len(SUBJECTS) + 8) as pool:
            others = [pool.submit(other, client, i, stop) for i in range(8)]
            time.sleep(1.0)  # the others are decoding and prefilling when the subjects arrive
            mixed = [pool.submit(subject, client, i) for i in range(len(SUBJECTS))]
            mixed = [f.result() for f in mixed]
            stop.set()
            assert all(f.result() > 0 for f in others)
    for i, (a, m) in enumerate(zip(alone, mixed)):
        assert a == m, f"request {i} ({SUBJECTS[i]}) changed beside other traffic"
