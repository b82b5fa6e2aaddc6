"""Structured output in the engine: masks match llguidance's own, compiles are bounded and
cached, matchers survive preemption, and a constraint decides where the output ends."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch

from tokenwire_server.engine import FinishReason, SamplingParams
from tokenwire_server.engine.llm_engine import EngineRequest
from tokenwire_server.engine.structured import ConstraintCompiler, ConstraintLimits, allowed_tokens, mask_logits
from tokenwire_server.errors import InvalidArgument


def slow_schema(tag: int) -> str:
    """llguidance's slowest compile we found, 0.1-0.2 s (distinct per tag: never cached)."""
    return json.dumps({"anyOf": [{"type": "object", "properties": {f"t{tag}k{j}_{i}": {"type": "string"}
                                                                   for i in range(20)}} for j in range(90)]})


def test_masks_are_llguidances_own(engine, tokenizer):
    """Unpacked bits at the right token ids (checked against the library's own bitmask bytes),
    at a start state and mid-output, for several matchers in one fill."""
    c = engine.constraints.compile("json_schema", '{"type": "object", "properties": {"n": {"type": "integer"}}}')
    matchers = [c.matcher() for _ in range(3)]
    assert matchers[1].consume_tokens(tokenizer.encode('{"n": 1', add_special_tokens=False))
    assert matchers[2].consume_tokens(tokenizer.encode('{"n": 12}', add_special_tokens=False))
    vocab = engine.config.vocab_size
    rows = mask_logits(torch.zeros(3, vocab), allowed_tokens(matchers, vocab))
    for row, m in zip(rows, [c.matcher() for _ in range(1)] + matchers[1:]):
        want = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")[:vocab]
        assert torch.equal(row == 0, torch.from_numpy(want.astype(bool)))
    eos = tokenizer.eos_ids[0]
    assert rows[0, eos] == -float("inf") and rows[1, eos] == -float("inf") and rows[2, eos] == 0  # only when complete
    assert rows[0, tokenizer.encode("{", add_special_tokens=False)[0]] == 0


def eventually(compile_, *args):
    """The compile's result once it is in the cache (each call is bounded by the limit)."""
    end = time.monotonic() + 10
    while True:
        try:
            return compile_(*args)
        except InvalidArgument:
            assert time.monotonic() < end
            time.sleep(0.05)


def test_compile_is_bounded_in_time_and_its_result_kept(tokenizer, engine):
    compiler = ConstraintCompiler(tokenizer, engine.config.vocab_size, ConstraintLimits(compile_seconds=0.001))
    eventually(compiler.compile, "regex", "warm")  # the tokenizer is built once, outside the bound under test
    with pytest.raises(InvalidArgument, match=r"constraint\.json_schema: took longer than 0.001 s"):
        compiler.compile("json_schema", slow_schema(0))
    eventually(compiler.compile, "json_schema", slow_schema(0))  # the compile went on, for the next request


def test_the_cache_is_bounded_and_keyed_by_text(tokenizer, engine):
    compiler = ConstraintCompiler(tokenizer, engine.config.vocab_size, ConstraintLimits(cache_size=2))
    a = compiler.compile("regex", "a+")
    assert compiler.compile("regex", "a+") is a
    assert compiler.compile("grammar", 'start: "a"') is not compiler.compile("regex", "b+")
    compiler.compile("regex", "c+")
    assert compiler.compile("regex", "a+") is not a  # evicted, compiled again


@pytest.mark.parametrize("kind,value,message", [
    ("choice", ["a"] * 3 + [""], "a choice is empty"),
    ("json_object", False, "must be true"),
    ("regex", "", "is empty"),
    ("regex", r"[^\s\S]", "no output can satisfy it"),
    ("json_schema", '{"type": "object", "properties": {"a": {"type": "string", "minLength": 5, "maxLength": 2}}, '
                    '"required": ["a"]}', "nsatisfiable"),
    ("json_schema", "[1]", "object"),
    ("json_schema", '{"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}', "Unimplemented"),
])
def test_invalid_constraints(engine, kind, value, message):
    with pytest.raises(InvalidArgument, match=f"constraint.{kind}: .*{message}"):
        engine.constraints.compile(kind, value)


def test_json_is_on_one_line_unless_the_schema_says_otherwise(engine, tokenizer):
    spread = tokenizer.encode('{\n  "a": 1\n}', add_special_tokens=False)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert not engine.constraints.compile("json_schema", json.dumps(schema)).matcher().consume_tokens(spread)
    assert engine.constraints.compile("json_schema", json.dumps(schema)).matcher().consume_tokens(
        tokenizer.encode('{"a": 1}', add_special_tokens=False))
    free = {**schema, "x-guidance": {"whitespace_flexible": True}}
    assert engine.constraints.compile("json_schema", json.dumps(free)).matcher().consume_tokens(spread)


def generate(engine, tokenizer, prompt, **params) -> tuple[str, FinishReason]:
    outs = list(engine.generate(tokenizer.encode(prompt), SamplingParams(**params)))
    return "".join(o.text for o in outs), outs[-1].finish_reason


def test_the_constraint_decides_the_end(engine, tokenizer):
    regex = engine.constraints.compile("regex", "[0-9]{3}")
    text, reason = generate(engine, tokenizer, "Digits:", max_new_tokens=20, constraint=regex, ignore_eos=True,
                            min_new_tokens=10)
    assert re.fullmatch("[0-9]{3}", text) and reason == FinishReason.EOS  # complete: nothing more can follow
    text, reason = generate(engine, tokenizer, "Digits:", max_new_tokens=2, constraint=regex)
    assert reason == FinishReason.LENGTH and re.fullmatch("[0-9]{1,2}", text)  # a valid prefix
    open_ended = engine.constraints.compile("regex", "[0-9]+")
    text, reason = generate(engine, tokenizer, "Digits:", max_new_tokens=40, constraint=open_ended, temperature=1.0,
                            seed=1)
    assert re.fullmatch("[0-9]+", text) and reason in (FinishReason.EOS, FinishReason.LENGTH)


def test_preempted_constrained_requests_resume_their_matchers(make_engine, engine, tokenizer):
    """Long constrained outputs in a cache too small for all of them: preempted mid-output and
    recomputed, each ends as it does alone, and valid."""
    pattern = "[a-z]{1,8}( [a-z]{1,8}){10,16}"
    constraint = engine.constraints.compile("regex", pattern)
    requests = [EngineRequest(f"r{i}", tuple(tokenizer.encode(f"Write words about topic {i}. " * 3)),
                              SamplingParams(temperature=0.8, seed=i, max_new_tokens=80, constraint=constraint))
                for i in range(4)]
    def run(eng, reqs):
        got = {r.request_id: [] for r in reqs}
        for r in reqs:
            eng.add_request(r)
        while eng.has_work():
            for out in eng.step():
                got[out.request_id].append(out)
        return got
    alone = {}
    for r in requests:
        alone |= run(make_engine(kv_cache_tokens=1024, batch_invariant=True), [r])
    small = make_engine(kv_cache_tokens=128, batch_invariant=True)
    together = run(small, requests)
    assert small.num_preemptions > 0
    for r in requests:
        assert [o.token_id for o in together[r.request_id]] == [o.token_id for o in alone[r.request_id]]
        text = "".join(o.text for o in together[r.request_id])
        assert together[r.request_id][-1].finish_reason == FinishReason.EOS and re.fullmatch(pattern, text), text
