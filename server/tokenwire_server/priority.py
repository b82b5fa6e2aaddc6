"""Background threads whose work must not take a core from the engine (bulk request work,
constraint compiling) run at a lower CPU priority."""

from __future__ import annotations

import os
import sys
import threading

NICE = 10  # CFS weights: a nice-10 thread gets about a tenth of a core another thread wants


def lower_thread_priority() -> None:
    """A ThreadPoolExecutor initializer: the calling thread alone runs at nice +NICE."""
    if sys.platform.startswith("linux"):  # there, a thread id names that thread alone
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except OSError:  # not allowed here: run at normal priority
            pass
