"""LLMEngine: the engine as a library. It takes plain requests (EngineRequest, ScoreRequest),
owns their state (Sequence) and hands back immutable outputs. `step()` is schedule, execute,
update from the output, process outputs: every running sequence advances together
(continuous batching over a paged, prefix-cached KV cache)."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint_files import open_gguf
from ..errors import InvalidArgument, QueueFull
from ..limits import Limits
from ..model.loader import checkpoint_kind, load_model
from ..tokenizer import Tokenizer
from .block_manager import BlockManager
from .logprobs import token_logprobs
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .outputs import (EngineRequest, FinishReason, RequestFailed, RequestOutput, ScoreOutput, ScoreRequest,
                      TokenLogprob)
from .sampler import Sampler
from .structured import ConstraintCompiler, MaskFiller, mask_logits
from .sampling_params import SEEDS, SamplingParams
from .scheduler import ScheduledSequence, Scheduler
from .sequence import Sequence, Status

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


def key_cost(c) -> float:
    """What attending to one more key costs a prompt token, as a fraction of the rest of its
    work (the layers' matmuls): 4 flops per query head and head dimension per layer against 2
    per weight, with the fused attention kernel doing about a third of the matmuls' flops per
    second (measured in bfloat16 on CPU). About 1/1000 for the default model."""
    weights = c.dim * (c.n_heads + c.n_kv_heads) * c.head_dim * 2 + 3 * c.dim * c.hidden_dim
    return 3 * 4 * c.n_heads * c.head_dim / (2 * weights)


@dataclass(frozen=True)
class EngineConfig:
    kv_cache_tokens: int = 65536  # KV cache capacity, fixed at start
    block_size: int = 16
    max_num_seqs: int = 64  # running at once
    max_batched_tokens: int = 256  # tokens computed per step (decodes + prompt chunks)
    max_queued: int = 256  # waiting; beyond it requests fail at once
    queue_timeout: float | None = None
    prefix_caching: bool = True
    max_model_len: int | None = None  # cap the context below the model's
    # Steps of at most this many token rows multiply with 4-bit weights as stored (Q4 GGUF
    # layers, CPU, bfloat16/float16 compute; float32 stays on the dequantized weights). 0: off.
    int4_max_rows: int = 8
    # Steps of at most this many token rows run on one CPU thread (0: always all threads).
    single_thread_rows: int = 4
    # A request's tokens and logprobs do not depend on what else is in the batch: no kernel
    # it meets changes with the step's size (model/linear.py, kv_cache.tiled_attention, the
    # 4-bit kernel at every size). Costs speed; see the README.
    batch_invariant: bool = False
    # Decode-only steps of at most this many sequences run a torch.compile'd forward, compiled
    # when the engine is built (0: every step eager). Falls back to eager where it cannot compile.
    compile_max_rows: int = 0


class LLMEngine:
    def __init__(self, model, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype, name: str = "",
                 config: EngineConfig = EngineConfig()):
        self.runner = ModelRunner(model, device, dtype, config.kv_cache_tokens, config.block_size,
                                  config.single_thread_rows, config.batch_invariant)
        if config.compile_max_rows:
            self.runner.compile_decode(config.compile_max_rows)
        self.tokenizer = tokenizer
        self.config = model.config
        self.engine_config = config
        self.name = name or self.config.name
        self.context_len = min(self.config.max_seq_len, config.max_model_len or self.config.max_seq_len)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_batched_tokens, config.max_queued,
                                   config.queue_timeout, key_cost(model.config))
        self.sampler = Sampler()
        self.constraints = ConstraintCompiler(tokenizer, self.config.vocab_size)  # called off the engine thread
        self.masks = MaskFiller(self.config.vocab_size)
        self.processor = OutputProcessor(tokenizer, min(self.context_len, self.kv_capacity_tokens))
        # Told of what happens, from whichever thread steps the engine: on_request(prompt_tokens),
        # on_step(batch, kv_usage, waiting, running, preempted), on_token(key, now, ttft, queue),
        # on_finish(key, reason, e2e, cached_tokens), on_score(queue, cached_tokens)
        # (tokenwire_server.metrics.Metrics; the engine imports no Prometheus).
        self.observer = None
        self._requests: dict[str, list[Sequence]] = {}  # request id -> its samples or score items
        self.num_steps = 0
        self.num_preemptions = 0

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
            model = load_model(path, torch_dtype, dev, reader=reader, int4_max_rows=int4_rows,
                               max_context=config.max_model_len)
        else:
            tokenizer = Tokenizer.from_hf_dir(path)
            model = load_model(path, torch_dtype, dev, max_context=config.max_model_len)
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

    def add_request(self, request: EngineRequest) -> None:
        """Queue a generation's n samples (QueueFull when the waiting queue has no room for them).
        Its fields are taken as validated (check_prompt, SamplingParams.validate)."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is in use")
        if len(self.scheduler.waiting) + request.n > self.scheduler.max_queued:
            raise QueueFull(f"the server's queue is full ({len(self.scheduler.waiting)} waiting); retry later")
        params = dataclasses.replace(request.params)
        seed = params.ensure_seed()
        ids = list(request.prompt_ids)
        seqs = []
        for i in range(request.n):  # sample i uses seed + i, so each one can be replayed alone
            p = params if i == 0 else dataclasses.replace(params, seed=(seed + i) % SEEDS, prompt_logprobs=False)
            seq = Sequence(ids, p, request.request_id, i, parent=seqs[0] if seqs else None, arrival=request.arrival)
            seq.generator = None if p.greedy else torch.Generator(self.runner.device).manual_seed(p.seed)
            seq.prompt_logprobs = [] if p.prompt_logprobs else None
            self.processor.start(seq)
            seqs.append(seq)
        self._admit(request.request_id, seqs, len(ids))

    def add_score(self, request: ScoreRequest) -> None:
        """Queue score items; each completes as one ScoreOutput."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is in use")
        if len(self.scheduler.waiting) + len(request.items) > self.scheduler.max_queued:
            raise QueueFull(f"the server's queue is full ({len(self.scheduler.waiting)} waiting); retry later")
        params = SamplingParams(ranks=request.ranks, top_n=request.top_n)
        seqs = [Sequence(list(ids), params, request.request_id, i, score_from=start, prompt_logprobs=[],
                         arrival=request.arrival) for i, (ids, start) in enumerate(request.items)]
        self._admit(request.request_id, seqs, sum(len(ids) for ids, _ in request.items))

    def _admit(self, request_id: str, seqs: list[Sequence], prompt_tokens: int) -> None:
        self._requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        self._notify("on_request", prompt_tokens)

    def abort_request(self, request_id: str) -> None:
        """Drop a request (cancelled, expired, failed) and free its cache at once."""
        for seq in self._requests.pop(request_id, ()):
            self._finish(seq, FinishReason.CANCELLED if seq.score_from is None else None)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def expired(self) -> list[str]:
        """Requests that waited longer than the queue timeout (the caller aborts them)."""
        return list(dict.fromkeys(s.request_id for s in self.scheduler.expired()))

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def _finish(self, seq: Sequence, reason: FinishReason | None) -> None:
        if seq.status is Status.FINISHED:
            return
        self.scheduler.finish(seq)
        seq.finish_reason = seq.finish_reason or reason
        seq.finished = seq.finished or time.monotonic()
        if seq.score_from is None:
            e2e = seq.finished - seq.arrival if seq.finish_reason not in (None, FinishReason.CANCELLED) else None
            self._notify("on_finish", (seq.request_id, seq.index), seq.finish_reason, e2e, seq.cached_tokens)

    def _retire(self, seq: Sequence) -> None:
        """A sequence is done: forget its request once all of the request's sequences are."""
        seqs = self._requests.get(seq.request_id)
        if seqs is not None and all(s.status is Status.FINISHED for s in seqs):
            del self._requests[seq.request_id]

    def _notify(self, event: str, *args) -> None:
        if self.observer is not None:
            getattr(self.observer, event)(*args)

    def report_load(self, preempted: int = 0, batch_size: int = 0) -> None:
        s = self.scheduler
        self._notify("on_step", batch_size if s.has_work() else 0, self.blocks.usage, len(s.waiting),
                     len(s.running), preempted)

    # ---- one step ----

    def step(self) -> list[RequestOutput | ScoreOutput | RequestFailed]:
        """Schedule, execute, update every scheduled sequence from the output, process the
        outputs. A fault fails only the requests it touches: when the batch as a whole fails,
        its sequences run again one by one and only those that fail alone are failed."""
        scheduled = self.scheduler.schedule()
        batch = scheduled.scheduled
        self.num_preemptions += len(scheduled.preempted)
        outputs = []
        if batch:
            self.num_steps += 1
            try:
                outputs = self._run(batch)
            except Exception as e:
                if len(batch) == 1:
                    log.exception("step failed (request %s)", batch[0].seq.request_id)
                    outputs = self._fail(batch[0].seq.request_id, e)
                else:
                    log.exception("a step of %d sequences failed: running them one by one", len(batch))
                    outputs = self._run_alone(batch)
        self.report_load(len(scheduled.preempted), len(batch))
        return outputs

    def _run_alone(self, batch: list[ScheduledSequence]) -> list:
        outputs = []
        for sched in batch:
            if sched.seq.status is Status.FINISHED:  # another sample of its request failed
                continue
            try:
                outputs += self._run([sched])
            except Exception as e:
                log.exception("request %s failed", sched.seq.request_id)
                outputs += self._fail(sched.seq.request_id, e)
        return outputs

    def _fail(self, request_id: str, error: Exception) -> list[RequestFailed]:
        self.abort_request(request_id)
        return [RequestFailed(request_id, error)]

    def _run(self, batch: list[ScheduledSequence]) -> list:
        # Nothing before the per-sequence updates changes engine state (the cache slots written
        # are the scheduled ones, written again on a retry; generators are restored on a fault).
        sampling = [s.seq for s in batch if s.completes and s.seq.score_from is None]
        masks = self.masks.start([s.output.matcher for s in sampling if s.output.matcher is not None])
        logits, spans = self.runner.execute(batch)  # while the masks fill
        to_sample = [(s.seq, span.row + span.count - 1) for s, span in zip(batch, spans)
                     if s.completes and s.seq.score_from is None]
        tokens = self._sample(to_sample, logits, masks) if to_sample else {}
        outputs, now = [], time.monotonic()
        for sched, span in zip(batch, spans):
            seq = sched.seq
            if seq.status is Status.FINISHED:  # another sample of its request failed just now
                continue
            try:
                out = self._update(seq, sched, logits[span.row:span.row + span.count], span.first,
                                   tokens.get(seq), now)
            except Exception as e:
                if isinstance(e, InvalidArgument):  # the request's own fault (its constraint): no traceback
                    log.warning("request %s failed: %s", seq.request_id, e)
                else:
                    log.exception("request %s failed", seq.request_id)
                outputs += self._fail(seq.request_id, e)
                continue
            if out is not None:
                outputs.append(out)
        return outputs

    def _update(self, seq: Sequence, sched: ScheduledSequence, rows: torch.Tensor, first: int,
                token: TokenLogprob | None, now: float):
        """Advance one sequence by its computed tokens and, if it produced one, its new token."""
        if len(rows) and seq.prompt_logprobs is not None:
            self._prompt_logprobs(seq, rows, first)
        completes = sched.completes  # (asked before the sequence advances)
        seq.num_computed += sched.num_tokens
        if seq.num_computed // self.blocks.block_size > len(seq.block_table.keys):  # a block filled
            self.blocks.register(seq.block_table, seq.tokens, seq.num_computed)
        if not completes:
            return None
        if seq.score_from is not None:  # a score item is complete
            out = ScoreOutput(seq.request_id, seq.index, tuple(seq.prompt_logprobs), seq.all_greedy,
                              (seq.started or now) - seq.arrival)
            self._finish(seq, None)
            self._notify("on_score", out.queue_seconds, seq.cached_tokens)
            self._retire(seq)
            return out
        seq.output_ids.append(token.token_id)
        first_token = seq.first_token is None
        seq.first_token = seq.first_token or now
        self._notify("on_token", (seq.request_id, seq.index), now, now - seq.arrival if first_token else None,
                     (seq.started or now) - seq.arrival if first_token else None)
        out = self.processor.process(seq, token, now)
        if out.finished:
            self._finish(seq, out.finish_reason)
            self._retire(seq)
        return out

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

    def _sample(self, items: list[tuple[Sequence, int]], logits: torch.Tensor,
                masks: Future | None) -> dict[Sequence, TokenLogprob]:
        seqs = [s for s, _ in items]
        rows = logits[torch.tensor([r for _, r in items], device=logits.device)]
        params = [s.params for s in seqs]
        eos = list(self.tokenizer.eos_ids)
        # A constraint decides its own end: min_new_tokens does not hold against a completed one.
        banned = [eos + s.params.stop_token_ids
                  if len(s.output_ids) < s.params.min_new_tokens and s.params.constraint is None else []
                  for s in seqs]
        generators = [s.generator for s in seqs]
        states = [g.get_state() if g is not None else None for g in generators]
        candidates = self._constrained(rows, seqs, masks)  # logprobs stay the model's own (rows)
        try:
            tokens = self.sampler(candidates, params, generators, [(s.prompt_ids, s.output_ids) for s in seqs],
                                  banned)
        except Exception:  # a retry draws the same numbers
            for g, state in zip(generators, states):
                if g is not None:
                    g.set_state(state)
            raise
        logp = torch.log_softmax(rows, dim=-1).gather(-1, tokens[:, None])[:, 0].tolist()
        out = {}
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            p = params[i]
            if p.ranks or p.top_n:  # ranks and top-N only for the rows that asked
                out[seq] = token_logprobs(rows[i:i + 1], tokens[i:i + 1], p.ranks, p.top_n)[0]
            else:
                out[seq] = TokenLogprob(token, logp[i])
        return out

    @staticmethod
    def _constrained(rows: torch.Tensor, seqs: list[Sequence], masks: Future | None) -> torch.Tensor:
        """rows with the tokens each constrained sequence may not produce next at -inf, from
        the masks filled for the constrained ones among seqs, in order (one pass over those
        rows; the others are untouched and cost nothing)."""
        if masks is None:
            return rows
        matchers = [(i, s.output.matcher) for i, s in enumerate(seqs) if s.output.matcher is not None]
        allowed = masks.result()
        # A matcher that fell into error (past llguidance's limits) allows nothing: its row is
        # left whole, and the token it then rejects fails its request alone (output_processor).
        ok = [k for k, (_, m) in enumerate(matchers) if not m.is_error()]
        index = torch.tensor([matchers[k][0] for k in ok], device=rows.device, dtype=torch.long)
        rows = rows.clone()
        rows[index] = mask_logits(rows[index], allowed[ok])
        return rows

    # ---- synchronous use (a library user, warm-up, the generate command) ----

    def generate(self, prompt_ids: list[int], params: SamplingParams, n: int = 1,
                 limits: Limits = Limits()) -> Iterator[RequestOutput]:
        """Validate, then yield the request's outputs as they come (for n > 1, interleaved; each
        sample's last output carries its finish reason). Stop sequences and time limits apply
        as they do when served."""
        self.check_prompt(prompt_ids)
        params.validate(limits, self.config.vocab_size)
        request = EngineRequest(uuid.uuid4().hex, tuple(prompt_ids), params, n)
        self.add_request(request)
        try:
            while self.has_request(request.request_id):
                for out in self.step():
                    if out.request_id != request.request_id:
                        continue
                    if isinstance(out, RequestFailed):
                        raise out.error
                    yield out
        finally:
            self.abort_request(request.request_id)

    def score(self, token_ids: list[int], start: int = 1, ranks: bool = False, top_n: int = 0) -> ScoreOutput:
        """Logprobs of token_ids[start:], each given the tokens before it."""
        if not 1 <= start < len(token_ids):
            raise InvalidArgument("prompt", "needs at least one token to score after its first")
        self.check_prompt(token_ids, generating=False)
        request = ScoreRequest(uuid.uuid4().hex, ((tuple(token_ids), start),), ranks, top_n)
        self.add_score(request)
        try:
            while self.has_request(request.request_id):
                for out in self.step():
                    if out.request_id == request.request_id:
                        if isinstance(out, RequestFailed):
                            raise out.error
                        return out
        finally:
            self.abort_request(request.request_id)
        raise AssertionError("unreachable: a score request ends with an output")
