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

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import llm

from ..cells import Control, local
from ..config import Settings
from ..errors import PoolClosed
from ..messages import Chunks, Done, Failed, Job
from ..runner import run_job
from ..wire import key_model_id
from ..worker import class_name, registry
from .base import Pool, Task, WorkerInfo, memory
from .placement import pick_idle
from .reactor import Reactor
from .run import Run

#: Seconds between checks, while waiting for an instance, that the prompt is still wanted.
POLL = 0.05
#: Seconds between two looks at the time limits, at most.
TICK = 1.0


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
    served: dict[int, Any] = field(default_factory=dict)  # id(instance): its last conversation
    count: int = 0
    loading: bool = False  # the first instance's first prompt has not answered yet
    loaded: bool = False


class ThreadPool(Pool):
    kind = "thread"

    def __init__(self, settings):
        super().__init__(settings)
        self._size = settings.workers or os.cpu_count() or 1
        self._changed = threading.Condition(self._lock)
        self._queue: deque[Task] = deque()
        self._threads = 0
        self._running: set[Task] = set()
        self._served = 0
        self._models: dict[str, _Instances] = {}
        self._last_used = time.monotonic()
        self._clock: Reactor | None = None  # runs the time limits
        self._next_tick = 0.0

    def new_task(self, model: llm.Model, job: Job, settings: Settings) -> Task:
        return Task(job, model, settings)  # it stays in this process

    def enqueue(self, task: Task) -> None:
        task.queued = True
        self._queue.append(task)
        if self._threads < self._size:
            self._threads += 1
            threading.Thread(target=self._serve, name="llm-async-pool-thread", daemon=True).start()
        if self._clock is None:
            self._clock = Reactor("llm-async-pool-clock", self._tick)
        self._changed.notify()

    def unqueue(self, task: Task) -> bool:
        if not task.queued:
            return False
        task.queued = False
        return True

    def stop(self, task: Task) -> None:
        """A thread cannot be killed: the model stops before its next chunk."""
        task.slot.cancel(task.seq)
        self._changed.notify_all()

    def take(self, task: Task, count: int, nbytes: int) -> None:
        if task.slot is not None:
            task.slot.take(count, nbytes)

    def running(self) -> list[Task]:
        return list(self._running)

    def _tick(self) -> float:
        now = time.monotonic()
        self._next_tick = min(self.check_running(now) or now + TICK, now + TICK)
        return max(0.0, self._next_tick - now)

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self.closed:
                    self._changed.wait()
                if self.closed and not self._queue:
                    self._threads -= 1
                    return
                task = self._queue.popleft()
                if not task.queued or task.closed:
                    continue
                task.queued = False
                task.slot = Control(local())  # its stop and backpressure cells
            self._run(task)

    def _run(self, task: Task) -> None:
        key, control = task.key, task.slot
        instance, cold = self._checkout(key, task.model, task.seq, control, task.affinity)
        if instance is None:
            if self.closed:
                task.run.deliver(Failed(task.seq, PoolClosed("The thread pool has shut down")))
            return  # cancelled while it waited
        with self._lock:
            task.begin(control, cold)
            self._running.add(task)
        if task.deadline is not None and task.deadline < self._next_tick:
            self._clock.wake()
        state = self._models[key]

        def heard() -> None:
            with self._lock:
                task.hear()
                if state.loading:
                    state.loading, state.loaded = False, True
                    self._changed.notify_all()

        event = None
        try:
            event = run_job(task.job, instance, _Direct(task.run, heard), control)
            if not task.heard:
                heard()
        finally:  # the instance is free before its consumer hears: a next turn finds it
            with self._lock:
                self._running.discard(task)
                self._served += 1
                self._last_used = time.monotonic()
                conversation = task.job.conversation
                state.served[id(instance)] = None if conversation is None else conversation.id
                state.free.append(instance)
                if not task.heard:
                    state.loading = False
                self._changed.notify_all()
        if not (task.stopping and type(event) is Done and event.cancelled):
            task.run.deliver(event)

    def _checkout(
        self, key: str, model: llm.Model, seq: int, control: Control, affinity: Any = None
    ) -> tuple[llm.Model | None, bool]:
        """An instance of the model no other prompt is using (the one that served
        the conversation's last turn, if it is free); (None, _) if the prompt was
        cancelled or the pool closed while it waited."""
        with self._lock:
            state = self._models.setdefault(key, _Instances())
            while True:
                if self.closed or control.cancelled(seq):
                    return None, False
                if state.free:
                    instance = pick_idle(state.free, lambda i: state.served.get(id(i)), affinity)
                    state.free.remove(instance)
                    return instance, False
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
            models = sorted({key_model_id(key) for key in self._models})
            return [
                WorkerInfo(
                    os.getpid(), memory(os.getpid()), models, self._served, bool(self._running)
                )
            ]

    def idle(self) -> bool:
        """Nothing to do, and its loaded instances unused for the idle timeout."""
        with self._lock:
            unused = time.monotonic() - self._last_used >= self.settings.idle_timeout
            waiting = any(task.queued for task in self._queue)
            return not waiting and not self._running and (unused or not self._models)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop running prompts; queued ones fail with PoolClosed."""
        with self._lock:
            self.closed = True
            for task in self._running:
                task.slot.cancel(task.seq)
            queued = [task for task in self._queue if task.queued]
            self._queue.clear()
            self._changed.notify_all()
        if self._clock is not None:
            self._clock.stop()
        for task in queued:
            task.run.deliver(Failed(task.seq, PoolClosed("The thread pool has shut down")))


def _fresh_instance(model: llm.Model) -> llm.Model | None:
    """Another instance of this model, built as its plugin builds it."""
    found = registry().get(model.model_id)
    if found is not None and class_name(found) == class_name(model):
        return found
    return None
