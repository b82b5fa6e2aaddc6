"""GGUF checkpoints (llama.cpp's format): config from metadata, weights dequantized at load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from ..errors import CheckpointError
from ..checkpoint_files import metadata
from ..progress import progress
from .config import ModelConfig
from .int4 import Q4Weight, unpack

# Types checked against the reference; gguf.quants dequantizes others as well.
TENSOR_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

_LAYER_NAMES = {
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


def read_config(reader: GGUFReader, path: Path) -> ModelConfig:
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(path, f"GGUF architecture {arch!r} is not supported (supported: llama)")

    def need(key):
        value = metadata(reader, f"llama.{key}")
        if value is None:
            raise CheckpointError(path, f"GGUF metadata llama.{key} is missing")
        return value

    n_heads = need("attention.head_count")
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(path, "tensor token_embd.weight is missing")
    factors = None
    if "rope_freqs.weight" in tensors:
        factors = tuple(float(x) for x in _dequantize(tensors["rope_freqs.weight"], path))
    scaling = None
    if metadata(reader, "llama.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    dim = need("embedding_length")
    return ModelConfig(
        architecture="llama",
        vocab_size=int(embd.shape[1]),
        dim=dim,
        n_layers=need("block_count"),
        n_heads=n_heads,
        n_kv_heads=metadata(reader, "llama.attention.head_count_kv", n_heads),
        hidden_dim=need("feed_forward_length"),
        max_seq_len=need("context_length"),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        head_dim=metadata(reader, "llama.attention.key_length", dim // n_heads),
        tie_embeddings="output.weight" not in tensors,
        rope_theta=float(metadata(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_freq_factors=factors,
        name=metadata(reader, "general.name", path.stem),
    )


def _dequantize(tensor, path: Path) -> np.ndarray:
    kind = GGMLQuantizationType(tensor.tensor_type).name
    if kind not in TENSOR_TYPES:
        raise CheckpointError(path, f"tensor {tensor.name} has unsupported type {kind}")
    try:
        return dequantize(tensor.data, tensor.tensor_type)  # numpy order: (out, in)
    except Exception as e:
        raise CheckpointError(path, f"tensor {tensor.name} ({kind}) cannot be read: {e}") from None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores Q and K rows permuted for rotary on interleaved pairs; restore the
    reference layout (rotary on halves) so one model serves GGUF and safetensors alike."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _model_name(tensor_name: str, path: Path) -> str:
    parts = tensor_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise CheckpointError(path, f"unexpected tensor {tensor_name}")


def _row_order(tensor_name: str, rows: int, config: ModelConfig) -> np.ndarray | None:
    """The un-permutation of Q and K rows (None for other tensors)."""
    kind = tensor_name.split(".")[-2]
    heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}.get(kind)
    return None if heads is None else _unpermute(np.arange(rows), heads)


def read_weights(reader: GGUFReader, config: ModelConfig, path: Path,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to `dtype`, under the model's parameter names."""
    weights = {}
    for t in progress(reader.tensors, len(reader.tensors), f"loading {path.name}"):
        if t.name == "rope_freqs.weight":
            continue  # folded into the config
        name = _model_name(t.name, path)
        w = _dequantize(t, path)
        order = _row_order(t.name, w.shape[0], config)
        if order is not None:
            w = w[order]
        weights[name] = torch.from_numpy(np.require(w, requirements=["C", "W"])).to(dtype)
    return weights


def read_q4(reader: GGUFReader, config: ModelConfig, path: Path) -> dict[str, Q4Weight]:
    """The Q4_0/Q4_1 tensors as 4-bit codes and scales, under the model's parameter names."""
    out = {}
    for t in reader.tensors:
        kind = GGMLQuantizationType(t.tensor_type).name
        if kind in ("Q4_0", "Q4_1") and t.data.ndim == 2:
            q4 = unpack(np.asarray(t.data), kind)
            order = _row_order(t.name, q4.codes.shape[0], config)
            out[_model_name(t.name, path)] = q4 if order is None else q4.rows(order)
    return out
