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
from . import int8
from .config import ModelConfig
from .int4 import Q4Weight, unpack

# Types checked against the reference; gguf.quants dequantizes others as well.
TENSOR_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

_LAYER_NAMES = {
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm",
    "post_attention_norm": "post_attention_norm", "post_ffw_norm": "post_ffn_norm",
}
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
# llama.cpp's architecture names -> our families. Mistral's files say "llama".
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3",
            "phi3": "phi3"}
# Tensors folded into the config, not the model's weights.
_CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def read_config(reader: GGUFReader, path: Path) -> ModelConfig:
    arch = metadata(reader, "general.architecture")
    family = FAMILIES.get(arch)
    if family is None:
        raise CheckpointError(path, f"GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(FAMILIES)})")

    def need(key):
        value = metadata(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(path, f"GGUF metadata {arch}.{key} is missing")
        return value

    def get(key, default=None):
        return metadata(reader, f"{arch}.{key}", default)

    n_heads, n_layers, dim = need("attention.head_count"), need("block_count"), need("embedding_length")
    head_dim = get("attention.key_length", dim // n_heads)
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(path, "tensor token_embd.weight is missing")
    factors = None
    if "rope_freqs.weight" in tensors:
        factors = tuple(float(x) for x in _dequantize(tensors["rope_freqs.weight"], path))
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    if "rope_factors_long.weight" in tensors:  # Phi-3's longrope
        scaling = {"rope_type": "longrope",
                   "long_factor": _dequantize(tensors["rope_factors_long.weight"], path).tolist(),
                   "short_factor": _dequantize(tensors["rope_factors_short.weight"], path).tolist(),
                   "original_max_position_embeddings": need("rope.scaling.original_context_length"),
                   "attention_factor": float(get("rope.scaling.attn_factor", 1.0))}
    gemma = family.startswith("gemma")
    window = get("attention.sliding_window", 0) or 0
    windows = ()
    if window and family in ("gemma2", "gemma3", "phi3", "llama"):
        # Gemma: every 2nd (Gemma 2) or 6th (Gemma 3) layer attends to all keys, unless the
        # file lists them; the others, all of them. As llama.cpp reads it.
        pattern = get("attention.sliding_window_pattern", {"gemma2": 2, "gemma3": 6}.get(family, 0))
        if isinstance(pattern, list):
            windows = tuple(window if swa else 0 for swa in pattern)
        else:
            windows = tuple(window if not pattern or i % pattern < pattern - 1 else 0 for i in range(n_layers))
    # llama.cpp scales Gemma's queries by head_dim ** -0.5, except for the 27B sizes (46 and
    # 62 layers), whose query_pre_attn_scalar is dim / n_heads; the files do not say.
    attn_scale = 0.0
    if gemma:
        attn_scale = (dim / n_heads if (family, n_layers) in (("gemma2", 46), ("gemma3", 62)) else head_dim) ** -0.5
    return ModelConfig(
        architecture=family,
        vocab_size=int(embd.shape[1]),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        hidden_dim=need("feed_forward_length"),
        max_seq_len=need("context_length"),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        head_dim=head_dim,
        tie_embeddings="output.weight" not in tensors,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_freq_factors=factors,
        rotary_dim=get("rope.dimension_count", 0) if family == "phi3" else 0,
        name=metadata(reader, "general.name", path.stem),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        gemma=gemma,
        attn_scale=attn_scale,
        attn_softcap=float(get("attn_logit_softcapping", 0.0) or 0.0) if gemma else 0.0,
        final_softcap=float(get("final_logit_softcapping", 0.0) or 0.0) if gemma else 0.0,
        layer_windows=windows if any(windows) else (),
        local_rope_theta=float(get("rope.freq_base_swa", 10000.0)) if family == "gemma3" and windows else 0.0,
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


def _model_name(tensor_name: str, config: ModelConfig, path: Path) -> str:
    """The model's name for a GGUF tensor."""
    parts = tensor_name.split(".")
    if parts[0] == "blk" and len(parts) == 4:
        layer, kind = f"layers.{parts[1]}", parts[3]
        if parts[2] == "attn_qkv":  # Phi-3: q, k and v rows in one tensor, as the model holds them
            return f"{layer}.attention.wqkv.{kind}"
        if parts[2] == "ffn_up" and config.architecture == "phi3":  # gate rows, then up: the same
            return f"{layer}.feed_forward.w13.{kind}"
        if parts[2] in _LAYER_NAMES:
            return f"{layer}.{_LAYER_NAMES[parts[2]]}.{kind}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise CheckpointError(path, f"unexpected tensor {tensor_name}")


def _row_order(tensor_name: str, rows: int, config: ModelConfig) -> np.ndarray | None:
    """The un-permutation of a Llama file's Q and K rows (None for other tensors and families:
    llama.cpp permutes only the Llama architecture's)."""
    kind = tensor_name.split(".")[-2]
    heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}.get(kind)
    if heads is None or config.architecture not in ("llama", "mistral"):
        return None
    return _unpermute(np.arange(rows), heads)


def _placed(tensor_name: str, w, config: ModelConfig, path: Path) -> tuple[str, object]:
    """A tensor (a numpy array, Q4Weight or Q8Weight) with its rows in the model's order, and its
    name in the model. Separate q, k, v (gate, up) tensors are joined later (fuse_projections)."""
    order = _row_order(tensor_name, w.shape[0], config)
    return _model_name(tensor_name, config, path), w if order is None else w[order]


def read_weights(reader: GGUFReader, config: ModelConfig, path: Path,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to `dtype`, under the model's parameter names."""
    weights = {}
    for t in progress(reader.tensors, len(reader.tensors), f"loading {path.name}"):
        if t.name in _CONFIG_TENSORS:
            continue
        w = _dequantize(t, path)
        if config.gemma and t.name.endswith("norm.weight"):
            w = w - 1  # llama.cpp's converter stores Gemma's (1 + weight); the model adds the 1
        name, w = _placed(t.name, w, config, path)
        weights[name] = torch.from_numpy(np.require(w, requirements=["C", "W"])).to(dtype)
    return weights


def read_q4(reader: GGUFReader, config: ModelConfig, path: Path) -> dict[str, Q4Weight]:
    """The Q4_0/Q4_1 tensors as 4-bit codes and scales, under the model's parameter names."""
    out = {}
    for t in reader.tensors:
        kind = GGMLQuantizationType(t.tensor_type).name
        if kind in ("Q4_0", "Q4_1") and t.data.ndim == 2 and t.name not in _CONFIG_TENSORS:
            name, w = _placed(t.name, unpack(np.asarray(t.data), kind), config, path)
            out[name] = w
    return out


def read_q8(reader: GGUFReader, config: ModelConfig, path: Path) -> dict[str, int8.Q8Weight]:
    """The Q8_0 tensors as 8-bit codes and scales, under the model's parameter names."""
    out = {}
    for t in reader.tensors:
        if t.tensor_type == GGMLQuantizationType.Q8_0 and t.data.ndim == 2 and t.name not in _CONFIG_TENSORS:
            name, w = _placed(t.name, int8.unpack(np.asarray(t.data)), config, path)
            out[name] = w
    return out
