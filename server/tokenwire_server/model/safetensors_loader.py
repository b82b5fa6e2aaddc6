"""Hugging Face model directories: config.json plus *.safetensors (never pickles)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint_files import read_json
from ..errors import CheckpointError
from ..progress import progress
from .config import ModelConfig

# Hugging Face architectures -> our families.
FAMILIES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3", "GPT2LMHeadModel": "gpt2",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                "gemma3_text": "gemma3", "phi3": "phi3", "gpt2": "gpt2"}

_LAYER = {
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    # Phi-3 stores q, k and v rows in one tensor, and gate then up rows in another, as we hold them.
    "self_attn.qkv_proj": "attention.wqkv", "mlp.gate_up_proj": "feed_forward.w13",
}
# Gemma norms both sides of each block, and its post_attention_layernorm is not the others'.
_GEMMA_LAYER = {**_LAYER, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffn_norm"}
_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored (in, out)
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def read_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    hf = read_json(path)
    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    family = FAMILIES.get(arch, _MODEL_TYPES.get(arch))
    if family is None:
        raise CheckpointError(path, f"architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(FAMILIES)})")
    try:
        if family == "gpt2":
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise CheckpointError(path, f"activation {hf['activation_function']!r} is not supported")
            dim = hf["n_embd"]
            return ModelConfig(
                architecture="gpt2", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"],
                n_heads=hf["n_head"], n_kv_heads=hf["n_head"], hidden_dim=hf.get("n_inner") or 4 * dim,
                max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=True, name=hf.get("_name_or_path") or directory.name)
        return _decoder_config(family, hf, path, directory.name)
    except KeyError as e:
        raise CheckpointError(path, f"config field {e} is missing") from None


def _decoder_config(family: str, hf: dict, path: Path, name: str) -> ModelConfig:
    gemma = family.startswith("gemma")
    if hf.get("mlp_bias") or (hf.get("attention_bias") and family != "qwen2"):
        raise CheckpointError(path, f"{family} checkpoints with biases are not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise CheckpointError(path, f"activation {act!r} is not supported for {family}")
    n_heads, n_layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    theta, scaling, local_theta, rotary = _rope(family, hf, path)
    softcaps = (hf.get("attn_logit_softcapping") or 0.0, hf.get("final_logit_softcapping") or 0.0) \
        if gemma else (0.0, 0.0)
    return ModelConfig(
        architecture=family, vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        hidden_dim=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), head_dim=head_dim,
        tie_embeddings=hf.get("tie_word_embeddings", gemma), rope_theta=theta, rope_scaling=scaling,
        rotary_dim=int(head_dim * rotary), name=hf.get("_name_or_path") or name,
        qkv_bias=family == "qwen2", qk_norm=family in ("qwen3", "gemma3"), gemma=gemma,
        attn_scale=hf["query_pre_attn_scalar"] ** -0.5 if gemma else 0.0,
        attn_softcap=float(softcaps[0]), final_softcap=float(softcaps[1]),
        layer_windows=_windows(family, hf, n_layers), local_rope_theta=local_theta)


def _rope(family: str, hf: dict, path: Path) -> tuple[float, dict | None, float, float]:
    """(base, scaling of the full-attention layers, base of the windowed ones (0: the
    same), rotating fraction of each head), from either config layout: transformers 5's
    rope_parameters (per layer type for Gemma 3) or rope_theta beside rope_scaling."""
    params = hf.get("rope_parameters") or {}
    local = {}
    if "full_attention" in params:
        params, local = params["full_attention"], params.get("sliding_attention") or {}
    params = params or hf.get("rope_scaling") or {}
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    local_theta = float(hf.get("rope_local_base_freq", local.get("rope_theta", 0.0))) if family == "gemma3" else 0.0
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "su":  # Phi-3's early name for longrope
        kind = "longrope"
    if kind not in ROPE_TYPES:
        raise CheckpointError(path, f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    scaling = None
    if kind == "longrope":
        original = params.get("original_max_position_embeddings") or hf["original_max_position_embeddings"]
        factor = params.get("factor") or hf["max_position_embeddings"] / original
        scaling = {"rope_type": "longrope", "short_factor": list(params["short_factor"]),
                   "long_factor": list(params["long_factor"]), "original_max_position_embeddings": original,
                   # as transformers and llama.cpp's converter compute it
                   "attention_factor": params.get("attention_factor") or (
                       1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original)))}
    elif kind != "default":
        scaling = {**params, "rope_type": kind}
    rotary = hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    return theta, scaling, local_theta, rotary


def _windows(family: str, hf: dict, n_layers: int) -> tuple[int, ...]:
    """Per layer, the sliding window it attends within (0: all keys)."""
    window = hf.get("sliding_window") or 0
    if family == "qwen2" or family == "qwen3":
        window = window if hf.get("use_sliding_window") else 0
    if not window:
        return ()
    types = hf.get("layer_types")
    if not types:  # configs written before transformers listed them
        if family == "gemma2":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        elif family == "gemma3":
            pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        elif family in ("qwen2", "qwen3"):
            first = hf.get("max_window_layers", n_layers)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        else:
            types = ["sliding_attention"] * n_layers
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def _our_name(config: ModelConfig, name: str) -> str | None:
    """Map a Hugging Face tensor name to ours; None for tensors we do not use."""
    if config.architecture == "gpt2":
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # tied head; causal-mask buffers of old checkpoints
        return name
    if name == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return None if config.tie_embeddings else "output.weight"
    parts = name.split(".")
    layer = _GEMMA_LAYER if config.gemma else _LAYER
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:-1]) in layer:
        return f"layers.{parts[2]}.{layer['.'.join(parts[3:-1])]}.{parts[-1]}"
    return None if name.endswith("rotary_emb.inv_freq") else name


def read_weights(directory: Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(directory, "no *.safetensors files (pickled .bin checkpoints are refused)")
    weights = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                names = list(f.keys())
                for hf_name in progress(names, len(names), f"loading {file.name}"):
                    name = _our_name(config, hf_name)
                    if name is None:
                        continue
                    w = f.get_tensor(hf_name)
                    if config.architecture == "gpt2" and name.endswith(".weight") \
                            and name.rsplit(".", 1)[0].split(".", 2)[-1] in _GPT2_CONV1D:
                        w = w.t()
                    weights[name] = w.to(dtype).contiguous()
        except CheckpointError:
            raise
        except Exception as e:  # SafetensorError on a damaged header or truncated data
            raise CheckpointError(file, f"not a readable safetensors file ({e})") from None
    return weights
