"""load_model: a checkpoint path in, a ready nn.Module (with .config) out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..checkpoint_files import open_gguf
from . import gguf_loader, int4, int8, safetensors_loader
from .config import DECODER_FAMILIES, ModelConfig
from .gpt2 import GPT2
from .decoder import Decoder, fuse_projections

GGUF_MAGIC = b"GGUF"


def checkpoint_kind(path: Path) -> str:
    """'gguf' for a GGUF file, 'hf' for a Hugging Face model directory."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(path, "directory has no config.json (expected a Hugging Face model)")
        return "hf"
    if not path.is_file():
        raise CheckpointError(path, "no such file or directory")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(path, "not a GGUF file (bad magic) and not a model directory")
    return "gguf"


def read_config(path: Path) -> ModelConfig:
    if checkpoint_kind(path) == "hf":
        return safetensors_loader.read_config(path)
    return gguf_loader.read_config(open_gguf(path), path)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", reader=None, int4_max_rows: int = 0,
               max_context: int | None = None) -> nn.Module:
    """reader: an already opened GGUFReader of `path`, to avoid indexing the file twice.
    int4_max_rows > 0: on CPU, layers stored as Q4_0/Q4_1 multiply batches of at most that
    many rows with their 4-bit weights as stored (see int4.py), and Q8_0 layers multiply single
    rows in compiled steps with their 8-bit weights (int8.py). max_context: serve a shorter
    context than the model was trained for (Phi-3's rotary factors depend on it)."""
    path = Path(path)
    hf = checkpoint_kind(path) == "hf"
    if hf:
        config = safetensors_loader.read_config(path)
    else:
        reader = reader or open_gguf(path)
        config = gguf_loader.read_config(reader, path)
    if max_context and max_context < config.max_seq_len:
        config = dataclasses.replace(config, max_seq_len=max_context)
    if hf:
        weights = safetensors_loader.read_weights(path, config, dtype)
    else:
        weights = gguf_loader.read_weights(reader, config, path, dtype)
    model = build_model(config, fuse_projections(weights, torch.cat), path)
    if int4_max_rows > 0 and not hf and torch.device(device).type == "cpu":
        q4 = fuse_projections(gguf_loader.read_q4(reader, config, path), int4.Q4Weight.cat)
        int4.attach(model, q4, int4_max_rows)
        # A tied head multiplies with the embedding's stored blocks.
        tied = {"output.weight": "tok_embeddings.weight"} if config.tie_embeddings else {}
        int8.attach(model, fuse_projections(gguf_loader.read_q8(reader, config, path), int8.Q8Weight.cat), tied)
    return model.to(device).eval().requires_grad_(False)


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Make the module without allocating, check every tensor's name and shape, then assign."""
    cls = Decoder if config.architecture in DECODER_FAMILIES else GPT2
    with torch.device("meta"):
        model = cls(config)
    model.tie_weights()
    expected = {name: p.shape for name, p in model.named_parameters()}  # tied head listed once
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(path, f"tensors do not match a {config.architecture} model: "
                                    f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, w in weights.items():
        if w.shape != expected[name]:
            raise CheckpointError(path, f"tensor {name} has shape {tuple(w.shape)}, "
                                        f"expected {tuple(expected[name])}")
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()  # assign replaced the embedding; point the head at it again
    return model
