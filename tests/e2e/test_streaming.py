"""Streamed text: stop sequences across token boundaries, UTF-8 splits, seeds."""

import pytest

PROMPT = "Once upon a time, there was a little"


def reference(client):
    """The greedy continuation without stop sequences, token by token."""
    g = client.generate(PROMPT, temperature=0, max_new_tokens=40, ignore_eos=True)
    return g, [t.text for t in g.tokens]


def spanning_stop(pieces):
    """A stop string that begins inside one token and ends inside the next."""
    for i in range(3, len(pieces) - 1):
        a, b = pieces[i], pieces[i + 1]
        if len(a) >= 2 and len(b) >= 2 and a.isprintable() and b.isprintable():
            return a[-2:] + b[:2], sum(len(p) for p in pieces[:i]) + len(a) - 2
    raise AssertionError("no two adjacent tokens of two characters or more")


@pytest.mark.parametrize("include", [False, True])
def test_stop_sequence_spanning_tokens(client, include):
    full, pieces = reference(client)
    stop, at = spanning_stop(pieces)
    assert full.text.find(stop) == at
    stream = client.generate_stream(PROMPT, temperature=0, max_new_tokens=40, ignore_eos=True, stop=[stop, "zzzz"],
                                    include_stop_sequence=include)
    deltas = [d.text for d in stream.deltas()]
    text = "".join(deltas)
    assert text == (full.text[: at + len(stop)] if include else full.text[:at])
    assert stream.final.finish_reason == "stop_sequence" and stream.final.stop_sequence == stop
    # Held back, never sent: no delta ever carried text past the cut.
    assert all(stop not in d for d in deltas) or include


def test_partial_match_is_released_when_it_fails(client):
    full, pieces = reference(client)
    # Starts like text that occurs, then diverges: the held-back prefix must come out later.
    stop, at = spanning_stop(pieces)
    never = stop + "\x00never"
    g = client.generate(PROMPT, temperature=0, max_new_tokens=40, ignore_eos=True, stop=[never])
    assert g.text == full.text and g.finish_reason == "length"


def test_earliest_stop_sequence_wins(client):
    full, pieces = reference(client)
    stops = [pieces[9].strip(), pieces[4].strip()]  # listed latest first
    first = min(stops, key=full.text.find)
    assert full.text.find(first) < full.text.find(stops[0])
    g = client.generate(PROMPT, temperature=0, max_new_tokens=40, ignore_eos=True, stop=stops)
    assert g.stop_sequence == first and g.text == full.text[: full.text.find(first)]


@pytest.mark.parametrize("prompt", ["Emoji for happy: 😀, sad: 😢, love:", "日本の首都は"])
def test_utf8_split_across_tokens_streams_whole_characters(client, tokenizer, prompt):
    stream = client.generate_stream(prompt, temperature=0, max_new_tokens=24, ignore_eos=True)
    deltas = list(stream.deltas())
    ids = [d.tokens[0].id for d in deltas]
    partial = [i for i in ids if not _whole(tokenizer.token_bytes(i))]
    assert partial, "the test needs a token holding part of a character"
    # Bytes of an unfinished character are held back until the token that completes it.
    assert any(len(d.text.encode()) < len(tokenizer.token_bytes(d.tokens[0].id)) for d in deltas)
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids)


def _whole(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_seeds(client):
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=24, ignore_eos=True)
    a = client.generate("Tell me a story:", seed=42, **kw)
    b = client.generate("Tell me a story:", seed=42, **kw)
    c = client.generate("Tell me a story:", seed=43, **kw)
    assert a.seed == 42 and a.text == b.text and a.text != c.text
    drawn = client.generate("Tell me a story:", **kw)
    replay = client.generate("Tell me a story:", seed=drawn.seed, **kw)
    assert drawn.seed != 0 and replay.text == drawn.text


def test_time_limit(client):
    g = client.generate("Count to a thousand:", temperature=0, max_new_tokens=4000, ignore_eos=True, time_limit=0.5)
    assert g.finish_reason == "time_limit" and 0 < g.usage.completion_tokens < 4000
