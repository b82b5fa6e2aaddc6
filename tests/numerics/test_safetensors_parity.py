"""Tiny random Llama and GPT-2 checkpoints written by transformers' save_pretrained (safetensors),
loaded by our loader: logits equal transformers' own."""

import pytest
import torch
import transformers

from tokenwire_server.engine import LLMEngine
from tokenwire_server.model.loader import load_model

ATOL, RTOL = 1e-5, 1e-5

LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA_CASES = {
    "tied": dict(tie_word_embeddings=True),
    "untied-mha": dict(tie_word_embeddings=False, num_key_value_heads=4, rope_theta=500000.0),
    "llama3-scaling": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "linear-scaling": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def save(model_cls, config, directory):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def compare(ref, directory, vocab):
    ours = load_model(directory, torch.float32)
    ids = torch.randint(0, vocab, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(ids).logits
        for row in range(2):
            torch.testing.assert_close(ours(ids[row], torch.arange(150)), expected[row], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama(tmp_path, case):
    config = transformers.LlamaConfig(**{**LLAMA, **LLAMA_CASES[case]})
    ref = save(transformers.LlamaForCausalLM, config, tmp_path)
    compare(ref, tmp_path, config.vocab_size)


def test_gpt2(tmp_path):
    config = transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    ref = save(transformers.GPT2LMHeadModel, config, tmp_path)
    compare(ref, tmp_path, config.vocab_size)


def test_model_directory_with_tokenizer(tmp_path, hf_tokenizer, tokenizer):
    """A full Hugging Face directory (weights, tokenizer.json, chat template) serves as --model."""
    config = transformers.LlamaConfig(**{**LLAMA, "vocab_size": tokenizer.vocab_size, "tie_word_embeddings": True,
                                         "eos_token_id": 2, "bos_token_id": 1})
    save(transformers.LlamaForCausalLM, config, tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    engine = LLMEngine.from_checkpoint(tmp_path, dtype="float32", device="cpu")
    text = "Digits 12345 and  spaces  99, émoji 🎉, 中文."
    assert engine.tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert engine.tokenizer.eos_ids == (2,)
    messages = [{"role": "user", "content": "hi"}]
    assert engine.tokenizer.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_bfloat16_load(tmp_path):
    config = transformers.LlamaConfig(**LLAMA)
    save(transformers.LlamaForCausalLM, config, tmp_path)
    model = load_model(tmp_path, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 512, (20,))
    with torch.inference_mode():
        logits = model(ids, torch.arange(20))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
