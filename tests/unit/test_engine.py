"""The generation loop on the real model: seeds, limits and prompt validation."""

import pytest

from tokenwire_server.engine import FinishReason, SamplingParams
from tokenwire_server.errors import InvalidArgument


def run(engine, prompt, **kw):
    """The tokens, and the seed the engine reports (it draws one when none is given)."""
    outputs = list(engine.generate(prompt, SamplingParams(**kw)))
    return [t.token_id for t in outputs], outputs[-1].seed


def test_same_seed_same_tokens_and_reported_seed_replays(engine, tokenizer):
    prompt = tokenizer.encode("My favourite animal is")
    a, _ = run(engine, prompt, temperature=1.0, seed=1234, max_new_tokens=20, ignore_eos=True)
    b, _ = run(engine, prompt, temperature=1.0, seed=1234, max_new_tokens=20, ignore_eos=True)
    c, _ = run(engine, prompt, temperature=1.0, seed=4321, max_new_tokens=20, ignore_eos=True)
    assert a == b and a != c
    d, seed = run(engine, prompt, temperature=1.0, max_new_tokens=20, ignore_eos=True)
    e, _ = run(engine, prompt, temperature=1.0, seed=seed, max_new_tokens=20, ignore_eos=True)
    assert d == e


def test_finish_reasons(engine, make_engine, tokenizer):
    prompt = tokenizer.encode("Count: one, two, three,")
    steps = list(engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)))
    assert len(steps) == 3 and steps[-1].finish_reason is FinishReason.LENGTH
    assert all(s.finish_reason is None for s in steps[:-1])
    small = make_engine(max_model_len=len(prompt) + 4, kv_cache_tokens=256)
    steps = list(small.generate(prompt, SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True)))
    assert len(steps) == 4 and steps[-1].finish_reason is FinishReason.CONTEXT_LIMIT
    chat = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}]),
                            allow_special=True)
    steps = list(engine.generate(chat, SamplingParams(temperature=0, max_new_tokens=64)))
    assert steps[-1].finish_reason is FinishReason.EOS and steps[-1].token_id in tokenizer.eos_ids


def test_logprobs_are_the_models(engine, tokenizer):
    prompt = tokenizer.encode("The sun rises in the")
    steps = list(engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)))
    scored = engine.score(prompt + [s.token_id for s in steps], start=len(prompt))
    assert [s.logprob for s in steps] == pytest.approx([t.logprob for t in scored.tokens], abs=1e-4)
    assert all(t.logprob <= 0 for t in scored.tokens) and scored.is_greedy


@pytest.mark.parametrize("prompt, match", [
    ([], "empty"), ([5, 49152], "outside the vocabulary"), ([-1], "outside the vocabulary"),
])
def test_bad_prompts(engine, prompt, match):
    with pytest.raises(InvalidArgument, match=match) as e:
        list(engine.generate(prompt, SamplingParams()))
    assert e.value.field == "prompt"


def test_prompt_longer_than_context(make_engine):
    small = make_engine(max_model_len=8, kv_cache_tokens=256)
    with pytest.raises(InvalidArgument, match="exceed the model's context of 8 with room to generate"):
        list(small.generate(list(range(100, 108)), SamplingParams()))


def test_min_new_tokens_suppresses_the_end_token(engine, tokenizer):
    chat = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}]),
                            allow_special=True)
    plain = [t.token_id for t in engine.generate(chat, SamplingParams(temperature=0, max_new_tokens=64))]
    assert plain[-1] in tokenizer.eos_ids
    need = len(plain) + 10
    forced = list(engine.generate(chat, SamplingParams(temperature=0, max_new_tokens=64, min_new_tokens=need)))
    assert len(forced) >= need and all(t.token_id not in tokenizer.eos_ids for t in forced[:need])


def test_stop_token_ids_and_repetition_penalty(engine, tokenizer):
    prompt = tokenizer.encode("one one one one one one one")
    greedy = [t.token_id for t in engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8,
                                                                         ignore_eos=True))]
    stopped = list(engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True,
                                                          stop_token_ids=[greedy[2]])))
    assert stopped[-1].finish_reason is FinishReason.STOP_TOKEN and len(stopped) == greedy.index(greedy[2]) + 1
    penalised = [t.token_id for t in engine.generate(prompt, SamplingParams(
        temperature=0, max_new_tokens=8, ignore_eos=True, repetition_penalty=5.0))]
    repeated = max(set(greedy), key=greedy.count)
    assert greedy.count(repeated) > 1 and penalised.count(repeated) < greedy.count(repeated)


def test_small_steps_run_on_one_thread(make_engine, tokenizer):
    import torch

    engine = make_engine(kv_cache_tokens=1024, single_thread_rows=8)
    seen = []
    hook = engine.runner.model.register_forward_pre_hook(lambda m, args: seen.append((len(args[0]),
                                                                                       torch.get_num_threads())))
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prompt = tokenizer.encode("One two three four five six seven eight nine ten eleven twelve")
        list(engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)))
        assert torch.get_num_threads() == 2  # restored after each step
    finally:
        hook.remove()
        torch.set_num_threads(original)
    assert seen[0] == (len(prompt), 2)  # the prompt: more than 8 rows, every thread
    assert [threads for _, threads in seen[1:]] == [1, 1]  # decodes: one thread


def test_two_engines_in_a_process_keep_their_own_thread_counts(make_engine, tokenizer):
    """torch's thread count is partly process-wide: an engine made for one thread, stepping
    small steps, must not leave another engine's steps on one thread (nor the other way)."""
    import torch

    original = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = make_engine(kv_cache_tokens=1024, single_thread_rows=8)
        torch.set_num_threads(2)
        two = make_engine(kv_cache_tokens=1024, single_thread_rows=0)
        seen = []
        hook = one.runner.model.register_forward_pre_hook(lambda m, args: seen.append(torch.get_num_threads()))
        prompt = tokenizer.encode("One two three four five six seven eight nine ten eleven twelve")
        params = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
        for engine in (one, two, one, two):  # the same model: the hook sees both engines' steps
            list(engine.generate(prompt, params))
        hook.remove()
    finally:
        torch.set_num_threads(original)
    assert seen == [1, 1] + [2, 2] + [1, 1] + [2, 2]


def test_library_generate_applies_stop_sequences_and_time_limits(engine, tokenizer):
    """The synchronous path shares the server's output processor: text, stop strings, time limits."""
    prompt = tokenizer.encode("The days of the week are Monday,")
    plain = list(engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)))
    text = "".join(o.text for o in plain)
    assert text == tokenizer.decode([o.token_id for o in plain])
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = list(engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True,
                                                          stop_sequences=[stop])))
    assert stopped[-1].finish_reason is FinishReason.STOP_SEQUENCE and stopped[-1].stop_sequence == stop
    assert "".join(o.text for o in stopped) == text[:text.index(stop)]
    timed = list(engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=4000, ignore_eos=True,
                                                        time_limit=0.2)))
    assert timed[-1].finish_reason is FinishReason.TIME_LIMIT and len(timed) < 4000
    assert timed[-1].usage.completion_tokens == len(timed)
