"""4-bit weights used as stored (Q4_0/Q4_1): exact codes and scales, the int4 kernel against
transformers on the same file, and a bfloat16 engine that uses them for small batches."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from tokenwire_server.engine import LLMEngine, SamplingParams
from tokenwire_server.engine.llm_engine import EngineConfig
from tokenwire_server.model.int4 import Int4Linear, Q4Weight, unpack
from tokenwire_server.model.int8 import Int8Linear
from tokenwire_server.model.linear import Linear, batch_invariant
from tokenwire_server.model.loader import load_model

from .test_gguf_types import VOCAB, write_gguf


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1], ids=lambda k: k.name)
def test_unpack_gives_the_stored_values(kind):
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    raw = quantize(w, kind)
    q4 = unpack(raw, kind.name)
    assert q4.codes.min() >= 0 and q4.codes.max() <= 15
    values = q4.codes.reshape(64, 4, 32) * q4.scale[..., None] + q4.minimum[..., None]
    np.testing.assert_array_equal(values.reshape(64, 128), dequantize(raw, kind))


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1], ids=lambda k: k.name)
def test_int4_model_matches_transformers(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"tiny-{kind.name}.gguf"
    write_gguf(path, kind)
    ours = load_model(path, torch.float32, int4_max_rows=8)
    linears = [m for m in ours.modules() if isinstance(m, Int4Linear)]
    assert len(linears) == 2 * 4 + 1  # every Q4 layer (q, k, v as one; gate, up as one) and the head
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ref(ids).logits
        got = ours(ids[0], torch.arange(8))[None]  # 8 rows: the int4 kernel everywhere
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_group_with_a_part_not_in_4_bits_multiplies_in_its_float_weights(tmp_path):
    """q, k and v are one product, so one 8-bit part keeps the whole group off the 4-bit
    kernel; gate and up of two 4-bit types still join."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny-mixed.gguf"
    write_gguf(path, Q.Q4_1, kinds={"attn_v": Q.Q8_0, "ffn_up": Q.Q4_0})
    ours = load_model(path, torch.float32, int4_max_rows=8)
    for layer in ours.layers:
        assert type(layer.attention.wqkv) is Linear and isinstance(layer.feed_forward.w13, Int4Linear)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids[0], torch.arange(8))[None], ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_int4_linear_picks_its_kernel_by_rows():
    codes = np.random.default_rng(1).integers(0, 16, (96, 128)).astype(np.uint8)
    groups = codes.shape[1] // 32
    scale = np.full((codes.shape[0], groups), 0.01, np.float32)
    q4 = Q4Weight(codes, scale, np.full_like(scale, -0.08))
    dense = torch.from_numpy((codes.reshape(len(codes), groups, 32) * 0.01 - 0.08).reshape(codes.shape)
                             .astype(np.float32))
    linear = torch.nn.Linear(dense.shape[1], dense.shape[0], bias=False)
    linear.weight.data = dense.clone()
    small = Int4Linear(linear, q4, max_rows=4)
    x = torch.randn(4, dense.shape[1])
    torch.testing.assert_close(small(x), F.linear(x, dense), atol=1e-4, rtol=1e-4)
    # Above max_rows the dense weight is used: the same parameter as before, bit for bit.
    small.weight.data[0, 0] += 1.0  # proves which weight the large batch reads
    x = torch.randn(5, dense.shape[1])
    torch.testing.assert_close(small(x), F.linear(x, small.weight), atol=0, rtol=0)


def test_batch_invariant_steps_take_the_4bit_kernel_at_every_size_and_rows_keep_their_bits():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, (256, 576)).astype(np.uint8)
    scale = rng.uniform(0.005, 0.02, (256, 576 // 32)).astype(np.float32)
    q4 = Q4Weight(codes, scale, -8 * scale)
    linear = torch.nn.Linear(576, 256, bias=False).to(torch.bfloat16)
    layer = Int4Linear(linear, q4, max_rows=4)
    x = torch.randn(300, 576).to(torch.bfloat16)
    with torch.inference_mode(), batch_invariant():
        alone = torch.cat([layer(x[i:i + 1]) for i in range(0, 300, 11)])
        for n in (2, 5, 64, 300):  # past max_rows too: still the 4-bit kernel, the same bits
            assert torch.equal(layer(x[:n])[::11], alone[:len(range(0, n, 11))]), n


def test_bfloat16_engine_uses_4bit_weights(model_path, engine):
    bf16 = LLMEngine.from_checkpoint(model_path, dtype="bfloat16", config=EngineConfig(kv_cache_tokens=1024))
    model = bf16.runner.model
    # Q4_1 layers: q, k and v are one, gate and up another
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 30 * 4
    # The head, tied to the Q8_0 embedding, keeps its 8-bit blocks: exactly the file's weights
    # (float32 dequantizes them exactly; bfloat16 rounds some).
    assert isinstance(model.output, Int8Linear) and model.output.weight is model.tok_embeddings.weight
    stored = (model.output.codes.float() * model.output.scale).flatten(1)
    assert torch.equal(stored, engine.runner.model.output.weight)
    assert not any(isinstance(m, Int4Linear) for m in engine.runner.model.modules())  # float32: off
    ids = engine.tokenizer.encode("The capital of France is")
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, top_n=3)
    got = [t.token for t in bf16.generate(ids, params)]
    want = [t.token for t in engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=12,
                                                                 ignore_eos=True, top_n=3))]
    for a, b in zip(got, want):  # bfloat16 may flip a near-tie of float32, nothing more
        if a.token_id != b.token_id:
            assert a.token_id in [i for i, _ in b.top] and b.token_id in [i for i, _ in a.top]
            break
    assert got[0].token_id == want[0].token_id
