"""`tokenwire bench --http`: the same load and figures as the gRPC bench, against an
OpenAI-compatible server. The real server over real TCP (tokenwire's own HTTP API), through the
installed command in a subprocess; then the shapes of the other servers (llama-server's
tokenizer and closing chunk, a server without a tokenizer endpoint) through a fake transport."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import httpx
import pytest

from tokenwire import bench

CLI = [sys.executable, "-m", "tokenwire.cli"]
LOAD = ["--requests", "4", "--concurrency", "2", "--prompt-tokens", "32", "--output-tokens", "8", "--warmup", "1",
        "--json"]


def bench_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["bench", *args], capture_output=True, text=True, timeout=300)


def test_http_bench_matches_grpc_bench(served):
    http = bench_cli("--http", served.http_url, *LOAD)
    assert http.returncode == 0, http.stderr
    grpc = bench_cli("--server", served.address, *LOAD)
    assert grpc.returncode == 0, grpc.stderr
    reports = {"http": json.loads(http.stdout), "grpc": json.loads(grpc.stdout)}
    for protocol, r in reports.items():
        assert r["settings"]["protocol"] == protocol
        assert r["requests"] == 4 and r["errors"] == {}
        # max_tokens caps each at 8, so 32 in all is exactly 8 each; and the prompts went as token
        # ids of exactly 32 (the HTTP side tokenized through the server's /tokenize)
        assert r["output_tokens"] == 4 * 8 and r["prompt_tokens"] == 4 * 32
        assert r["output_tokens_per_s"] > 0
        assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["duration_s"])
        for figure in ("ttft_s", "itl_s", "e2e_s"):
            assert set(r[figure]) == {"p50", "p90", "p99", "mean"} and r[figure]["p50"] > 0
    assert reports["http"]["settings"]["target"] == served.http_url
    assert reports["http"]["settings"]["model"] == served.llm.name
    assert reports["grpc"]["settings"]["target"] == served.address
    assert reports["http"].keys() == reports["grpc"].keys()
    assert reports["http"]["settings"].keys() - {"model"} == reports["grpc"]["settings"].keys()


def test_http_base_url_without_v1_and_text_report(served):
    out = bench_cli("--http", served.http_url.removesuffix("/v1") + "/", "--requests", "2", "--prompt-tokens", "8",
                    "--output-tokens", "2", "--warmup", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("2 requests in ") and f"against http {served.http_url} " in out.stdout


@pytest.fixture
def dead_url():
    """A port bound but not listening: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_unreachable_server_is_an_error_not_a_traceback(dead_url, tmp_path):
    out = bench_cli("--http", dead_url, "--requests", "2", "--json")
    assert out.returncode == 2 and out.stdout == ""
    assert "error: cannot reach" in out.stderr and "Traceback" not in out.stderr

    # Given a model and prompts, nothing is asked before the measured requests: each is counted
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\nWorld\n")
    out = bench_cli("--http", dead_url, "--model", "m", "--prompts-file", str(prompts), "--requests", "3",
                    "--warmup", "0", "--json")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    report = json.loads(out.stdout)
    assert report["errors"] == {"connection": 3} and report["requests"] == 0 and report["ttft_s"] == {}


def test_model_needs_http():
    out = bench_cli("--model", "m")
    assert out.returncode == 2 and "--model goes with --http" in out.stderr


# ---- other servers' shapes, through a fake transport ----

def _sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


class FakeServer:
    """llama-server's answers by default: /tokenize takes {"content"} (and answers the vLLM
    shape with no tokens), a stream of one chunk a token, then a closing chunk with empty text,
    the finish reason and the usage."""

    def __init__(self, tokenizer: bool = True, usage: bool = True, status: int = 200):
        self.tokenizer, self.usage, self.status = tokenizer, usage, status
        self.completions: list[dict] = []
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(request.headers)
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "llama"}, {"id": "other"}]})
        if path == "/tokenize" and self.tokenizer:
            text = json.loads(request.content).get("content", "")
            return httpx.Response(200, json={"tokens": list(range(len(text.split())))})
        if path == "/v1/completions":
            if self.status != 200:
                return httpx.Response(self.status, json={"error": {"message": "busy", "code": self.status}})
            body = json.loads(request.content)
            self.completions.append(body)
            n = body["max_tokens"]
            chunks = [{"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]} for i in range(n)]
            closing = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
            if self.usage:
                closing["usage"] = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
            return httpx.Response(200, content=_sse(*chunks, closing, b"[DONE]"),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(404, json={"error": {"message": "not found"}})


def run_fake(monkeypatch, server: FakeServer, **load) -> bench.Report:
    monkeypatch.setattr(bench, "_http_client", lambda api_key, timeout: httpx.AsyncClient(
        transport=httpx.MockTransport(server), headers={"Authorization": f"Bearer {api_key}"} if api_key else {}))
    options = dict(requests=3, concurrency=2, prompt_tokens=16, output_tokens=5, warmup=1, progress=False)
    return asyncio.run(bench.run("http://fake:8080", protocol="http", client_options={"api_key": "k"},
                                 **{**options, **load}))


def test_llama_server_shapes(monkeypatch):
    server = FakeServer()
    r = run_fake(monkeypatch, server)
    assert r.settings["model"] == "llama" and r.settings["target"] == "http://fake:8080/v1"
    assert r.requests == 3 and r.errors == {} and r.output_tokens == 15 and r.prompt_tokens == 21
    # token ids of exactly --prompt-tokens, each different; streamed, without end of sequence
    measured = server.completions[1:]
    assert all(len(b["prompt"]) == 16 and all(isinstance(t, int) for t in b["prompt"]) for b in measured)
    assert len({tuple(b["prompt"]) for b in measured}) == 3
    assert all(b["stream"] and b["ignore_eos"] and b["stream_options"] == {"include_usage": True}
               and b["model"] == "llama" and b["max_tokens"] == 5 for b in measured)
    assert server.completions[0]["max_tokens"] == 5  # the warmup: min(output tokens, 8)
    assert all(h["authorization"] == "Bearer k" for h in server.headers)
    assert r.ttft_s and r.itl_s and r.e2e_s


def test_no_tokenizer_no_usage_falls_back(monkeypatch, capsys):
    server = FakeServer(tokenizer=False, usage=False)
    r = run_fake(monkeypatch, server, warmup=0)
    assert "sending text prompts of about 16 tokens" in capsys.readouterr().err
    assert all(isinstance(b["prompt"], str) and b["prompt"] for b in server.completions)
    # one token a chunk without the server's count; the closing chunk (no text, finished) is none
    assert r.requests == 3 and r.output_tokens == 15
    assert r.prompt_tokens == 0  # a text's length in tokens is unknown without usage


def test_http_status_counted(monkeypatch):
    r = run_fake(monkeypatch, FakeServer(status=429), warmup=0, requests=2, prompts_file=None)
    assert r.errors == {"HTTP 429": 2} and r.requests == 0
    with pytest.raises(bench.BenchError, match="warmup request failed: HTTP 503"):
        run_fake(monkeypatch, FakeServer(status=503))
