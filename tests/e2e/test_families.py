"""`tokenwire-server serve --model DIR` on a tiny checkpoint of each family, with a tokenizer
in that family's style: over gRPC, Tokenize gives the `tokenizers` library's ids, Generate
transformers' greedy tokens and Score its logprobs, and ModelInfo names the family."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny_models import FAMILIES, build, build_with_tokenizer
from tiny_tokenizers import save_tokenizer

from tokenwire import Client

from .server_process import server_process


@pytest.fixture(scope="module", params=list(FAMILIES))
def served_family(request, tmp_path_factory):
    """(family, transformers' model, tokenizers' tokenizer, a client of a server of it)."""
    family = request.param
    directory = tmp_path_factory.mktemp(family)
    # Phi-3 served within its original context: transformers' short factors for these short texts.
    extra = {"original_max_position_embeddings": 256} if family == "phi3" else {}
    model, reference_tokenizer, info = build_with_tokenizer(family, directory, **extra)
    eos_ids = info["eos"]
    with server_process(directory, directory / "server.log", "--dtype", "float32", "--threads", "1",
                        "--kv-cache-tokens", "4096") as address, Client(address, timeout=60) as client:
        yield family, model, reference_tokenizer, eos_ids, client


TEXT = "Hello world! 12345 naïve café, 中文 🎉 <|im_start|> <start_of_turn>"


def test_model_info_names_the_family(served_family):
    family, model, reference, eos_ids, client = served_family
    info = client.info()
    assert info.architecture == family
    assert info.vocab_size == reference.get_vocab_size()
    assert set(info.end_token_ids) == set(eos_ids)
    assert info.has_chat_template


def test_tokenize_matches_tokenizers(served_family):
    _, _, reference, _, client = served_family
    reference.encode_special_tokens = True  # user text never becomes control tokens
    assert client.tokenize(TEXT)[0].ids == reference.encode(TEXT, add_special_tokens=False).ids
    assert client.detokenize(client.tokenize(TEXT)[0].ids) == TEXT


def test_generate_matches_transformers_greedy(served_family):
    family, model, _, _, client = served_family
    messages = [{"role": "user", "content": "Write a haiku about autumn."}]
    out = client.generate(messages=messages, max_new_tokens=16, ignore_eos=True, temperature=0, prompt_tokens=True)
    seq = [t.id for t in out.prompt_tokens]
    with torch.inference_mode():
        for _ in range(16):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert [t.id for t in out.tokens] == seq[len(out.prompt_tokens):]


def test_score_matches_transformers(served_family):
    _, model, _, _, client = served_family
    scored = client.score([TEXT])[0]
    ids = client.tokenize(TEXT, add_special_tokens=True)[0].ids
    assert [t.id for t in scored.tokens] == ids[1:]  # every token after the first
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    expected = sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
    assert scored.logprob_sum == pytest.approx(expected, abs=1e-3)


def test_unsupported_architecture_fails_at_start(tmp_path):
    build("llama", tmp_path)
    config = (tmp_path / "config.json").read_text().replace("LlamaForCausalLM", "MambaForCausalLM")
    (tmp_path / "config.json").write_text(config)
    save_tokenizer("qwen2", tmp_path)
    done = subprocess.run([sys.executable, "-m", "tokenwire_server.main", "serve", "--model", str(tmp_path),
                           "--port", "0", "--http-port", "0", "--metrics-port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "architecture 'MambaForCausalLM' is not supported (supported: LlamaForCausalLM, MistralForCausalLM, " \
           "Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM, " \
           "GPT2LMHeadModel)" in done.stderr
    assert "Traceback" not in done.stderr
