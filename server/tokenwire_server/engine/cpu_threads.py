"""CPU threads for the calling thread only.

`torch.set_num_threads` is process-wide in part: besides the calling thread's OpenMP and MKL
counts it stores a global count that every thread adopts at its first parallel operation
(ATen ParallelOpenMP.cpp: set_num_threads, init_num_threads, lazy_init_num_threads). An
engine switching to one thread for a small step would leak that count into threads started
meanwhile, and two engines in one process would read back each other's counts. So the
engine sets the OpenMP count (and MKL's thread-local one) of its own thread directly, in the
runtimes torch links, and never touches torch's global."""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _runtime():
    """(omp_set_num_threads, MKL_Set_Num_Threads_Local or None), or None if torch's OpenMP
    runtime cannot be reached (other builds): then the engine never switches."""
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    library = Path(torch.__file__).parent / "lib" / f"libtorch_cpu{suffix}"
    if torch.__config__.parallel_info().find("OpenMP") < 0 or not library.exists():
        return None
    try:
        lib = ctypes.CDLL(str(library))  # the loaded copy; symbol lookup also searches its dependencies
        set_omp = lib.omp_set_num_threads
    except (OSError, AttributeError):
        return None
    set_omp.argtypes, set_omp.restype = [ctypes.c_int], None
    set_mkl = getattr(lib, "MKL_Set_Num_Threads_Local", None)  # the C entry (not the Fortran one)
    if set_mkl is not None:
        set_mkl.argtypes, set_mkl.restype = [ctypes.c_int], ctypes.c_int
    return set_omp, set_mkl


_RUNTIME = _runtime()
if _RUNTIME is None:
    log.debug("no per-thread OpenMP control in this torch build: steps keep the process's thread count")


def supported() -> bool:
    return _RUNTIME is not None


def set_for_this_thread(n: int) -> bool:
    """Make this thread's torch operations use n threads; other threads and threads started
    later are unaffected. False (nothing changed) where unsupported."""
    if _RUNTIME is None:
        return False
    torch.get_num_threads()  # torch's one-time init of this thread first, or it would undo this later
    set_omp, set_mkl = _RUNTIME
    set_omp(n)
    if set_mkl is not None:
        set_mkl(n)
    return True
