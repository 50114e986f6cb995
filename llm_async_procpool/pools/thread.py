"""The in-process baseline: the same job, run in a thread of this process.

It decodes and runs a job exactly as a worker process does (``worker.run_job``),
so options, state, conversations and cancellation behave the same; only
parallelism differs (the GIL), and a stuck model cannot be killed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import llm

from ..errors import PoolClosed
from ..messages import Chunks, Control, Failed, Job
from ..worker import run_job
from .base import Pool, WorkerInfo, rss_bytes
from .run import Run


class _Direct:
    """Hands each chunk straight to the consumer's loop; no batching needed."""

    def __init__(self, run: Run):
        self._run = run

    def put(self, chunk: Any) -> None:
        self._run.deliver(Chunks(self._run.seq, [chunk]))

    def flush(self) -> None:
        pass


class ThreadPool(Pool):
    kind = "thread"

    def __init__(self, settings):
        super().__init__(settings)
        self._executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="llm-async-pool")
        self._lock = threading.Lock()
        self._running: dict[int, Control] = {}
        self._served = 0
        self._models: dict[str, llm.Model] = {}
        self._seqs = itertools.count(1)

    async def submit(self, model: llm.Model, job: Job, timeout: float | None, grace: float) -> Run:
        job.seq = next(self._seqs)
        control = Control([0, 0])
        run = Run(
            asyncio.get_running_loop(),
            job.seq,
            job.model_id,
            cancel=lambda: control.cancel(job.seq),
            take=control.take,
            timeout=timeout,
        )
        with self._lock:
            # Keep the first instance per model id, as a worker process does, so a
            # lazy weight load happens once, not once per get_async_model() call.
            model = self._models.setdefault(job.model_id, model)
        self._executor.submit(self._run, job, model, run, control)
        return run

    def _run(self, job: Job, model: llm.Model, run: Run, control: Control) -> None:
        with self._lock:
            if self.closed:
                run.deliver(Failed(job.seq, PoolClosed("The thread pool has shut down")))
                return
            self._running[job.seq] = control
        try:
            run.deliver(run_job(job, model, _Direct(run), control))
        finally:
            with self._lock:
                del self._running[job.seq]
                self._served += 1

    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            return [
                WorkerInfo(
                    os.getpid(),
                    rss_bytes(os.getpid()),
                    sorted(self._models),
                    self._served,
                    bool(self._running),
                )
            ]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop running prompts; queued ones fail with PoolClosed when they start."""
        with self._lock:
            self.closed = True
            for seq, control in self._running.items():
                control.cancel(seq)
        self._executor.shutdown(wait=False)
