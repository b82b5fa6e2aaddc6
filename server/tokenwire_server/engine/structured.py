"""Structured output: a request's constraint (a JSON Schema, any JSON object, a regex, a choice
of strings or a Lark grammar) compiled by llguidance, and per sample a matcher that gives the
tokens allowed next and follows the tokens sampled.

llguidance's tokenizer is built by ours (from its tiktoken Encoding or its tokenizer.json), so
masks are over our exact vocabulary, and the end tokens are allowed only where the constraint
accepts. Compiling runs off the engine thread, bounded in time and by llguidance's parser
limits (which also bound the work of each step's mask), and its result is cached by the
constraint's text; the engine thread only copies a compiled, unused matcher for each sample,
and each step's masks are filled while the model computes that step."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import llguidance
import numpy as np
import torch

from ..errors import InvalidArgument
from ..priority import lower_thread_priority
from ..tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
COMPILE_THREADS = 2
# JSON on one line, laid out as json.dumps does: no tokens spent on free whitespace, which a
# small model otherwise fills with runs of newlines. A schema's own "x-guidance" overrides it.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MESSAGE_CHARS = 400  # of the library's error message, in the status (errors must fit gRPC metadata)


@dataclass(frozen=True)
class ConstraintLimits:
    max_chars: int = 65536  # of a schema, regex or grammar, or all choices together
    max_choices: int = 256
    compile_seconds: float = 5.0
    cache_size: int = 256


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled constraint: `kind` as the request named it, and a matcher in its start state
    that is only ever copied (LLMatcher.deep_copy), never advanced."""

    kind: str
    start: llguidance.LLMatcher

    def matcher(self) -> llguidance.LLMatcher:
        return self.start.deep_copy()


class ConstraintCompiler:
    """Compiles on COMPILE_THREADS threads of lower CPU priority, which release the GIL while
    llguidance works: a slow constraint never stalls the engine or another stream."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, limits: ConstraintLimits = ConstraintLimits()):
        self.limits = limits
        self._source = tokenizer
        self._vocab_size = vocab_size  # the model's: masks cover every logit
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use (about 0.2 s)
        self._cache: OrderedDict[tuple[str, str], Constraint] = OrderedDict()
        self._compiling: dict[tuple[str, str], Future] = {}  # one compile of a text at a time
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="tokenwire-constraint",
                                        initializer=lower_thread_priority)

    def compile(self, kind: str, value) -> Constraint:
        """The compiled constraint (from the cache when the same text came before). Raises
        InvalidArgument naming `constraint.<kind>` for anything that cannot be satisfied, and
        when compiling takes longer than the limit (the compile goes on, and its result is
        cached for the next request)."""
        field = f"constraint.{kind}"
        key = (kind, self._text(kind, value, field))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            future, new = self._compiling.get(key), key not in self._compiling
            if new:
                future = self._compiling[key] = self._pool.submit(self._build, kind, key[1], field)
        if new:  # (outside the lock: a finished future runs its callback at once, here)
            future.add_done_callback(lambda f: self._done(key, f))
        try:
            return future.result(self.limits.compile_seconds)
        except FutureTimeout:
            raise InvalidArgument(field, f"took longer than {self.limits.compile_seconds:g} s to compile") from None

    def _done(self, key: tuple[str, str], future: Future) -> None:
        with self._lock:
            del self._compiling[key]
            if future.exception() is None:
                self._cache[key] = future.result()
                while len(self._cache) > self.limits.cache_size:
                    self._cache.popitem(last=False)

    def _text(self, kind: str, value, field: str) -> str:
        """The constraint's canonical text (the cache key), checked against the limits."""
        if kind == "json_object":
            if value is not True:
                raise InvalidArgument(field, "must be true when set")
            return ""
        if kind == "choice":
            choices = list(value)
            if not choices:
                raise InvalidArgument(field, "needs at least one choice")
            if len(choices) > self.limits.max_choices:
                raise InvalidArgument(field, f"{len(choices)} choices, at most {self.limits.max_choices} allowed")
            if any(not c for c in choices):
                raise InvalidArgument(field, "a choice is empty")
            text = json.dumps(choices)
        elif kind in KINDS:
            text = value
            if not text:
                raise InvalidArgument(field, "is empty")
        else:
            raise InvalidArgument("constraint", f"unknown kind {kind!r}")
        if len(text) > self.limits.max_chars:
            raise InvalidArgument(field, f"{len(text)} characters, at most {self.limits.max_chars} allowed")
        return text

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._source.lltokenizer(self._vocab_size)
            return self._tokenizer

    def _build(self, kind: str, text: str, field: str) -> Constraint:
        M = llguidance.LLMatcher
        tokenizer = self._llg_tokenizer()
        try:
            if kind == "json_schema":
                grammar = M.grammar_from_json_schema(json.loads(text), defaults=JSON_LAYOUT)
            elif kind == "json_object":
                grammar = M.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
            elif kind == "regex":
                grammar = M.grammar_from_regex(text)
            elif kind == "choice":  # Lark string literals take JSON escapes
                grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(text)))
            else:
                grammar = M.grammar_from_lark(text)
        except (ValueError, TypeError) as e:  # not JSON, or not a JSON object
            raise InvalidArgument(field, _clip(str(e))) from None
        error = M.validate_grammar(grammar, tokenizer)
        if error:
            raise InvalidArgument(field, _clip(error))
        matcher = M(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidArgument(field, _clip(matcher.get_error()))
        # The first mask builds the lexer states the copies share (tens of ms for a large
        # schema): here, not in a step.
        fill_masks(_EXECUTOR, [matcher], torch.empty(1, mask_words(self._vocab_size), dtype=torch.int32))
        if matcher.is_error():  # no token can start an output it accepts
            raise InvalidArgument(field, "no output can satisfy it")
        return Constraint(kind, matcher)


def _clip(message: str) -> str:
    """The library's message for a status: its "Error:" line when it dumps its state, clipped."""
    errors = [line for line in message.splitlines() if line.startswith("Error:")]
    message = " ".join((errors[0][len("Error:"):] if errors else message).split())
    return message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + "..."


def failed(constraint: Constraint, matcher: llguidance.LLMatcher) -> InvalidArgument:
    """The error of a request whose matcher stopped in error mid-output (past llguidance's
    limits for one step, for example): the request's own fault, named by its field."""
    return InvalidArgument(f"constraint.{constraint.kind}", _clip(matcher.get_error()))


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_masks(executor: llguidance.LLExecutor, matchers: list[llguidance.LLMatcher], bitmask: torch.Tensor) -> None:
    """Row i of bitmask (int32, contiguous, on the CPU): bit t set when matchers[i] allows token t
    next. llguidance fills the rows on its own threads, without the GIL."""
    executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                     bitmask.shape[1] * 4, bitmask.shape[0])


class MaskFiller:
    """Fills a step's masks on a thread of its own while the model computes the step (the
    matchers already hold every token sampled before it); the engine thread then waits only
    for what is left. One step's fill at a time, so a matcher is never used by two threads."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokenwire-mask")

    def start(self, matchers: list[llguidance.LLMatcher]) -> Future | None:
        """A future of the (len(matchers), vocab_size) bool tensor of the tokens each matcher
        allows next; None when there are no matchers."""
        if not matchers:
            return None
        return self._thread.submit(allowed_tokens, matchers, self.vocab_size)


def allowed_tokens(matchers: list[llguidance.LLMatcher], vocab_size: int) -> torch.Tensor:
    bitmask = torch.empty(len(matchers), mask_words(vocab_size), dtype=torch.int32)
    fill_masks(_EXECUTOR, matchers, bitmask)
    # Bit t of a row is bit t % 8 of its byte t // 8 (the int32 words are little-endian):
    # numpy unpacks them in C, 20x faster than shifts in torch.
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(bits).view(torch.bool)[:, :vocab_size]


def mask_logits(rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """rows (one per row of allowed) with every token not allowed at -inf."""
    return torch.where(allowed.to(rows.device), rows, float("-inf"))


_EXECUTOR = llguidance.LLExecutor()  # llguidance's threads (most of the cores, at most 32)
