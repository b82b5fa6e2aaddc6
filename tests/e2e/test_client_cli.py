"""The `tokenwire` command and the client package, installed alone, against the server."""

import asyncio
import json
import os
import subprocess
import sys
import venv
from pathlib import Path


from tokenwire import AsyncClient

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "tokenwire.cli"]


def cli(served, *args, check=True):
    result = subprocess.run(CLI + ["--server", served.address, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_cli_generate_streams_text(served):
    out = cli(served, "generate", "--chat", "What is the capital of France?", "--temperature", "0")
    assert "Paris" in out.stdout and "[eos:" in out.stderr
    data = json.loads(cli(served, "--json", "generate", "Hi", "--max-new-tokens", "3", "--seed", "5").stdout)
    assert data["seed"] == 5 and data["usage"]["completion_tokens"] <= 3 and data["tokens"][0]["logprob"] < 0


def test_cli_other_commands(served, tokenizer):
    data = json.loads(cli(served, "--json", "tokenize", "Hello world", "--tokens").stdout)
    assert data[0]["ids"] == tokenizer.encode("Hello world") and data[0]["tokens"][1]["text"] == " world"
    assert "tokens: [" in cli(served, "tokenize", "Hello", "--encoding", "cl100k_base").stdout
    score = json.loads(cli(served, "--json", "score", " Paris", "--context", "The capital of France is").stdout)
    assert score[0]["is_greedy"] and score[0]["token_count"] == 1
    assert "perplexity" in cli(served, "score", "The cat sat on the mat.").stdout
    assert json.loads(cli(served, "--json", "info").stdout)["architecture"] == "llama"
    assert cli(served, "health").stdout.strip() == "SERVING"


def test_cli_reports_field_violations(served):
    out = cli(served, "generate", "Hi", "--top-p", "1.5", check=False)
    assert out.returncode == 2
    assert "INVALID_ARGUMENT" in out.stderr and "sampling.top_p" in out.stderr


def test_async_client(served, tokenizer):
    async def main():
        async with AsyncClient(served.address, timeout=60) as c:
            assert await c.health() == "SERVING"
            tokens = (await c.tokenize(["Hello world"]))[0]
            events = [e async for e in c.generate_stream("Hello", temperature=0, max_new_tokens=3, ignore_eos=True)]
            g = await c.generate("Hello", temperature=0, max_new_tokens=3, ignore_eos=True)
            scored = await c.score(["Hello world"])
            info = await c.info()
            text = await c.detokenize(tokens.ids)
            return tokens, events, g, scored, info, text

    tokens, events, g, scored, info, text = asyncio.run(main())
    assert tokens.ids == tokenizer.encode("Hello world") and text == "Hello world"
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["InputInfo", "Delta", "Delta", "Delta", "Final"]
    assert g.text == "".join(e.text for e in events if type(e).__name__ == "Delta")
    assert scored[0].token_count == 1 and info.vocab_size == 49152


def test_client_installs_and_works_without_torch(served, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([py, "-m", "pip", "install", "--quiet", str(ROOT / "client")], check=True, env=env, timeout=600)
    script = f"""
import importlib.util, sys
assert importlib.util.find_spec("torch") is None, "torch must not be installed"
from tokenwire import Client, TokenwireError
with Client("{served.address}", timeout=60) as c:
    g = c.generate("The capital of France is", temperature=0, max_new_tokens=4)
    print(g.text)
    try:
        c.generate("x", temperature=-1)
    except TokenwireError as e:
        print(e.code.name, e.field)
"""
    out = subprocess.run([py, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "INVALID_ARGUMENT sampling.temperature" in out.stdout
    assert subprocess.run([env_dir / "bin" / "tokenwire", "--server", served.address, "health"],
                          capture_output=True, text=True, env=env).stdout.strip() == "SERVING"
