"""The integers a pool shares with its workers while prompts run.

A worker checks them before every chunk (about 0.1 us a check), so they are
plain shared memory, not messages:

- one set of ``POOL_CELLS`` for the pool: ``BUSY``, how many workers run a
  prompt now (each worker's thread budget divides the cores by it);
- then ``CELLS`` per worker: the job to stop, and how many chunks and bytes
  its consumer has taken (the backpressure window).

The pool maps them from a memfd (an unlinked temporary file where there is
no memfd); the zygote maps the same file, and every process forked from it
inherits the mapping. In-process backends use a plain list.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Any

POOL_CELLS = 8
CELLS = 3
BUSY = 0  # pool cell: how many workers are running a prompt

#: Chunks a worker may have sent that the consumer has not taken yet.
WINDOW = 4096
#: Bytes of pickled chunks a worker may have sent that the consumer has not taken yet.
WINDOW_BYTES = 16 * 2**20


def size_for(workers: int) -> int:
    return POOL_CELLS + CELLS * workers


def shared(count: int) -> tuple[int, memoryview]:
    """``count`` zeroed cells in shared memory, and the fd that maps them."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("llm-async-pool-cells")
    else:
        with tempfile.TemporaryFile() as backing:
            fd = os.dup(backing.fileno())
    os.ftruncate(fd, count * 8)
    return fd, attach(fd, count)


def attach(fd: int, count: int) -> memoryview:
    """Map the cells another process made (the fd may be closed afterwards)."""
    return memoryview(mmap.mmap(fd, count * 8)).cast("q")


def local() -> list[int]:
    """Cells for a single in-process job."""
    return [0] * size_for(1)


class Control:
    """One worker's cells, as both the worker and the pool see them."""

    def __init__(self, cells: Any, index: int = 0):
        self.cells = cells
        self.base = POOL_CELLS + index * CELLS

    def cancel(self, seq: int) -> None:
        self.cells[self.base] = seq

    def cancelled(self, seq: int) -> bool:
        return self.cells[self.base] == seq

    def taken(self) -> tuple[int, int]:
        return self.cells[self.base + 1], self.cells[self.base + 2]

    def take(self, count: int, nbytes: int = 0) -> None:
        self.cells[self.base + 1] += count
        self.cells[self.base + 2] += nbytes

    def reset(self) -> None:
        self.cells[self.base + 1] = self.cells[self.base + 2] = 0

    def clear(self) -> None:
        for offset in range(CELLS):
            self.cells[self.base + offset] = 0
