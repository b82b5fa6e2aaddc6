"""Structured output through our client over gRPC, on the real model: sampled outputs always
satisfy their constraint, checked by independent parsers and validators (json + jsonschema,
re, lark); bad constraints are refused with the field named; a slow compile stalls no stream."""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import lark
import pytest

from tokenwire import TokenwireError

SAMPLES = 20
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}( [A-Z][a-z]{1,12})?$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "email": {"type": "string", "pattern": "^[a-z]{2,10}@[a-z]{2,10}\\.(com|org)$"},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "minLength": 2, "maxLength": 20},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "address", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
            "type": "object", "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{3}$"},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 20},
                "unit_price": {"type": "number", "minimum": 0.5, "maximum": 999.99}},
            "required": ["sku", "quantity", "unit_price"], "additionalProperties": False}},
        "express": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 40},
    },
    "required": ["order_id", "status", "items"],
    "additionalProperties": False,
}
REVIEW = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "aspects": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {
                "aspect": {"enum": ["price", "quality", "delivery", "service"]},
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "quote": {"type": "string", "maxLength": 30}},
            "required": ["aspect", "rating"], "additionalProperties": False}},
        "language": {"type": "string", "pattern": "^[a-z]{2}$"},
    },
    "required": ["sentiment", "score", "aspects"],
    "additionalProperties": False,
}
SCHEMAS = {
    "person": (PERSON, "Describe a fictional person, as JSON."),
    "order": (ORDER, "Write a customer order for office supplies, as JSON."),
    "review": (REVIEW, "Analyse this review as JSON: 'Arrived late, but the chair is solid and cheap.'"),
}
# Bounded (at most 4 terms of at most 3 factors), so every sample ends within max_new_tokens.
ARITHMETIC = r"""
start: sum
sum: product (("+" | "-") product){0,3}
product: atom (("*" | "/") atom){0,2}
atom: NUMBER | "(" NUMBER ("+" | "-") NUMBER ")"
NUMBER: /[1-9][0-9]{0,2}/
"""
# The same language in lark's own syntax, parsed by lark: an independent judge.
ARITHMETIC_LARK = lark.Lark(r"""
start: sum
sum: product (("+" | "-") product)*
product: atom (("*" | "/") atom)*
atom: NUMBER | "(" NUMBER ("+" | "-") NUMBER ")"
NUMBER: /[1-9][0-9]{0,2}/
""", parser="earley", lexer="dynamic")


def sampled(client, count=SAMPLES, **kwargs):
    """count generations at temperature 1.0, seeds 0..count-1, side by side."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda seed: client.generate(temperature=1.0, seed=seed, **kwargs), range(count)))


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_samples_parse_and_validate(client, name):
    schema, ask = SCHEMAS[name]
    gens = sampled(client, messages=[{"role": "user", "content": ask}], json_schema=schema, max_new_tokens=200)
    for g in gens:
        assert g.finish_reason == "eos", g.text
        jsonschema.validate(json.loads(g.text), schema)
    assert len({g.text for g in gens}) > SAMPLES // 2  # really sampled, not one answer repeated


def test_json_object_and_regex_samples(client):
    for g in sampled(client, count=8, messages=[{"role": "user", "content": "Give me a JSON object."}],
                     json_object=True, max_new_tokens=200):
        if g.finish_reason == "eos":  # (an object may nest past the token budget: then a prefix)
            assert isinstance(json.loads(g.text), dict)
    pattern = r"(\+1 )?\([2-9][0-9]{2}\) [0-9]{3}-[0-9]{4}"
    for g in sampled(client, prompt="Call us at", regex=pattern, max_new_tokens=30):
        assert g.finish_reason == "eos" and re.fullmatch(pattern, g.text), g.text


def test_choice_samples_are_exactly_a_choice(client):
    choices = ["red", "green", "dark blue", "no colour at all", "red-orange"]
    gens = sampled(client, prompt="My favourite colour is", choice=choices, max_new_tokens=20)
    assert all(g.text in choices and g.finish_reason == "eos" for g in gens), [g.text for g in gens]
    assert len({g.text for g in gens}) > 1


def test_grammar_samples_parse_with_an_independent_parser(client):
    for g in sampled(client, prompt="An arithmetic exercise: ", grammar=ARITHMETIC, max_new_tokens=60):
        assert g.finish_reason == "eos", g.text
        ARITHMETIC_LARK.parse(g.text)


def test_max_new_tokens_first_gives_length_and_a_valid_prefix(client):
    g = client.generate("Digits:", regex="[0-9]{40}", max_new_tokens=3, temperature=0)
    assert g.finish_reason == "length" and re.fullmatch("[0-9]+", g.text) and len(g.text) < 40


def test_stop_sequences_still_apply(client):
    g = client.generate("Letters:", regex="[a-z]{1,30}x[a-z]{1,30}", stop=["x"], max_new_tokens=60,
                        temperature=1.0, seed=3)
    assert g.finish_reason == "stop_sequence" and re.fullmatch("[a-z]+", g.text), g.text  # cut before the x


def test_samples_of_one_request_each_satisfy_it(client):
    gens = client.generate_samples("The colour is", n=4, choice=["red", "green", "blue", "grey"], temperature=1.0,
                                   seed=7)
    assert len(gens) == 4 and all(g.text in ("red", "green", "blue", "grey") for g in gens)
    again = client.generate_samples("The colour is", n=4, choice=["red", "green", "blue", "grey"], temperature=1.0,
                                    seed=7)
    assert [g.text for g in again] == [g.text for g in gens]  # a seed replays


def test_logprobs_are_the_models_own(client):
    """Logprobs come from the raw distribution, not the constrained one: they equal Score's."""
    g = client.generate("The answer is", choice=["maybe later", "yes"], temperature=0, logprobs=True)
    scored = client.score([("The answer is", g.text)])[0]
    assert [t.id for t in g.tokens] == [t.id for t in scored.tokens[:len(g.tokens)]]
    for got, want in zip(g.tokens, scored.tokens):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-3)
    assert sum(t.logprob for t in g.tokens) < -0.01  # constrained, the choice would have probability 1


@pytest.mark.parametrize("kind,value", [
    ("json_schema", "{not json"),
    ("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}'),
    ("json_schema", '{"type": "strnig"}'),
    ("json_schema", "x" * 70000),
    ("regex", "a(b"),
    ("regex", r"[^\s\S]"),
    ("grammar", "start: foo"),
    ("grammar", "start: /[^\\s\\S]/"),
    ("choice", []),
    ("choice", ["ok", ""]),
    ("choice", [f"c{i}" for i in range(300)]),
])
def test_invalid_constraints_name_their_field(client, kind, value):
    with pytest.raises(TokenwireError) as e:
        client.generate("Hi", max_new_tokens=4, **{kind: value})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"constraint.{kind}" in str(e.value)


def test_two_constraints_at_once_are_refused_by_the_client(client):
    with pytest.raises(ValueError, match="at most one constraint"):
        client.generate("Hi", regex="a", choice=["a"])


def test_model_info_reports_the_constraint_limits(client, served):
    limits = client.info().limits
    own = served.llm.constraints.limits
    assert (limits.max_constraint_chars, limits.max_choices, limits.constraint_compile_seconds) == \
        (own.max_chars, own.max_choices, own.compile_seconds) and limits.max_constraint_chars > 0


def slow_schema(tag: int) -> dict:
    """About 60,000 characters of alternatives: llguidance's slowest compile found (0.1-0.2 s
    and 20-40 ms for the first mask, each), distinct per tag so that none comes from the cache.
    After its "{", 1,800 possible keys are past llguidance's parser limits for one step."""
    return {"anyOf": [{"type": "object", "properties": {f"t{tag}k{j}_{i}": {"type": "string"} for i in range(20)}}
                      for j in range(90)]}


def _one_token(client, schema):
    """Its first token, "{", and then the error of a schema past the parser's limits."""
    with pytest.raises(TokenwireError) as e:
        client.generate("Hi", json_schema=schema, max_new_tokens=2)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "constraint.json_schema" in str(e.value)
    assert "max is 2000" in str(e.value)  # llguidance's own reason, clipped


def test_a_schema_past_the_parser_limits_fails_alone(client):
    with ThreadPoolExecutor(2) as pool:
        fine = pool.submit(client.generate, "Count:", max_new_tokens=30, ignore_eos=True)
        _one_token(client, slow_schema(1000))
        assert len(fine.result().tokens) == 30


def test_compiling_slow_schemas_does_not_stall_a_stream(client):
    """Gaps between a stream's tokens while 8 slow schemas compile beside it stay as they are alone."""
    def gaps(during=None):
        times, started = [], threading.Event()
        def burst():
            started.wait()
            with ThreadPoolExecutor(8) as pool:  # compiled, then each costs the stream one short prompt
                list(pool.map(lambda t: _one_token(client, slow_schema(t + during)), range(8)))
        thread = threading.Thread(target=burst) if during is not None else None
        if thread:
            thread.start()
        for delta in client.generate_stream("Count to a hundred:", max_new_tokens=60, ignore_eos=True, temperature=0):
            times.append(time.monotonic())
            if len(times) == 10:
                started.set()
        if thread:
            thread.join()
        return [b - a for a, b in zip(times[10:], times[11:])]
    alone = gaps()
    beside = gaps(during=0)
    # a compile that held the GIL or ran on the engine thread shows as a gap of its length (0.1-0.3 s)
    assert max(beside) < max(3 * statistics.median(alone), max(alone)) + 0.08, (alone, beside)


def test_cli_flags(served, tmp_path):
    from .test_client_cli import cli
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(REVIEW))
    grammar = tmp_path / "arithmetic.lark"
    grammar.write_text(ARITHMETIC)
    out = cli(served, "generate", "--chat", "Analyse: 'great value'", "--json-schema", str(schema),
              "--temperature", "0", "--max-new-tokens", "200")
    jsonschema.validate(json.loads(out.stdout), REVIEW)
    inline = '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}'
    out = cli(served, "generate", "Status:", "--json-schema", inline, "--temperature", "0")
    assert json.loads(out.stdout)["ok"] in (True, False)
    assert cli(served, "generate", "The sky is", "--choice", "blue", "--choice", "grey", "--temperature",
               "0").stdout.strip() in ("blue", "grey")
    assert re.fullmatch("[0-9]{4}", cli(served, "generate", "Year:", "--regex", "[0-9]{4}").stdout.strip())
    ARITHMETIC_LARK.parse(cli(served, "generate", "Sum:", "--grammar", str(grammar),
                              "--max-new-tokens", "60").stdout.strip())
    out = cli(served, "generate", "--chat", "A JSON object with your name.", "--json-object", "--max-new-tokens", "60")
    assert out.stdout.startswith("{")  # (an object; a prefix of one if it ran to the token limit)
    if "[eos:" in out.stderr:
        assert isinstance(json.loads(out.stdout), dict)
    bad = cli(served, "generate", "Hi", "--regex", "a(b", check=False)
    assert bad.returncode != 0 and "constraint.regex" in bad.stderr


def test_async_client_and_streams_take_constraints(client, served):
    import asyncio

    from tokenwire import AsyncClient

    async def main():
        async with AsyncClient(served.address, timeout=60) as c:
            g = await c.generate("Year:", regex="[0-9]{4}", temperature=0)
            events = [e async for e in c.generate_stream("Pick:", choice=["left", "right"], temperature=0)]
            return g, events
    g, events = asyncio.run(main())
    assert re.fullmatch("[0-9]{4}", g.text)
    assert "".join(getattr(e, "text", "") for e in events) in ("left", "right")
    with client.generate_stream("Pick:", choice=["up", "down"], temperature=0) as stream:
        assert "".join(d.text for d in stream.deltas()) in ("up", "down")
