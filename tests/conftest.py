"""Session fixtures: the default model is fetched and loaded once per test session."""

from __future__ import annotations

import os

import pytest

# Servers that tests start skip torch.compile's start-up compile (30 s to 2 min each); the tests
# of compiled decoding turn it on themselves.
os.environ.setdefault("TOKENWIRE_COMPILE_MAX_ROWS", "0")

from tokenwire_server import registry


@pytest.fixture(scope="session")
def model_path():
    """The default model's GGUF in the model cache, pulled on first use."""
    return registry.pull(registry.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def engine(model_path):
    from tokenwire_server.engine import LLMEngine
    from tokenwire_server.engine.llm_engine import EngineConfig

    return LLMEngine.from_checkpoint(model_path, dtype="float32", device="cpu",
                                     config=EngineConfig(kv_cache_tokens=32768))


@pytest.fixture(scope="session")
def make_engine(engine):
    """Another engine over the session's loaded model, with its own cache and settings."""
    from tokenwire_server.engine import LLMEngine
    from tokenwire_server.engine.llm_engine import EngineConfig

    def make(**config) -> LLMEngine:
        r = engine.runner
        return LLMEngine(r.model, engine.tokenizer, r.device, r.dtype, engine.name, EngineConfig(**config))

    return make


@pytest.fixture(scope="session")
def tokenizer(engine):
    return engine.tokenizer


@pytest.fixture(scope="session")
def hf_model(model_path):
    """transformers' own reading of the same GGUF: the numerics reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
