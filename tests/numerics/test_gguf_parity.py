"""The default GGUF loaded by us and by transformers: same logits, same greedy text."""

import pytest
import torch

from tokenwire_server.engine import SamplingParams

# float32 on both sides; logits are ~20-25 in magnitude, quantized weights dequantized alike.
ATOL, RTOL = 2e-4, 1e-4

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "List of prime numbers: 2, 3, 5, 7, 11,",
    "Photosynthesis is the process by which plants",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(engine, hf_model, tokenizer, prompt):
    ids = tokenizer.encode(prompt)
    ours = engine.runner.logits(ids)
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_greedy_continuations_match_transformers(engine, hf_model, tokenizer):
    full_length = 0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        ours = [t.token_id for t in engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=64))]
        with torch.inference_mode():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                    eos_token_id=list(tokenizer.eos_ids), pad_token_id=0)
        ref = out[0, len(ids):].tolist()
        assert ours == ref[: len(ours)], prompt
        assert len(ours) == len(ref) or ref[len(ours)] == 0  # HF pads after its end token
        full_length += len(ours) == 64
    assert full_length >= 3  # at least three prompts compared over all 64 tokens


def test_chat_answer_names_paris(engine, tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tokenizer.encode(prompt, allow_special=True)
    out = [t.token_id for t in engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=32))]
    assert "Paris" in tokenizer.decode(out)
