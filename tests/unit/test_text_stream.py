"""TextStream: stop sequences across token boundaries, held-back partial matches."""

import pytest

from tokenwire_server.engine.text_stream import TextStream


class Pieces:
    """A tokenizer stand-in whose tokens are given strings, so boundaries are exact."""

    special_ids = frozenset()

    def __init__(self, pieces):
        self.pieces = pieces

    def detokenizer(self):
        from tokenwire_server.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(lambda i: self.pieces[i].encode())


def run(pieces, stops, include=False):
    stream = TextStream(Pieces(pieces), stops, include)
    out = []
    for i in range(len(pieces)):
        text, stop = stream.push(i)
        out.append(text)
        if stop:
            return out, stop
    text, stop = stream.flush()
    return out + [text], stop


def test_match_across_tokens_and_nothing_after_it():
    out, stop = run(["Hello wo", "rld! Bye", " now"], ["world"])
    assert stop == "world" and "".join(out) == "Hello " and out == ["Hello ", ""]


def test_include_stop_sequence():
    out, stop = run(["Hello wo", "rld! Bye"], ["world"], include=True)
    assert "".join(out) == "Hello world"


def test_partial_match_held_back_then_released():
    out, stop = run(["abc wor", "m ok"], ["world"])
    assert stop is None and out == ["abc ", "worm ok", ""]


def test_held_back_text_is_released_at_the_end():
    out, stop = run(["the end wo"], ["world"])
    assert stop is None and "".join(out) == "the end wo"


def test_earliest_match_wins():
    out, stop = run(["xx STOP2 yy STOP1"], ["STOP1", "STOP2"])
    assert stop == "STOP2" and "".join(out) == "xx "


@pytest.mark.parametrize("stops", [[], ["zzz"]])
def test_no_stops_passes_text_through(stops):
    out, stop = run(["a", "b", "c"], stops)
    assert "".join(out) == "abc" and stop is None
