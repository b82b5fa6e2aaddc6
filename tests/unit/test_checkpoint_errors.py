"""Damaged, truncated and unsupported checkpoints give one clear error naming the file."""

import json

import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFWriter

from tokenwire_server.engine import LLMEngine
from tokenwire_server.errors import CheckpointError
from tokenwire_server.model.loader import load_model


def expect_error(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        LLMEngine.from_checkpoint(path, dtype="float32", device="cpu")
    assert str(path) in str(e.value)


def test_truncated_gguf(tmp_path, model_path):
    for size in (2_000, 5_000_000, model_path.stat().st_size - 1000):
        path = tmp_path / f"cut-{size}.gguf"
        with model_path.open("rb") as src:
            path.write_bytes(src.read(size))
        expect_error(path, "truncated or corrupt")


def test_corrupt_gguf(tmp_path, model_path):
    path = tmp_path / "corrupt.gguf"
    with model_path.open("rb") as src:
        head = src.read(24)
    path.write_bytes(head + np.random.default_rng(0).bytes(3_000_000))
    expect_error(path, "truncated or corrupt")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello")
    expect_error(path, "bad magic")
    expect_error(tmp_path / "missing.gguf", "no such file")
    expect_error(tmp_path, "no config.json")


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match=r"architecture 'mamba' is not supported \(supported: llama, qwen2, "
                                              r"qwen3, gemma2, gemma3, phi3\)"):
        load_model(path)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def test_pickled_checkpoints_are_refused(tiny_llama_dir, monkeypatch):
    (tiny_llama_dir / "model.safetensors").rename(tiny_llama_dir / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(CheckpointError, match="pickled"):
        load_model(tiny_llama_dir)


def test_corrupt_and_truncated_safetensors(tiny_llama_dir):
    weights = tiny_llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(tiny_llama_dir)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tiny_llama_dir)


def test_shape_mismatch_and_bad_config(tiny_llama_dir):
    config_path = tiny_llama_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(CheckpointError, match=r"feed_forward\.w\d\.weight has shape \((16, 32|32, 16)\), expected"):
        load_model(tiny_llama_dir)
    config_path.write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"'MambaForCausalLM' is not supported \(supported: LlamaForCausalLM, "
                                              r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                                              r"Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel\)"):
        load_model(tiny_llama_dir)
    config_path.write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json: cannot read JSON"):
        load_model(tiny_llama_dir)
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(CheckpointError, match="'hidden_size' is missing"):
        load_model(tiny_llama_dir)
