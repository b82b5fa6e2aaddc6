"""LLMEngine: the engine as a library. Prefill, then KV-cached decode, one request at a time."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..checkpoint_files import open_gguf
from ..errors import InvalidArgument
from ..model.loader import checkpoint_kind, load_model
from ..tokenizer import Tokenizer
from .logprobs import TokenLogprob, token_logprobs
from .model_runner import ModelRunner
from .outputs import GeneratedToken, ScoreOutput
from .sampler import Sampler
from .sampling_params import SamplingParams
from .sequence import Sequence
from .stopping import StoppingCriteria

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[name]


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, name: str = "",
                 max_model_len: int | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = runner.config
        self.name = name or self.config.name
        # A server may cap the context below the model's to bound memory per sequence.
        self.context_len = min(self.config.max_seq_len, max_model_len or self.config.max_seq_len)
        self.sampler = Sampler()

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: str = "auto", device: str = "auto",
                        name: str = "", max_model_len: int | None = None) -> LLMEngine:
        path = Path(path)
        dev = choose_device(device)
        torch_dtype = choose_dtype(dtype, dev)
        if checkpoint_kind(path) == "gguf":
            reader = open_gguf(path)  # indexing a GGUF takes seconds: read it once for both
            tokenizer = Tokenizer.from_gguf(reader, path)
            model = load_model(path, torch_dtype, dev, reader=reader)
        else:
            tokenizer = Tokenizer.from_hf_dir(path)
            model = load_model(path, torch_dtype, dev)
        log.info("loaded %s: %s, %s on %s", path, model.config.architecture, torch_dtype, dev)
        return cls(ModelRunner(model, dev, torch_dtype), tokenizer, name or path.stem, max_model_len)

    def check_prompt(self, token_ids: list[int], field: str = "prompt", generating: bool = True) -> None:
        if not token_ids:
            raise InvalidArgument(field, "is empty")
        vocab = self.config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidArgument(field, f"token id {bad} is outside the vocabulary [0, {vocab})")
        limit = self.context_len - 1 if generating else self.context_len  # room for one new token
        if len(token_ids) > limit:
            raise InvalidArgument(field, f"{len(token_ids)} tokens exceed the model's context of "
                                         f"{self.context_len}" + (" with room to generate" if generating else "")
                                         + "; truncate the input (truncate_input_tokens keeps the last N)")

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GeneratedToken]:
        """Yield the generated tokens one by one; the last one carries the finish reason."""
        return self.run(Sequence(prompt_ids, params))

    def run(self, seq: Sequence) -> Iterator[GeneratedToken]:
        """Generate for `seq`, recording its outputs on it. Closing the iterator early stops
        the work and frees the sequence's cache."""
        params, prompt = seq.params, seq.prompt_ids
        self.check_prompt(prompt)
        params.validate(vocab_size=self.config.vocab_size)
        if params.seed is None:
            params.seed = random.randrange(2**63)  # reported back, so the output can be replayed
        generator = None
        if not params.greedy:
            generator = torch.Generator(self.runner.device).manual_seed(params.seed)
        stop = StoppingCriteria(params, self.tokenizer.eos_ids, len(prompt), self.context_len)
        cache = self.runner.new_cache(1, min(self.context_len, len(prompt) + params.max_new_tokens))
        seq.started = time.monotonic()
        logits = self.runner.prefill(cache, prompt, all_logits=params.prompt_logprobs)
        if params.prompt_logprobs:
            seq.prompt_logprobs = token_logprobs(logits[:-1], torch.tensor(prompt[1:], device=logits.device),
                                                 params.ranks, params.top_n)
            logits = logits[-1]
        logits = logits[None]
        detail = params.ranks or params.top_n
        while True:
            token_t = self.sampler(logits, [params], [generator])
            if detail:
                info = token_logprobs(logits, token_t, params.ranks, params.top_n)[0]
            else:
                token = int(token_t[0])
                info = TokenLogprob(token, float(torch.log_softmax(logits[0], dim=-1)[token]))
            seq.output_ids.append(info.token_id)
            if seq.first_token is None:
                seq.first_token = time.monotonic()
            reason = stop(info.token_id, len(seq.output_ids))
            yield GeneratedToken(info, reason)
            if reason is not None:
                seq.finish_reason = reason
                return
            logits = self.runner.decode(cache, [info.token_id], [len(prompt) + len(seq.output_ids) - 1])

    def score(self, token_ids: list[int], start: int = 1, ranks: bool = False, top_n: int = 0,
              field: str = "prompt") -> ScoreOutput:
        """Logprobs of token_ids[start:], each given the tokens before it."""
        self.check_prompt(token_ids, field, generating=False)
        if not 1 <= start < len(token_ids):
            raise InvalidArgument(field, "needs at least one token to score after its first")
        logits = self.runner.logits(token_ids)[start - 1:-1]
        targets = torch.tensor(token_ids[start:], device=logits.device)
        tokens = token_logprobs(logits, targets, ranks, top_n)
        return ScoreOutput(tokens, bool((logits.argmax(-1) == targets).all()))
