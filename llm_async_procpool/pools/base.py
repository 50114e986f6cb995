"""The small interface an async twin needs from a pool.

A pool takes a sync model and a ``Job`` and returns a ``Run``: the twin reads
``Chunks`` and one terminal event from it, and closes it when it stops
early. The process, thread and Ray pools implement it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import llm

from ..config import PoolSettings, Settings
from ..messages import Job
from .run import Run


@dataclass
class Memory:
    """A process's memory, from ``/proc/PID/smaps_rollup`` (Linux), in bytes.

    ``pss`` shares each shared page among the processes that map it, so PSS
    adds up across processes; ``shared`` is what this process shares with
    others (a template's weights, a memory-mapped GGUF file).
    """

    rss: int | None = None
    pss: int | None = None
    shared: int | None = None
    private: int | None = None


@dataclass
class WorkerInfo:
    pid: int
    memory: Memory
    models: list[str] = field(default_factory=list)
    served: int = 0
    busy: bool = False
    role: str = "worker"  # or "template"
    node: str | None = None


class Pool(ABC):
    kind: str

    def __init__(self, settings: PoolSettings):
        self.settings = settings
        self.closed = False  # set by shutdown(); the registry then starts a new pool

    @abstractmethod
    async def submit(self, model: llm.Model, job: Job, settings: Settings) -> Run:
        """Queue ``job``; it starts as soon as a worker is free.

        ``settings.timeout`` counts from the moment a worker takes the job;
        ``settings.grace`` is how long a stopped job may take to end before
        its worker is killed.
        """

    @abstractmethod
    def workers(self) -> list[WorkerInfo]:
        """The processes alive now, for ``llm async-pool status``."""

    @abstractmethod
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker within ``timeout`` seconds; idempotent."""

    def idle(self) -> bool:
        """True when nothing runs or waits, and no worker is kept: safe to drop."""
        return False


def memory(pid: int) -> Memory:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            fields = {}
            for line in rollup:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    fields[name] = int(parts[0]) * 1024
    except OSError:
        return Memory(rss=_statm_rss(pid))
    return Memory(
        rss=fields.get("Rss"),
        pss=fields.get("Pss"),
        shared=fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0),
        private=fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
    )


def _statm_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def available_memory() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo``, in bytes (None elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def total_memory() -> int | None:
    """Physical memory, in bytes (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
