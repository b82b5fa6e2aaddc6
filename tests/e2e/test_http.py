"""The OpenAI-compatible HTTP API, through real clients over TCP: the official `openai` SDK
(sync and async), raw SSE with httpx, and the same requests through gRPC for comparison."""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import httpx
import openai
import pytest

from tokenwire import Client

from .test_metrics import Scrape

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def sdk(served):
    with openai.OpenAI(base_url=served.http_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(served):
    return served.llm.name


def test_completions_match_grpc_exactly(sdk, model, client):
    """The same greedy request through both protocols: the same text, tokens and logprobs."""
    http = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    grpc = client.generate(PROMPT, max_new_tokens=12, temperature=0, logprobs=True, top_n=3)
    choice = http.choices[0]
    assert choice.text == grpc.text and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [t.text for t in grpc.tokens]
    assert choice.logprobs.token_logprobs == [t.logprob for t in grpc.tokens]
    assert choice.logprobs.top_logprobs == [{p.text: p.logprob for p in t.top} for t in grpc.tokens]
    assert choice.logprobs.text_offset == [len("".join(t.text for t in grpc.tokens[:i])) for i in range(12)]
    assert http.usage.completion_tokens == 12 and http.usage.prompt_tokens == len(client.tokenize(PROMPT)[0].ids)


def test_chat_matches_grpc_exactly(start_server, make_engine, model):
    """(The chat's system prompt fills a cache block, so the second request reuses it: exact
    equality then takes the batch-invariant mode, where cached and computed keys are the same bits.)"""
    running = start_server(make_engine(kv_cache_tokens=4096, batch_invariant=True), http_port=0)
    messages = [{"role": "user", "content": "Name a colour."}]
    with openai.OpenAI(base_url=running.http_url, api_key="x", max_retries=0) as sdk, \
            Client(running.address) as client:
        check_chat(sdk, client, model, messages)


def check_chat(sdk, client, model, messages):
    http = sdk.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=2)
    grpc = client.generate(messages=messages, max_new_tokens=10, temperature=0, logprobs=True, top_n=2)
    choice = http.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == grpc.text
    assert [c.logprob for c in choice.logprobs.content] == [t.logprob for t in grpc.tokens]
    assert [c.token for c in choice.logprobs.content] == [t.text for t in grpc.tokens]
    assert [[p.logprob for p in c.top_logprobs] for c in choice.logprobs.content] == \
        [[p.logprob for p in t.top] for t in grpc.tokens]


def test_streams_concatenate_to_the_whole(sdk, model):
    whole = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(sdk.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "Say hello."}]
    whole = sdk.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    chunks = list(sdk.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices


def test_n_samples_and_several_prompts(sdk, model):
    r = sdk.completions.create(model=model, prompt=["Once upon a time", "In a galaxy"], max_tokens=6, n=3,
                               temperature=1.0, seed=5)
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert len({c.text for c in r.choices[:3]}) > 1  # samples differ
    assert r.usage.completion_tokens == sum(1 for _ in r.choices) * 6
    chat = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], n=2,
                                       max_tokens=5, temperature=1.0, seed=1)
    assert [c.index for c in chat.choices] == [0, 1]


def test_echo_with_logprobs_is_score(sdk, model, client, tokenizer):
    """lm-eval's loglikelihood request: the prompt echoed with its logprobs, the first null."""
    ids = tokenizer.encode(PROMPT + " Paris")
    for max_tokens in (0, 1):
        r = sdk.completions.create(model=model, prompt=ids, max_tokens=max_tokens, echo=True, logprobs=1,
                                   temperature=0)
        lp = r.choices[0].logprobs
        scored = client.score([PROMPT + " Paris"])[0]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx([t.logprob for t in scored.tokens], abs=1e-5)
        assert len(lp.tokens) == len(ids) + max_tokens
        assert r.choices[0].text.startswith(PROMPT + " Paris")


def test_errors_are_the_sdks_own_types(sdk, model):
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model=model, prompt=PROMPT, top_p=1.5)
    assert e.value.status_code == 400 and e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model=model, prompt=PROMPT, max_tokens=10**6)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model=model, messages=[], max_tokens=3)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], top_logprobs=99,
                                    logprobs=True)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        sdk.completions.create(model="gpt-4", prompt=PROMPT)
    assert e.value.body["param"] == "model"


def test_async_sdk(served, model):
    async def main():
        async with openai.AsyncOpenAI(base_url=served.http_url, api_key="x", max_retries=0) as c:
            whole = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=6, temperature=0)
            stream = await c.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
            text = "".join([chunk.choices[0].text async for chunk in stream])
            with pytest.raises(openai.BadRequestError):
                await c.completions.create(model=model, prompt=PROMPT, temperature=-1)
            return whole, text
    whole, text = asyncio.run(main())
    assert whole.choices[0].message.content and text


def test_sse_framing(served, model):
    """Raw bytes: `data: <json>` events separated by blank lines, ending with `data: [DONE]`."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.http_url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        raw = b"".join(r.iter_bytes()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    datas = [e for e in events[:-2] if e]
    assert len(datas) == 4 and all(e.startswith("data: {") and "\n" not in e for e in datas)
    assert [json.loads(e[len("data: "):])["object"] for e in datas] == ["text_completion"] * 4


def test_tokenizer_endpoints(served, model, tokenizer):
    base = served.http_url.removesuffix("/v1")
    ids = httpx.post(base + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()["tokens"]
    assert ids == tokenizer.encode("Hello world", add_special_tokens=False)
    assert httpx.post(base + "/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello world"}
    messages = [{"role": "user", "content": "Hi <|im_end|>"}]  # (content stays text)
    chat = httpx.post(base + "/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == tokenizer.encode_chat(messages) and chat["count"] == len(chat["tokens"])
    info = httpx.get(base + "/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and "im_start" in info["chat_template"]
    bad = httpx.post(base + "/detokenize", json={"tokens": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(served.http_url + "/models").json()["data"][0]["id"] == model


def test_a_client_leaving_a_stream_frees_its_blocks(served, model, wait_until):
    body = {"model": model, "prompt": "Count: 1, 2, 3,", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    scrape = lambda name: Scrape(served)(name)  # noqa: E731
    with httpx.stream("POST", served.http_url + "/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 20:
                assert scrape("tokenwire_requests_running") == 1 and scrape("tokenwire_kv_cache_usage_ratio") > 0
                break  # and the connection closes
    assert wait_until(lambda: scrape("tokenwire_requests_running") == 0
                      and scrape("tokenwire_kv_cache_usage_ratio") == 0, timeout=5)
    assert Scrape(served)("tokenwire_requests_total", protocol="http", method="completions", code="CANCELLED") >= 1


def test_request_ids_and_metrics_carry_the_protocol(served, model):
    before = Scrape(served)("tokenwire_requests_total", protocol="http", method="chat.completions", code="OK")
    r = httpx.post(served.http_url + "/chat/completions", headers={"x-request-id": "my-id-1"}, timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-id-1"
    assert Scrape(served)("tokenwire_requests_total", protocol="http", method="chat.completions",
                          code="OK") == before + 1


def test_deadline_header_gives_504(served, model):
    r = httpx.post(served.http_url + "/completions", headers={"x-request-timeout": "0.05"}, timeout=60,
                   json={"model": model, "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"


def test_structured_output_through_response_format(sdk, model):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    r = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "A city, as JSON."}],
                                    max_tokens=40, temperature=0, response_format={
                                        "type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    assert set(json.loads(r.choices[0].message.content)) == {"city"}
    r = sdk.completions.create(model=model, prompt="Pick one:", max_tokens=5, extra_body={"guided_choice": ["a", "b"]})
    assert r.choices[0].text in ("a", "b")
    r = sdk.completions.create(model=model, prompt="A number:", max_tokens=8, extra_body={
        "guided_grammar": 'start: /[1-9][0-9]{0,3}/'})
    assert r.choices[0].text.isdigit()
    r = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON please"}], max_tokens=30,
                                    extra_body={"guided_json": {"type": "object", "properties": {"ok": {
                                        "type": "boolean"}}, "required": ["ok"], "additionalProperties": False}})
    assert json.loads(r.choices[0].message.content)["ok"] in (True, False)
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model=model, prompt="x", extra_body={"guided_regex": "a(b"})
    assert e.value.body["param"] == "guided_regex"


def test_api_keys_and_overload(start_server, make_engine, model):
    """401 without the key (health stays open); 429 when the queue is full."""
    running = start_server(make_engine(kv_cache_tokens=1024, max_queued=0), http_port=0,
                           api_keys=frozenset({"sekret"}))
    base = running.http_url.removesuffix("/v1")
    assert httpx.get(base + "/health").status_code == 200
    with openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    with openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0, timeout=60) as c:
        assert c.models.list().data[0].id == model
        with pytest.raises(openai.RateLimitError):  # no room in the queue
            c.completions.create(model=model, prompt="y", max_tokens=3)


def test_drain_finishes_streams_and_turns_new_requests_away(start_server, make_engine, model):
    running = start_server(make_engine(kv_cache_tokens=2048), http_port=0)
    base = running.http_url.removesuffix("/v1")
    body = {"model": model, "prompt": PROMPT, "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        drained = asyncio.run_coroutine_threadsafe(running.server.drain(30), running.loop)
        assert wait_until_status(base + "/health", 503)
        refused = httpx.post(base + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert sum(1 for e in events if e["choices"]) == 59 and events[-1]["choices"][0]["finish_reason"] == "length"
    drained.result(30)


def wait_until_status(url: str, status: int, timeout: float = 5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if httpx.get(url).status_code == status:
            return True
        time.sleep(0.02)
    return False


def test_tls_and_mutual_tls(start_server, make_engine, model, tmp_path):
    from .certs import CertificateAuthority
    ca = CertificateAuthority()
    server_cert, client_cert = ca.issue("localhost", server=True), ca.issue("client", server=False)
    files = {}
    for name, data in [("ca.crt", ca.pem), ("tls.crt", server_cert.cert), ("tls.key", server_cert.key),
                       ("client.crt", client_cert.cert), ("client.key", client_cert.key)]:
        (tmp_path / name).write_bytes(data)
        files[name] = str(tmp_path / name)
    from tokenwire_server.security import server_credentials
    tls = (files["tls.crt"], files["tls.key"], files["ca.crt"])
    running = start_server(make_engine(kv_cache_tokens=1024), http_port=0, http_tls=tls,
                           credentials=server_credentials(*tls))
    url = f"https://localhost:{running.server.http_port}/v1/models"
    with_cert = ssl.create_default_context(cafile=files["ca.crt"])
    with_cert.load_cert_chain(files["client.crt"], files["client.key"])
    ok = httpx.get(url, verify=with_cert)
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == model
    with pytest.raises(httpx.HTTPError):  # no client certificate
        httpx.get(url, verify=ssl.create_default_context(cafile=files["ca.crt"]))
    with pytest.raises(httpx.HTTPError):  # plaintext against TLS
        httpx.get(url.replace("https", "http"))


def test_bad_bodies(served, model):
    url = served.http_url + "/completions"
    for content, param in [(b"{not json", "body"), (b"[1, 2]", "body"), (b'{"prompt": 5}', "prompt"),
                           (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
                           (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
                           (b'{"prompt": "x", "logit_bias": {"abc": 1}}', "logit_bias[abc]"),
                           (b'{"prompt": "x", "stream_options": {"include_usage": true}}', "stream_options"),
                           (json.dumps({"prompt": ["a"] * 300}).encode(), "prompt"),
                           (b"x" * (8 * 2**20 + 1), "body")]:
        r = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (content[:40], r.text)


def test_prompts_as_lists_of_token_ids(sdk, model, tokenizer):
    a, b = tokenizer.encode("Once upon a time"), tokenizer.encode("The moon is")
    r = sdk.completions.create(model=model, prompt=[a, b], max_tokens=3, temperature=0)
    alone = [sdk.completions.create(model=model, prompt=p, max_tokens=3, temperature=0).choices[0].text for p in (a, b)]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == alone
    assert r.usage.prompt_tokens == len(a) + len(b)
