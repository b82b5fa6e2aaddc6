"""CPU threads for the thread that steps an engine.

`torch.set_num_threads` sets the calling thread's OpenMP and MKL counts, and also a global
count that a thread adopts at its first parallel operation (ATen ParallelOpenMP.cpp:
set_num_threads, lazy_init_num_threads). The engine switches its own thread to one thread
for small steps and back to *its own configured count* after, never to a count read back,
so two engines in one process cannot restore each other's switch.

Still process-wide: a thread whose first parallel operation falls inside a small step adopts
one thread. Setting the OpenMP count of the stepping thread alone through the runtime's C
entry points (ctypes) avoided that, but made every decode step after a prefix-cache hit about
10x slower here (time to first token 2.1 s against 0.19 s), so it is not used."""

from __future__ import annotations

import torch


def supported() -> bool:
    return True


def set_for_this_thread(n: int) -> bool:
    """Make this thread's torch operations use n threads (see the module's note on the global)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return True
