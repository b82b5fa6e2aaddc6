"""CPU-bound request work (a Generate's prompt and chat template, Score's inputs and its
response) runs here, never on the event loop (Tokenize and Detokenize, whose per-token Python
is longer, run in processes: api/text_workers.py): the loop must stay free to
move other streams' bytes and answer health checks.

Two lanes, each a small pool of threads, so at most that many jobs run at once whatever the
traffic; the rest wait in the queue, costing no CPU, and a queued job whose call is cancelled
is dropped unrun.
- `run`: bulk work (Score) on WORKERS threads at a lower CPU priority (priority.py), so
  that on busy cores the engine comes first. The priority does not help against the GIL:
  long Python work belongs in a process.
- `prepare`: a Generate's prompt (encoding, chat template) on threads of normal priority,
  so a flood of bulk work never delays a generation's start."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor

from ..priority import lower_thread_priority

WORKERS = 2


_bulk = ThreadPoolExecutor(WORKERS, thread_name_prefix="tokenwire-cpu", initializer=lower_thread_priority)
_prompts = ThreadPoolExecutor(WORKERS, thread_name_prefix="tokenwire-prompt")


async def _on(pool: ThreadPoolExecutor, fn, *args, **kwargs):
    context = contextvars.copy_context()  # the caller's context (api/calls.py's current call)
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(context.run, fn, *args,
                                                                                    **kwargs))


async def run(fn, *args, **kwargs):
    """fn(*args, **kwargs) in the bulk lane."""
    return await _on(_bulk, fn, *args, **kwargs)


async def prepare(fn, *args, **kwargs):
    """fn(*args, **kwargs) in the prompt lane (a generation's start)."""
    return await _on(_prompts, fn, *args, **kwargs)
