"""CPU-bound request work (tokenizing, detokenizing, building and serializing big responses)
runs here, never on the event loop: the loop must stay free to move other streams' bytes and
answer health checks.

The bound: one process-wide pool of WORKERS threads, so at most WORKERS such jobs run at once
whatever the traffic; the rest wait in the pool's queue, costing no CPU, and a queued job whose
call is cancelled (client gone, deadline passed) is dropped unrun. On Linux the workers also run
at a lower CPU priority (nice +NICE): when cores are short the engine's threads get them first,
so a flood of Tokenize calls slows down itself rather than every stream. Two workers let one
huge request run beside the small jobs (Generate's prompt) instead of delaying them all."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

WORKERS = 2
NICE = 10  # CFS weights: a nice-10 thread gets about a tenth of a core another thread wants


def _lower_priority() -> None:
    if sys.platform.startswith("linux"):  # there, a thread id names that thread alone
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except OSError:  # not allowed here: run at normal priority
            pass


_pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="tokenwire-cpu", initializer=_lower_priority)


async def run(fn, *args, **kwargs):
    """fn(*args, **kwargs) on the pool, in the caller's context (api/calls.py's current call)."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool, call)
