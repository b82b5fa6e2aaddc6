"""Hugging Face model directories: config.json plus *.safetensors (never pickles)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint_files import read_json
from ..errors import CheckpointError
from ..progress import progress
from .config import ModelConfig

_LLAMA_LAYER = {
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored (in, out)


def read_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    hf = read_json(path)
    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    try:
        if arch in ("LlamaForCausalLM", "llama"):
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise CheckpointError(path, "Llama checkpoints with biases are not supported")
            # transformers 5 nests rope settings under rope_parameters.
            rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
            theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
            scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
            n_heads = hf["num_attention_heads"]
            return ModelConfig(
                architecture="llama", vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                hidden_dim=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                norm_eps=hf.get("rms_norm_eps", 1e-6), head_dim=hf.get("head_dim") or 0,
                tie_embeddings=hf.get("tie_word_embeddings", False), rope_theta=float(theta),
                rope_scaling=scaling, name=hf.get("_name_or_path") or directory.name)
        if arch in ("GPT2LMHeadModel", "gpt2"):
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise CheckpointError(path, f"activation {hf['activation_function']!r} is not supported")
            dim = hf["n_embd"]
            return ModelConfig(
                architecture="gpt2", vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"],
                n_heads=hf["n_head"], n_kv_heads=hf["n_head"], hidden_dim=hf.get("n_inner") or 4 * dim,
                max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=True, name=hf.get("_name_or_path") or directory.name)
    except KeyError as e:
        raise CheckpointError(path, f"config field {e} is missing") from None
    raise CheckpointError(path, f"architecture {arch!r} is not supported "
                                "(supported: LlamaForCausalLM, GPT2LMHeadModel)")


def _our_name(config: ModelConfig, name: str) -> str | None:
    """Map a Hugging Face tensor name to ours; None for tensors we do not use."""
    if config.architecture == "llama":
        if name == "model.embed_tokens.weight":
            return "tok_embeddings.weight"
        if name == "model.norm.weight":
            return "norm.weight"
        if name == "lm_head.weight":
            return None if config.tie_embeddings else "output.weight"
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and ".".join(parts[3:-1]) in _LLAMA_LAYER:
            return f"layers.{parts[2]}.{_LLAMA_LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"
        return None if name.endswith("rotary_emb.inv_freq") else name
    name = name.removeprefix("transformer.")
    if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # tied head; causal-mask buffers of old checkpoints
    return name


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
