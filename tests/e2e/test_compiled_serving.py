"""`tokenwire-server serve --compile-max-rows 4` on a tiny Llama checkpoint: the process compiles
its decode steps before it reports SERVING, and over gRPC one stream and three concurrent ones
get transformers' greedy tokens, every decode step on the graphs of the warm-up."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tiny_models import build_with_tokenizer

from tokenwire import Client

from .server_process import server_process

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def compiled_server(tmp_path_factory):
    """(transformers' model, a client of the server, its log file)."""
    directory = tmp_path_factory.mktemp("llama")
    model, _, _ = build_with_tokenizer("llama", directory)
    log = directory / "server.log"
    # The session turns compiling off for test servers (tests/conftest.py); the flag overrides
    # it. DEBUG: the log names every decode step that had to run eagerly. One thread, as for the
    # other tiny servers: on a busy 2-core machine, parallel regions wait on a preempted thread.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TOKENWIRE_LOG_LEVEL", "DEBUG")
        with server_process(directory, log, "--dtype", "float32", "--threads", "1", "--kv-cache-tokens", "4096",
                            "--compile-max-rows", "4") as address, Client(address, timeout=120) as client:
            yield model, client, log


def greedy(model, prompt: list[int]) -> list[int]:
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def generate(client, prompt: list[int]) -> list[int]:
    out = client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0)
    return [t.id for t in out.tokens]


PROMPTS = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 12, 9)]


def test_compiles_before_serving(compiled_server):
    _, _, log = compiled_server
    text = log.read_text()
    assert "compiled the forward of decode steps of up to 4 sequences" in text, text
    assert "decoding without torch.compile" not in text


def test_one_stream_matches_transformers_greedy(compiled_server):
    model, client, log = compiled_server
    assert generate(client, PROMPTS[0]) == greedy(model, PROMPTS[0])
    assert "a decode step ran eagerly" not in log.read_text()


def test_concurrent_streams_match_transformers_greedy(compiled_server):
    model, client, log = compiled_server
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: generate(client, p), PROMPTS))
    assert got == [greedy(model, p) for p in PROMPTS]
    assert "a decode step ran eagerly" not in log.read_text()
