"""KV-cached decoding gives the logits of recomputing the whole sequence, row by row."""

import torch

from tokenwire_server.engine import SamplingParams

ATOL, RTOL = 1e-4, 1e-4


def test_cached_decode_matches_recompute(engine, tokenizer):
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. Then")
    runner = engine.runner
    cache = runner.new_cache(1, len(prompt) + 16)
    logits = runner.prefill(cache, prompt)
    seq = list(prompt)
    for _ in range(16):
        torch.testing.assert_close(logits, runner.logits(seq)[-1], atol=ATOL, rtol=RTOL)
        token = int(logits.argmax())
        seq.append(token)
        logits = runner.decode(cache, [token], [len(seq) - 1])[0]


def test_batched_rows_at_different_positions(engine, tokenizer):
    """Two sequences of different lengths share one cache, each at its own position."""
    runner, model = engine.runner, engine.runner.model
    a = tokenizer.encode("Hello")
    b = tokenizer.encode("A much longer prompt that has quite a few more tokens in it")
    T = len(b)
    cache = runner.new_cache(2, T + 8)
    # Right-pad row a; its padding lands in slots past its length and is overwritten later.
    tokens = torch.tensor([a + [0] * (T - len(a)), b])
    positions = torch.arange(T).expand(2, T)
    with torch.inference_mode():
        logits = model(tokens, positions, cache, select=torch.tensor([len(a) - 1, T - 1]))
    seqs = [list(a), list(b)]
    for _ in range(6):
        for row in range(2):
            torch.testing.assert_close(logits[row], runner.logits(seqs[row])[-1], atol=ATOL, rtol=RTOL)
        nxt = logits.argmax(-1).tolist()
        for row in range(2):
            seqs[row].append(nxt[row])
        logits = runner.decode(cache, nxt, [len(s) - 1 for s in seqs])


def test_generate_equals_uncached_greedy(engine, tokenizer):
    prompt = tokenizer.encode("In 1969, the first humans")
    out = [t.token_id for t in engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12,
                                                                      ignore_eos=True))]
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(engine.runner.logits(seq)[-1].argmax()))
    assert out == seq[len(prompt):]
