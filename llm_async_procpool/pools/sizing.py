"""How many workers the process pool runs, and how big one may grow.

By default a worker per usable core, but a new worker starts only while, after
it, at least half of the machine's memory stays available, judged by the
private memory a loaded worker needed (``measure``, once its model has
loaded). ``LLM_ASYNC_POOL_MAX_MEMORY`` retires a worker grown past it.
"""

from __future__ import annotations

from ..config import PoolSettings
from .base import available_memory, memory, total_memory
from .slots import Slot

#: A new worker starts by default only while this share of memory stays available.
KEEP_FREE = 0.5


class Sizing:
    def __init__(self, settings: PoolSettings, cores: int):
        self.settings = settings
        self.cores = cores
        self.worker_cost = 0  # the most private memory a loaded worker has needed

    def room(self, live: int) -> bool:
        """May another worker start, with ``live`` alive or starting?"""
        if self.settings.workers is not None:
            return live < self.settings.workers
        if live >= self.cores:
            return False
        if live == 0 or not self.worker_cost:
            return True
        free, total = available_memory(), total_memory()
        return free is None or not total or free - self.worker_cost >= KEEP_FREE * total

    def measure(self, slot: Slot) -> None:
        """A worker's private memory once it loaded a model: what it grows from,
        and (for a worker that loads for itself) what the next one may need."""
        cost = memory(slot.pid).private or 0
        slot.loaded_private = cost
        if self.settings.workers is None and slot.template is None:
            self.worker_cost = max(self.worker_cost, cost)

    def too_big(self, slot: Slot) -> bool:
        """Has it grown past ``LLM_ASYNC_POOL_MAX_MEMORY``?"""
        limit = self.settings.max_memory
        return limit is not None and (memory(slot.pid).private or 0) > limit * 2**20
