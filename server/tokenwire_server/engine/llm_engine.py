"""LLMEngine: the engine as a library. `step()` is schedule, run, postprocess: every running
sequence advances together (continuous batching over a paged, prefix-cached KV cache)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint_files import open_gguf
from ..errors import InvalidArgument
from ..limits import Limits
from ..model.loader import checkpoint_kind, load_model
from ..tokenizer import Tokenizer
from .block_manager import BlockManager
from .logprobs import token_logprobs
from .model_runner import ModelRunner
from .outputs import FinishReason, GeneratedToken, ScoreOutput, TokenLogprob
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .stopping import StoppingCriteria

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 where the hardware computes it natively, else float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[name]


@dataclass(frozen=True)
class EngineConfig:
    kv_cache_tokens: int = 65536  # KV cache capacity, fixed at start
    block_size: int = 16
    max_num_seqs: int = 64  # running at once
    max_batched_tokens: int = 512  # tokens computed per step (decodes + prompt chunks)
    max_queued: int = 256  # waiting; beyond it requests fail at once
    queue_timeout: float | None = None
    prefix_caching: bool = True
    max_model_len: int | None = None  # cap the context below the model's
    # Steps of at most this many token rows multiply with 4-bit weights as stored (Q4 GGUF
    # layers, CPU, bfloat16/float16 compute; float32 stays on the dequantized weights). 0: off.
    int4_max_rows: int = 8
    # Steps of at most this many token rows run on one CPU thread (0: always all threads).
    single_thread_rows: int = 8


class LLMEngine:
    def __init__(self, model, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype, name: str = "",
                 config: EngineConfig = EngineConfig()):
        self.runner = ModelRunner(model, device, dtype, config.kv_cache_tokens, config.block_size,
                                  config.single_thread_rows)
        self.tokenizer = tokenizer
        self.config = model.config
        self.engine_config = config
        self.name = name or self.config.name
        self.context_len = min(self.config.max_seq_len, config.max_model_len or self.config.max_seq_len)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_batched_tokens, config.max_queued,
                                   config.queue_timeout)
        self.sampler = Sampler()
        self._generators: dict[Sequence, torch.Generator | None] = {}
        self._stopping: dict[Sequence, StoppingCriteria] = {}
        self.num_steps = 0
        self.num_preemptions = 0
        self.last_batch_size = 0  # sequences in the last step

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: str = "auto", device: str = "auto", name: str = "",
                        config: EngineConfig = EngineConfig()) -> LLMEngine:
        path = Path(path)
        dev = choose_device(device)
        torch_dtype = choose_dtype(dtype, dev)
        if checkpoint_kind(path) == "gguf":
            reader = open_gguf(path)  # indexing a GGUF takes seconds: read it once for both
            tokenizer = Tokenizer.from_gguf(reader, path)
            int4_rows = config.int4_max_rows if torch_dtype != torch.float32 else 0
            model = load_model(path, torch_dtype, dev, reader=reader, int4_max_rows=int4_rows)
        else:
            tokenizer = Tokenizer.from_hf_dir(path)
            model = load_model(path, torch_dtype, dev)
        log.info("loaded %s: %s, %s on %s", path, model.config.architecture, torch_dtype, dev)
        return cls(model, tokenizer, dev, torch_dtype, name or path.stem, config)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.runner.num_blocks * self.runner.block_size

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
        if len(token_ids) + 1 > self.kv_capacity_tokens:
            raise InvalidArgument(field, f"{len(token_ids)} tokens exceed the server's KV cache of "
                                         f"{self.kv_capacity_tokens} tokens")

    # ---- requests ----

    def add(self, seq: Sequence, limits: Limits = Limits()) -> None:
        """Queue a sequence (raises QueueFull when the waiting queue is full)."""
        if seq.score_from is None:
            self.check_prompt(seq.prompt_ids)
            seq.params.validate(limits, self.config.vocab_size)
            seed = seq.params.ensure_seed()
            generator = None if seq.params.greedy else torch.Generator(self.runner.device).manual_seed(seed)
            self._generators[seq] = generator
            self._stopping[seq] = StoppingCriteria(seq.params, self.tokenizer.eos_ids, len(seq.prompt_ids),
                                                   min(self.context_len, self.kv_capacity_tokens))
            if seq.params.prompt_logprobs:
                seq.prompt_logprobs = []
        else:
            self.check_prompt(seq.prompt_ids, generating=False)
            seq.prompt_logprobs = []
        self.scheduler.add(seq)

    def finish(self, seq: Sequence, reason: FinishReason | None = None) -> None:
        """Stop a sequence (done, cancelled, failed) and free its cache at once."""
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq)
            seq.finish_reason = seq.finish_reason or reason
            seq.finished = time.monotonic()
        self._generators.pop(seq, None)
        self._stopping.pop(seq, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ----

    def step(self) -> list[tuple[Sequence, GeneratedToken | None]]:
        """Advance every scheduled sequence. Returns, for each generation that produced a token,
        (seq, token); for each score sequence that completed, (seq, None)."""
        scheduled = self.scheduler.schedule()
        batch = scheduled.scheduled
        self.num_preemptions += len(scheduled.preempted)
        self.last_batch_size = len(batch)
        if not batch:
            return []
        self.num_steps += 1
        logits, spans = self.runner.execute(batch)
        events, to_sample = [], []
        for sched, span in zip(batch, spans):
            seq = sched.seq
            if span.count and seq.prompt_logprobs is not None:
                self._prompt_logprobs(seq, logits[span.row:span.row + span.count], span.first)
            completes = sched.completes
            seq.num_computed += sched.num_tokens
            if seq.num_computed // self.blocks.block_size > len(seq.block_table.keys):  # a block filled
                self.blocks.register(seq.block_table, seq.tokens, seq.num_computed)
            if not completes:
                continue
            if seq.score_from is not None:
                events.append((seq, None))
                self.finish(seq)
            else:
                to_sample.append((seq, span.row + span.count - 1))
        if to_sample:
            events += self._sample(to_sample, logits)
        return events

    def _prompt_logprobs(self, seq: Sequence, rows: torch.Tensor, first: int) -> None:
        """Logprobs of the tokens these positions predict, for positions not yet covered."""
        start = seq.score_from if seq.score_from is not None else 1  # index of the first token scored
        done = len(seq.prompt_logprobs)
        first_needed = start - 1 + done  # position predicting the next uncovered token
        last = min(first + len(rows), len(seq.prompt_ids) - 1)  # positions predicting prompt tokens only
        if last <= first_needed:
            return
        rows = rows[first_needed - first:last - first]
        targets = torch.tensor(seq.prompt_ids[first_needed + 1:last + 1], device=rows.device)
        p = seq.params
        seq.prompt_logprobs += token_logprobs(rows, targets, p.ranks, p.top_n)
        seq.all_greedy = seq.all_greedy and bool((rows.argmax(-1) == targets).all())

    def _sample(self, items: list[tuple[Sequence, int]], logits: torch.Tensor):
        seqs = [s for s, _ in items]
        rows = logits[torch.tensor([r for _, r in items], device=logits.device)]
        params = [s.params for s in seqs]
        eos = list(self.tokenizer.eos_ids)
        banned = [eos + s.params.stop_token_ids if len(s.output_ids) < s.params.min_new_tokens else [] for s in seqs]
        tokens = self.sampler(rows, params, [self._generators[s] for s in seqs],
                              [(s.prompt_ids, s.output_ids) for s in seqs], banned)
        detail = [i for i, p in enumerate(params) if p.ranks or p.top_n]
        logp = torch.log_softmax(rows, dim=-1).gather(-1, tokens[:, None])[:, 0].tolist()
        infos = {}
        for i in detail:  # ranks and top-N only for the rows that asked
            p = params[i]
            infos[i] = token_logprobs(rows[i:i + 1], tokens[i:i + 1], p.ranks, p.top_n)[0]
        events = []
        now = time.monotonic()
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            info = infos.get(i) or TokenLogprob(token, logp[i])
            seq.output_ids.append(token)
            seq.first_token = seq.first_token or now
            reason = self._stopping[seq](token, len(seq.output_ids))
            events.append((seq, GeneratedToken(info, reason)))
            if reason is not None:
                self.finish(seq, reason)
        return events

    # ---- synchronous helpers (a library user with one request at a time) ----

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GeneratedToken]:
        """Yield the generated tokens one by one; the last one carries the finish reason."""
        seq = Sequence(prompt_ids, params)
        self.add(seq)
        try:
            while seq.status is not Status.FINISHED:
                for s, event in self.step():
                    if s is seq:
                        yield event
        finally:
            self.finish(seq, FinishReason.CANCELLED)

    def score(self, token_ids: list[int], start: int = 1, ranks: bool = False, top_n: int = 0) -> ScoreOutput:
        """Logprobs of token_ids[start:], each given the tokens before it."""
        if not 1 <= start < len(token_ids):
            raise InvalidArgument("prompt", "needs at least one token to score after its first")
        seq = Sequence(token_ids, SamplingParams(ranks=ranks, top_n=top_n), score_from=start)
        self.add(seq)
        while seq.status is not Status.FINISHED:
            self.step()
        return ScoreOutput(seq.prompt_logprobs, seq.all_greedy)
