"""Every supported GGUF tensor type, in a tiny Llama GGUF written here: our loader and
transformers read the same file and give the same logits."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

from tokenwire_server.model.loader import load_model

DIM, HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 256
# Offsets of the float16 scale fields in each block of the K-quant types, which gguf cannot
# quantize to: random bytes elsewhere are valid quants, the scales are set to sane values.
K_SCALES = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """How llama.cpp's converter stores Q and K rows (rotary on interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, kind: Q, rng) -> np.ndarray:
    if kind not in K_SCALES:
        return quantize(w, kind)
    block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    for off in K_SCALES[kind]:
        raw[:, :, off:off + 2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if kind == Q.Q6_K:  # int8 sub-block scales: keep weights at the magnitude of real ones
        raw[:, :, 192:208] = rng.integers(-4, 5, raw[:, :, 192:208].shape).astype(np.int8).view(np.uint8)
    return raw.reshape(w.shape[0], -1)


def write_gguf(path, kind: Q, kinds: dict[str, Q] | None = None):
    """A tiny Llama GGUF whose matrices are of type `kind`, or kinds[tensor kind] ("attn_v")."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    for key, value in [("context_length", 128), ("embedding_length", DIM), ("block_count", LAYERS),
                       ("feed_forward_length", HIDDEN), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS)]:
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_uint32("llama.vocab_size", VOCAB)

    def tensor(name, shape, scale=0.05, permute_heads=0):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        if permute_heads:
            x = llama_cpp_permute(x, permute_heads)
        if len(shape) == 1:
            w.add_tensor(name, x + 1.0)  # norms stay float32, as in real files
        else:
            own = (kinds or {}).get(name.split(".")[-2], kind)
            w.add_tensor(name, encode(x, own, rng), raw_dtype=own)

    w.add_tensor("token_embd.weight", (rng.standard_normal((VOCAB, DIM)) * 0.5).astype(np.float32))
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", (DIM,))
        tensor(f"blk.{i}.attn_q.weight", (DIM, DIM), permute_heads=HEADS)
        tensor(f"blk.{i}.attn_k.weight", (DIM // HEADS * KV_HEADS, DIM), permute_heads=KV_HEADS)
        tensor(f"blk.{i}.attn_v.weight", (DIM // HEADS * KV_HEADS, DIM))
        tensor(f"blk.{i}.attn_output.weight", (DIM, DIM))
        tensor(f"blk.{i}.ffn_norm.weight", (DIM,))
        tensor(f"blk.{i}.ffn_gate.weight", (HIDDEN, DIM))
        tensor(f"blk.{i}.ffn_up.weight", (HIDDEN, DIM))
        tensor(f"blk.{i}.ffn_down.weight", (DIM, HIDDEN))
    tensor("output_norm.weight", (DIM,))
    tensor("output.weight", (VOCAB, DIM))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K],
                         ids=lambda k: k.name)
def test_tensor_type_matches_transformers(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"tiny-{kind.name}.gguf"
    write_gguf(path, kind)
    ours = load_model(path, torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ref(ids).logits
        got = ours(ids[0], torch.arange(40))[None]
    assert not ours.config.tie_embeddings
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
