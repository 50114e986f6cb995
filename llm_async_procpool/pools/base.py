"""The small interface an async twin needs from a pool.

A pool takes a sync model and a ``Job`` and returns a ``Run``: the twin reads
``Chunks`` and one terminal event from it, and closes it when it stops
early. Process and thread pools implement it here; a Ray pool can too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import llm

from ..config import PoolSettings
from ..messages import Job
from .run import Run


@dataclass
class WorkerInfo:
    pid: int
    rss_bytes: int | None
    models: list[str] = field(default_factory=list)
    served: int = 0
    busy: bool = False


class Pool(ABC):
    kind: str

    def __init__(self, settings: PoolSettings):
        self.settings = settings
        self.closed = False  # set by shutdown(); the registry then starts a new pool

    @abstractmethod
    async def submit(self, model: llm.Model, job: Job, timeout: float | None, grace: float) -> Run:
        """Start ``job`` on a free worker, waiting for one if all are busy.

        ``timeout`` counts from the moment a worker takes the job; ``grace``
        is how long a stopped job may take to end before its worker is killed.
        """

    @abstractmethod
    def workers(self) -> list[WorkerInfo]:
        """The workers alive now, for ``llm async-pool status``."""

    @abstractmethod
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker within ``timeout`` seconds; idempotent."""


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process, from /proc (None where that is absent)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")
