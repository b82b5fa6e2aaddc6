"""CPU-bound request work (tokenizing, detokenizing, building and serializing big responses)
runs here, never on the event loop: the loop must stay free to move other streams' bytes and
answer health checks.

The bound: one process-wide pool of WORKERS threads, so at most WORKERS such jobs run at once
whatever the traffic; the rest wait in the pool's queue, costing no CPU, and a queued job whose
call is cancelled (client gone, deadline passed) is dropped unrun. Two workers let one huge
request run beside the small jobs (Generate's prompt) instead of delaying them all. They run at
normal priority: at nice +10 a Generate's prompt preparation starved behind busy processes on
the same cores (time to first token 6.3 s against 0.26 s at concurrency 1)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor

WORKERS = 2

_pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="tokenwire-cpu")


async def run(fn, *args, **kwargs):
    """fn(*args, **kwargs) on the pool, in the caller's context (api/calls.py's current call)."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool, call)
