"""The in-process pool: the same job, run in a thread of this process.

It runs a job exactly as a worker process does (``runner.run_job``), so
options, state, conversations and cancellation behave the same, and the
consumer gets the very exception object the model raised. What differs:
parallelism (the GIL), and a stuck model cannot be killed (its thread is a
daemon, so it never holds up interpreter exit).

Model objects are not assumed to be thread-safe (a llama.cpp context is not):
each prompt runs on an instance no other prompt is using. The first instance
loads alone; further ones, built from llm's registry as a worker process
would, are made only once that first load has finished, up to one per thread.
A model that is not in the registry runs one prompt at a time.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import llm

from ..config import Settings
from ..errors import PoolClosed
from ..messages import Chunks, Control, Failed, Job, local_cells
from ..runner import run_job
from ..worker import class_name, registry
from .base import Pool, WorkerInfo, memory
from .run import Dispatched, Run

#: Seconds between checks, while waiting for an instance, that the prompt is still wanted.
POLL = 0.05


class _Direct:
    """Hands each chunk straight to the consumer's loop; no batching needed."""

    error = None

    def __init__(self, run: Run, loaded: Any):
        self._run = run
        self._loaded = loaded
        self._count = 0

    def put(self, chunk: Any) -> None:
        if self._count == 0:
            self._loaded()
        self._count += 1
        self._run.deliver(Chunks(self._run.seq, [chunk]))

    def flush(self, last: bool = False) -> None:
        pass

    def sent(self) -> tuple[int, int]:
        return self._count, 0


@dataclass
class _Instances:
    """The instances of one model (by ``Job.model_key``)."""

    free: list[llm.Model] = field(default_factory=list)
    count: int = 0
    loading: bool = False  # the first instance's first prompt has not answered yet
    loaded: bool = False


class ThreadPool(Pool):
    kind = "thread"

    def __init__(self, settings):
        super().__init__(settings)
        self._size = settings.workers or os.cpu_count() or 1
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._jobs: deque[tuple[Job, llm.Model, Run, Control]] = deque()
        self._threads = 0
        self._running: dict[int, Control] = {}
        self._served = 0
        self._models: dict[str, _Instances] = {}
        self._seqs = itertools.count(1)
        self._last_used = time.monotonic()

    async def submit(self, model: llm.Model, job: Job, settings: Settings) -> Run:
        job.seq = next(self._seqs)
        control = Control(local_cells())
        run = Run(job, settings, cancel=lambda: self._cancel(job.seq, control), take=control.take)
        with self._lock:
            if self.closed:
                raise PoolClosed("The thread pool has shut down")
            self._jobs.append((job, model, run, control))
            if self._threads < self._size:
                self._threads += 1
                threading.Thread(
                    target=self._serve, name="llm-async-pool-thread", daemon=True
                ).start()
            self._changed.notify()
        return run

    def _cancel(self, seq: int, control: Control) -> None:
        with self._lock:
            control.cancel(seq)
            self._changed.notify_all()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self.closed:
                    self._changed.wait()
                if self.closed and not self._jobs:
                    self._threads -= 1
                    return
                job, model, run, control = self._jobs.popleft()
            self._run(job, model, run, control)

    def _run(self, job: Job, model: llm.Model, run: Run, control: Control) -> None:
        key = job.model_key
        instance, cold = self._checkout(key, model, job.seq, control)
        if instance is None:
            if self.closed:
                run.deliver(Failed(job.seq, PoolClosed("The thread pool has shut down")))
            return  # cancelled while it waited
        with self._lock:
            self._running[job.seq] = control
        state = self._models[key]
        loaded = [False]

        def mark_loaded() -> None:
            if not loaded[0]:
                loaded[0] = True
                with self._lock:
                    state.loading, state.loaded = False, True
                    self._changed.notify_all()

        try:
            run.deliver(Dispatched(cold=cold))
            event = run_job(job, instance, _Direct(run, mark_loaded), control)
            mark_loaded()
            run.deliver(event)
        finally:
            with self._lock:
                del self._running[job.seq]
                self._served += 1
                self._last_used = time.monotonic()
                state.free.append(instance)
                if not loaded[0]:
                    state.loading = False
                self._changed.notify_all()

    def _checkout(
        self, key: str, model: llm.Model, seq: int, control: Control
    ) -> tuple[llm.Model | None, bool]:
        """An instance of the model no other prompt is using; (None, _) if the
        prompt was cancelled or the pool closed while it waited."""
        with self._lock:
            state = self._models.setdefault(key, _Instances())
            while True:
                if self.closed or control.cancelled(seq):
                    return None, False
                if state.free:
                    return state.free.pop(), False
                if not state.loading and state.count < self._size:
                    fresh = model if state.count == 0 else None
                    if fresh is None and state.loaded:
                        self._lock.release()
                        try:
                            fresh = _fresh_instance(model)
                        finally:
                            self._lock.acquire()
                    if fresh is not None:
                        state.count += 1
                        state.loading = not state.loaded
                        return fresh, True
                self._changed.wait(POLL)

    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            models = sorted({key.split("\0", 1)[0] for key in self._models})
            return [
                WorkerInfo(
                    os.getpid(), memory(os.getpid()), models, self._served, bool(self._running)
                )
            ]

    def idle(self) -> bool:
        """Nothing to do, and its loaded instances unused for the idle timeout."""
        with self._lock:
            unused = time.monotonic() - self._last_used >= self.settings.idle_timeout
            return not self._jobs and not self._running and (unused or not self._models)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop running prompts; queued ones fail with PoolClosed."""
        with self._lock:
            self.closed = True
            for seq, control in self._running.items():
                control.cancel(seq)
            queued, self._jobs = list(self._jobs), deque()
            self._changed.notify_all()
        for job, _model, run, _control in queued:
            run.deliver(Failed(job.seq, PoolClosed("The thread pool has shut down")))


def _fresh_instance(model: llm.Model) -> llm.Model | None:
    """Another instance of this model, built as its plugin builds it."""
    found = registry().get(model.model_id)
    if found is not None and class_name(found) == class_name(model):
        return found
    return None
