"""Decode steps through the torch.compile'd forward (ModelRunner.compile_decode): each family's
attention as the compiler fuses it (one row's own float32 path, soft-caps, sliding windows)
gives transformers' logits at every step and every batch size up to the compiled limit, with
no step needing a graph the warm-up did not make; without a C++ compiler the engine decodes
eagerly and says why; the 8-bit head's single-row product keeps its float32 accuracy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tiny_models import WINDOW, build
from tiny_tokenizers import save_tokenizer

from tokenwire_server.engine import EngineRequest, LLMEngine, SamplingParams, model_runner
from tokenwire_server.engine.llm_engine import EngineConfig
from tokenwire_server.model.int8 import Int8Linear, unpack
from tokenwire_server.model.loader import load_model
from tokenwire_server.tokenizer.tokenizer import Tokenizer

ATOL = RTOL = 1e-4
ROWS = 4  # compile_max_rows: every row count up to it must run compiled


def ids(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_of(model, directory, **config) -> LLMEngine:
    return LLMEngine(model, Tokenizer.from_hf_dir(directory), torch.device("cpu"), torch.float32, "tiny",
                     EngineConfig(kv_cache_tokens=4096, block_size=4, **config))


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def compiled_family(request, tmp_path_factory):
    """(transformers' model, an engine of ours compiled for steps of up to ROWS rows). Llama's
    plain attention; Gemma 2's attention soft-cap and final soft-cap with sliding windows on
    alternate layers (each family costs a cold compile of ~30 s: two cover the compiled
    attention's options)."""
    directory = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, directory)
    save_tokenizer("qwen2", directory)  # the engine needs one; only ids matter here
    # Dynamo keeps every model's graphs on the one forward code object, up to its recompile
    # limit: each family starts afresh.
    torch._dynamo.reset()
    guards = []  # (guard name, checked on each call), as compile_decode's filter decided
    decide = model_runner._unchanging_state

    def recording(entries):
        keep = decide(entries)
        guards.extend((e.name, k) for e, k in zip(entries, keep))
        return keep

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_runner, "_unchanging_state", recording)
        engine = engine_of(load_model(directory), directory, compile_max_rows=ROWS)
    assert engine.runner.compiled is not None
    engine.guards = guards
    yield ref, engine
    torch._dynamo.reset()


@dataclass
class Decoded:
    sequences: dict = field(default_factory=dict)  # request id -> prompt and generated tokens
    logits: dict = field(default_factory=dict)  # request id -> [(position, logits)] of compiled steps
    decode_steps: list = field(default_factory=list)  # (rows, ran compiled) of decode-only steps
    eager_fallbacks: int = 0  # steps that would have needed a new graph


def decode(engine, prompts, max_new_tokens) -> Decoded:
    """Greedy decoding of prompts added at once, each to its own length; records what every
    step of the runner computed."""
    runner, execute, out = engine.runner, engine.runner.execute, Decoded()

    def recording(batch):
        before = runner.compiled_steps
        logits, spans = execute(batch)
        compiled = runner.compiled_steps > before
        if all(s.num_tokens == 1 for s in batch):
            out.decode_steps.append((len(batch), compiled))
        if compiled:
            for s, span in zip(batch, spans):
                out.logits.setdefault(s.seq.request_id, []).append((span.first, logits[span.row].clone()))
        return logits, spans

    runner.execute = recording
    fallbacks = runner.eager_fallbacks
    try:
        for i, (prompt, n) in enumerate(zip(prompts, max_new_tokens)):
            engine.add_request(EngineRequest(str(i), tuple(prompt), SamplingParams(
                temperature=0, max_new_tokens=n, ignore_eos=True)))
            out.sequences[str(i)] = list(prompt)
        while engine.has_work():
            for o in engine.step():
                out.sequences[o.request_id].append(o.token_id)
    finally:
        del runner.execute
    out.eager_fallbacks = runner.eager_fallbacks - fallbacks
    return out


def assert_matches_transformers(ref, decoded: Decoded):
    for request_id, seq in decoded.sequences.items():
        with torch.inference_mode():
            expected = ref(torch.tensor([seq])).logits[0]
        for position, logits in decoded.logits[request_id]:
            torch.testing.assert_close(logits, expected[position], atol=ATOL, rtol=RTOL)
            # Greedy: the token taken is the reference's choice.
            assert seq[position + 1] == int(expected[position].argmax())


def test_one_sequence_decodes_compiled_like_transformers(compiled_family):
    """One row: its own attention (kv_cache._one_row_decode), from a few keys to past every
    sliding window."""
    ref, engine = compiled_family
    decoded = decode(engine, [ids(5, seed=1)], [3 * WINDOW])
    assert decoded.decode_steps == [(1, True)] * (3 * WINDOW - 1)  # the first token comes from the prefill
    assert decoded.eager_fallbacks == 0
    assert_matches_transformers(ref, decoded)


def test_calls_check_the_inputs_but_not_the_model_or_the_cache(compiled_family):
    """The guards dynamo checks before each compiled call: the model's parameters and the KV
    cache's tensors (fixed while the runner lives) are left out; the step's own inputs, whose
    shapes pick the graph, are checked. (Without those, a graph of one row count could serve
    another. The batch test below would not see it here: in float32 with no 4-bit layers, 2
    to 4 rows share one graph.)"""
    _, engine = compiled_family
    kept = {name for name, keep in engine.guards if keep}
    dropped = {name for name, keep in engine.guards if not keep}
    assert any(name.startswith("self._modules['layers']") for name in dropped)
    assert any(name.startswith("meta.cache.k[") for name in dropped)
    assert not any(name.startswith(("self", "meta.cache")) for name in kept)
    assert {"tokens", "positions", "logits_indices", "meta.decode_key_slots", "meta.decode_mask"} <= kept


def test_batches_of_every_size_decode_compiled_like_transformers(compiled_family):
    """Four sequences of other lengths, finishing one after another: steps of 4, 3, 2 and 1
    rows with growing key counts all run on the graphs of the warm-up."""
    ref, engine = compiled_family
    prompts = [ids(n, seed=10 + i) for i, n in enumerate((3, 2 * WINDOW + 1, 11, 6))]
    decoded = decode(engine, prompts, [5, 9, 13, 2 * WINDOW + 1])
    assert {rows for rows, _ in decoded.decode_steps} == {1, 2, 3, 4}
    assert all(compiled for _, compiled in decoded.decode_steps), decoded.decode_steps
    assert decoded.eager_fallbacks == 0
    assert_matches_transformers(ref, decoded)


def test_without_a_cpp_compiler_decoding_stays_eager(tmp_path, monkeypatch, caplog):
    build("llama", tmp_path)
    save_tokenizer("qwen2", tmp_path)
    model = load_model(tmp_path)
    # No compiler, and nothing cached that would spare inductor from calling one: dynamo would
    # reuse the graphs of a model of the same shape compiled before, inductor its compiled code.
    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    try:
        with torch._inductor.config.patch({"cpp.cxx": (str(tmp_path / "no-such-c++"),), "fx_graph_cache": False}), \
                caplog.at_level(logging.WARNING, logger="tokenwire_server.engine.model_runner"):
            engine = engine_of(model, tmp_path, compile_max_rows=ROWS)
    finally:
        torch._dynamo.reset()
    assert engine.runner.compiled is None
    assert "decoding without torch.compile" in caplog.text and "No working C++ compiler" in caplog.text
    eager = engine_of(model, tmp_path)
    prompts = [ids(5, seed=1), ids(9, seed=2)]
    got, want = decode(engine, prompts, [12, 8]), decode(eager, prompts, [12, 8])
    assert got.sequences == want.sequences
    assert engine.runner.compiled_steps == 0


def q8_layer(n=96, k=256, seed=0):
    """An Int8Linear over Q8_0 blocks as gguf writes them; its float weight is the bfloat16 copy a
    bfloat16 model keeps, so that the result shows which weights a product read. Returns the
    layer and the stored weights (float64)."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    raw = quantize(w, Q.Q8_0)
    stored = torch.from_numpy(dequantize(raw, Q.Q8_0)).double()
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(stored.to(torch.bfloat16))
    return Int8Linear(linear, unpack(raw)), stored


def rows(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_int8_single_rows_multiply_the_8bit_weights_when_compiled():
    layer, stored = q8_layer()
    x = rows(1, stored.shape[1])
    exact = F.linear(x.double(), stored, layer.bias.double())
    with torch.inference_mode():
        got = torch.compile(layer, dynamic=True)(x)
    torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)  # float32's rounding
    bf16 = F.linear(x.bfloat16(), stored.bfloat16(), layer.bias.bfloat16()).double()
    assert (got.double() - exact).abs().max() < (bf16 - exact).abs().max() / 100


def test_int8_eager_and_multi_row_steps_use_the_float_weight():
    layer, stored = q8_layer()
    compiled = torch.compile(layer, dynamic=True)
    with torch.inference_mode():
        one = rows(1, stored.shape[1])
        assert torch.equal(layer(one), F.linear(one, layer.weight, layer.bias))  # eagerly: the float weight
        three = rows(3, stored.shape[1])
        torch.testing.assert_close(compiled(three), F.linear(three, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
