"""The thread budget: how many compute threads a worker's native libraries may use.

Torch, BLAS, OpenMP and llama.cpp each start a thread per core. Two workers
on two cores would then run four compute threads, and every worker loses.

- ``environment()`` sets the usual knobs (``OMP_NUM_THREADS`` and friends) to
  the worker's static share, ``cores // workers``, before any model code runs,
  unless the user has set them, and makes OpenMP threads sleep rather than spin
  when idle (``OMP_WAIT_POLICY=PASSIVE``).
- ``patch_cpu_count()`` makes ``os.cpu_count()`` and
  ``multiprocessing.cpu_count()`` report the worker's share as it is now, for
  libraries that size their pools from them when a model is built
  (llama-cpp-python's ``n_threads``).
- ``Budget.adjust()`` runs between chunks: with ``LLM_ASYNC_POOL_THREADS=auto``
  a worker running alone gets every core, and each of N busy workers gets
  ``cores // N``, through ``torch.set_num_threads``, threadpoolctl (BLAS and
  OpenMP pools) and ``llama_set_n_threads`` on every llama.cpp context the
  process holds (found without the plugin's help: ``llama``).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from . import llama
from .cells import BUSY

KNOBS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
#: ``omp_pause_hard``: an OpenMP runtime ends its threads (see ``pause_openmp``).
OMP_PAUSE_HARD = 2
#: Seconds the threads an OpenMP pause ended may take to leave the thread list.
PAUSE_SETTLE = 0.1
#: Modules whose presence means a native thread pool may need resizing.
NATIVE = ("torch", "numpy", "scipy", "llama_cpp", "sklearn")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def user_pinned(environ: dict[str, str]) -> bool:
    """Has the user sized a thread pool themselves? Then we leave them all alone."""
    return any(environ.get(name, "").strip() for name in KNOBS)


def environment(environ: dict[str, str], threads: int) -> dict[str, str]:
    """The worker's environment: the knobs at ``threads``, unless the user set any."""
    result = dict(environ)
    if not user_pinned(environ):
        result.update((name, str(threads)) for name in KNOBS)
    result.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return result


def patch_cpu_count(share: Callable[[], int]) -> None:
    def cpu_count() -> int:
        return share()

    os.cpu_count = cpu_count
    multiprocessing.cpu_count = cpu_count
    if hasattr(os, "process_cpu_count"):  # Python 3.13
        os.process_cpu_count = cpu_count


class Budget:
    """Resizes native thread pools between chunks, when the share changes.

    ``adjust`` runs before every chunk, so its usual path is three
    comparisons: the busy count, how many modules are loaded (a new native
    library), and whether a llama.cpp context was built.
    """

    def __init__(self, cells: Any, cores: int, fixed: int | None):
        self.cells = cells
        self.cores = cores
        self.fixed = fixed
        self.busy = -1
        self.modules = -1
        self.current = 0
        self.native = 0  # native libraries loaded when the share was last applied
        self.llamas = llama.Contexts()

    def share(self) -> int:
        """The threads this worker may use now."""
        if self.fixed is not None:
            return self.fixed
        return max(1, self.cores // max(1, self.cells[BUSY]))

    def adjust(self) -> None:
        busy = self.cells[BUSY]
        if busy == self.busy and len(sys.modules) == self.modules and not self.llamas.new:
            return
        self.busy, self.modules = busy, len(sys.modules)
        share = self.share()
        native = sum(1 for name in NATIVE if name in sys.modules)
        if native and (share != self.current or native != self.native or self.llamas.new):
            self.current, self.native = share, native
            limit(share)
            self.llamas.resize(share)


def limit(threads: int) -> None:
    """Set every loaded native thread pool to ``threads``."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch.set_num_threads(threads)
        except Exception:
            pass
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    try:
        threadpool_limits(limits=threads)
    except Exception:
        pass


def forkable(openblas: int = 0) -> bool:
    """Could this process be forked safely, as far as native threads go?

    Only if no other thread could hold a lock the child would inherit: the
    process has one thread, apart from OpenBLAS's own worker threads (numpy's
    BLAS starts them at import), which OpenBLAS stops before a fork and starts
    again after it. ``openblas``: how many such threads it had before someone
    lowered OpenBLAS's count (its threads stay, parked).

    Threads are told apart only by their count, so an OpenMP runtime's pool
    (torch's, llama.cpp's) would pass for OpenBLAS's threads, and a child
    forked with it hangs at its first parallel region. So this thread's OpenMP
    pool is ended first (``pause_openmp``); where it cannot be, a process with
    an OpenMP runtime loaded and any extra thread is not forked.
    """
    extra = threads_now() - 1
    if extra == 0:
        return True
    pools = _threadpools()
    allowed = max(openblas, _openblas_threads(pools))
    if any(info.get("user_api") == "openmp" for info in pools):
        if not pause_openmp(pools):
            return False
        # a joined thread leaves /proc/self/task a moment after its join returns
        settled = time.monotonic() + PAUSE_SETTLE
        while (extra := threads_now() - 1) > allowed and time.monotonic() < settled:
            time.sleep(0.001)
    return extra <= allowed


def pause_openmp(pools: list[dict]) -> bool:
    """End this thread's GNU OpenMP pool (``omp_pause_resource_all``, OpenMP 5.0):
    its threads exit now, and the next parallel region starts them again (a
    fraction of a millisecond). True when every OpenMP runtime loaded here is
    GNU's and did so."""
    for info in pools:
        if info.get("user_api") != "openmp":
            continue
        if info.get("prefix") != "libgomp":
            return False  # LLVM's or Intel's: not tried here
        try:
            runtime = ctypes.CDLL(info["filepath"], mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            pause = runtime.omp_pause_resource_all
        except (OSError, AttributeError, KeyError):
            return False
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        if pause(OMP_PAUSE_HARD) != 0:  # called from inside a parallel region
            return False
    return True


def openblas_threads() -> int:
    """OpenBLAS (pthreads build) worker threads this process may have."""
    return _openblas_threads(_threadpools())


def _openblas_threads(pools: list[dict]) -> int:
    return sum(
        info["num_threads"] - 1
        for info in pools
        if info.get("internal_api") == "openblas" and info.get("threading_layer") == "pthreads"
    )


def _threadpools() -> list[dict]:
    """The native thread pools loaded here (threadpoolctl), or none if it fails."""
    try:
        from threadpoolctl import threadpool_info

        return threadpool_info()
    except Exception:
        return []


def threads_now() -> int:
    """Threads of this process, native ones included (Linux), else Python's count."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()
