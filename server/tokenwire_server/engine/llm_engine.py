"""LLMEngine: the engine as a library. Prefill, then KV-cached decode, one request at a time."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from ..checkpoint_files import open_gguf
from ..errors import InvalidArgument
from ..model.loader import checkpoint_kind, load_model
from ..tokenizer import Tokenizer
from .model_runner import ModelRunner
from .outputs import GeneratedToken
from .sampler import Sampler
from .sampling_params import SamplingParams
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

    def check_prompt(self, token_ids: list[int], field: str = "prompt") -> None:
        if not token_ids:
            raise InvalidArgument(field, "is empty")
        vocab = self.config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidArgument(field, f"token id {bad} is outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.context_len:
            raise InvalidArgument(field, f"{len(token_ids)} tokens leave no room to generate in the "
                                         f"model's context of {self.context_len}")

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GeneratedToken]:
        """Yield the generated tokens one by one; the last one carries the finish reason."""
        self.check_prompt(prompt_ids)
        params.validate()
        if params.seed is None:
            params.seed = random.randrange(2**63)  # reported back, so the output can be replayed
        generator = None
        if not params.greedy:
            generator = torch.Generator(self.runner.device).manual_seed(params.seed)
        stop = StoppingCriteria(params, self.tokenizer.eos_ids, len(prompt_ids), self.context_len)
        max_len = min(self.context_len, len(prompt_ids) + params.max_new_tokens)
        cache = self.runner.new_cache(1, max_len)
        logits = self.runner.prefill(cache, prompt_ids)[None]
        position, n = len(prompt_ids), 0
        while True:
            token = int(self.sampler(logits, [params], [generator])[0])
            logprob = float(torch.log_softmax(logits[0], dim=-1)[token])
            n += 1
            reason = stop(token, n)
            yield GeneratedToken(token, logprob, reason)
            if reason is not None:
                return
            logits = self.runner.decode(cache, [token], [position])
            position += 1

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-probability of each token after the first given the tokens before it."""
        self.check_prompt(token_ids)
        logp = torch.log_softmax(self.runner.logits(token_ids)[:-1], dim=-1)
        return logp.gather(-1, torch.tensor(token_ids[1:], device=logp.device)[:, None])[:, 0].tolist()
