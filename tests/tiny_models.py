"""Tiny random checkpoints of each decoder family, made by transformers' own classes and
written as a Hugging Face directory (save_pretrained) and as a GGUF file in llama.cpp's
layout for that family (tensor names, Llama's permuted q/k rows, Gemma's 1 + norm weights,
Phi-3's fused tensors)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import transformers
from gguf import GGUFWriter

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            initializer_range=0.2)  # weights large enough that soft-capping bites
WINDOW = 8  # small enough that the tests' sequences pass it
PHI3_FACTORS = dict(short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[2.0 + 0.5 * i for i in range(8)])

# family -> (config class, model class, the family's structural options)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=True, rope_theta=500000.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=WINDOW)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(rope_theta=1000000.0)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                    final_logit_softcapping=3.0)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(sliding_window=WINDOW, query_pre_attn_scalar=16, num_hidden_layers=4,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 1000000.0}})),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(original_max_position_embeddings=64, pad_token_id=0, eos_token_id=2,
                  rope_scaling=dict(type="longrope", **PHI3_FACTORS))),
}


# The tokenizer style (tests/tiny_tokenizers.py) each family's models use.
TOKENIZER_STYLE = {"llama": "qwen2", "mistral": "phi3", "qwen2": "qwen2", "qwen3": "qwen2", "gemma2": "gemma",
                   "gemma3": "gemma", "phi3": "phi3"}


def build(family: str, directory: Path, vocab_size: int = 512, **overrides) -> torch.nn.Module:
    """A random model of the family, saved to directory; returns transformers' model."""
    config_cls, model_cls, options = FAMILIES[family]
    config = config_cls(**{**BASE, **options, "vocab_size": vocab_size, **overrides})
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # init leaves norms at 1 (Gemma: 0) and biases at 0: make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if family.startswith("gemma") else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return model


# ---- GGUF, as llama.cpp's converter writes each family ----

_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "post_attention_layernorm": "ffn_norm"}
_GEMMA_LAYER = {**_LAYER, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """How llama.cpp's converter stores a Llama's Q and K rows (rotary on interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(family: str, model: torch.nn.Module, path: Path) -> None:
    """The model as llama.cpp's convert_hf_to_gguf.py would store it, in float32."""
    c = model.config
    arch = "llama" if family == "mistral" else family
    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.context_length", c.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", c.hidden_size)
    w.add_uint32(f"{arch}.block_count", c.num_hidden_layers)
    w.add_uint32(f"{arch}.feed_forward_length", c.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", c.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", c.num_key_value_heads)
    w.add_uint32(f"{arch}.attention.key_length", c.head_dim)
    w.add_uint32(f"{arch}.attention.value_length", c.head_dim)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_uint32(f"{arch}.vocab_size", c.vocab_size)
    if c.pad_token_id is not None:
        w.add_uint32("tokenizer.ggml.padding_token_id", c.pad_token_id)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", rope["factor"])
    if family == "gemma3":
        w.add_float32(f"{arch}.rope.freq_base_swa", c.rope_parameters["sliding_attention"]["rope_theta"])
        w.add_array(f"{arch}.attention.sliding_window_pattern",
                    [t == "sliding_attention" for t in c.layer_types])
    if family.startswith("gemma"):
        w.add_uint32(f"{arch}.attention.sliding_window", c.sliding_window)
        if family == "gemma2":
            w.add_float32(f"{arch}.attn_logit_softcapping", c.attn_logit_softcapping)
            w.add_float32(f"{arch}.final_logit_softcapping", c.final_logit_softcapping)
    tensors = {}
    if family == "phi3":
        original = rope["original_max_position_embeddings"]
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", original)
        w.add_uint32(f"{arch}.rope.dimension_count", int(c.head_dim * rope.get("partial_rotary_factor", 1.0)))
        scale = c.max_position_embeddings / original
        w.add_float32(f"{arch}.rope.scaling.attn_factor", math.sqrt(1 + math.log(scale) / math.log(original)))
        w.add_uint32(f"{arch}.attention.sliding_window", c.sliding_window or 0)
        tensors["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        tensors["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    layer_names = _GEMMA_LAYER if family.startswith("gemma") else _LAYER
    for name, p in model.state_dict().items():
        x = p.float().numpy().copy()
        if name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            ours = "output.weight"
        elif name == "model.embed_tokens.weight":
            ours = "token_embd.weight"
        elif name == "model.norm.weight":
            ours = "output_norm.weight"
        else:
            parts = name.split(".")  # model.layers.N.<module>.<weight|bias>
            kind = layer_names[".".join(parts[3:-1])]
            ours = f"blk.{parts[2]}.{kind}.{parts[-1]}"
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                x = llama_cpp_permute(x, c.num_attention_heads if kind == "attn_q" else c.num_key_value_heads)
        if family.startswith("gemma") and name.endswith("norm.weight"):
            x = x + 1  # the converter stores Gemma's (1 + weight)
        tensors[ours] = x
    for name, x in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_with_tokenizer(family: str, directory: Path, **overrides) -> tuple[torch.nn.Module, object, dict]:
    """A servable model directory: the family's tiny model with a tokenizer in its style.
    Returns transformers' model, the `tokenizers` tokenizer and its info (eos, bos)."""
    from tiny_tokenizers import save_tokenizer

    tokenizer, info = save_tokenizer(TOKENIZER_STYLE[family], directory)
    model = build(family, directory, vocab_size=tokenizer.get_vocab_size(), eos_token_id=info["eos"],
                  bos_token_id=info["bos"], **overrides)
    return model, tokenizer, info


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="write a tiny random model of a family, with a tokenizer in "
                                                 "its style, as a Hugging Face directory")
    parser.add_argument("family", choices=list(FAMILIES))
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    model, _, _ = build_with_tokenizer(args.family, args.directory)
    print(f"wrote {args.directory}: {args.family}, {sum(p.numel() for p in model.parameters())} parameters")
