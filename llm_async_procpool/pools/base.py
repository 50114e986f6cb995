"""What the three pools share: the interface a twin uses, one record for a
prompt in a pool (``Task``), and the rules that bound a prompt in time.

A pool takes a sync model and a ``Job`` and returns a ``Run``: the twin reads
``Chunks`` and one terminal event from it, and closes it when it stops
early. A pool keeps a ``Task`` for each prompt from then until its terminal
event. Its time limits run on the pool's own clock thread, not on the
consumer's event loop, so they hold even when that loop stops running:

- ``LLM_ASYNC_POOL_TIMEOUT`` counts from the moment a worker takes the prompt;
  a worker that has not loaded the model yet gets ``LLM_ASYNC_POOL_LOAD_TIMEOUT``
  until its first event instead;
- a prompt whose consumer's loop has stopped running for ``STOPPED_LOOP``
  seconds is stopped as if its consumer had left;
- a stopped prompt's worker gets ``LLM_ASYNC_POOL_GRACE`` to end it (the rest
  of the load allowance, while a first load runs) before it is killed.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import llm

from ..config import PoolSettings, Settings
from ..errors import PoolClosed, PromptTimeout
from ..messages import Failed, Job
from ..wire import dumps_job
from .run import Run

#: Seconds a running prompt's event loop may stay stopped before the prompt is stopped.
STOPPED_LOOP = 10.0


@dataclass(eq=False)
class Task:
    """One prompt in a pool, from ``submit`` to its terminal event."""

    job: Job
    model: llm.Model
    settings: Settings
    payload: bytes | None = None  # the pickled job, for pools that send it
    run: Run = None  # type: ignore[assignment]
    slot: Any = None  # the worker running it
    queued: bool = False  # waiting for a worker
    cold: bool = False  # its worker loads the model first
    heard: bool = False  # an event of it has come back
    started: float = 0.0  # when a worker took it (monotonic)
    deadline: float | None = None  # when it times out
    stopping: bool = False  # told to stop; its worker is killed if it overruns
    loop_stopped: float | None = None  # since when its consumer's loop is not running
    context: Any = None  # the app's directory and environment when it was made

    @property
    def key(self) -> str:
        return self.job.model_key

    @property
    def seq(self) -> int:
        return self.job.seq

    @property
    def closed(self) -> bool:
        return self.run.closed

    @property
    def affinity(self) -> Hashable | None:
        """Its conversation, if it continues one: the worker that served the
        previous turn may hold that prefix in its model's cache."""
        conversation = self.job.conversation
        return conversation.id if conversation is not None and conversation.history else None

    def begin(self, slot: Any, cold: bool) -> None:
        """A worker takes it: its clock starts."""
        self.slot, self.cold, self.heard = slot, cold, False
        self.started = time.monotonic()
        limit = self.settings.load_timeout if cold else self.settings.timeout
        self.deadline = None if limit is None else self.started + limit

    def hear(self) -> bool:
        """Its first event: the model is loaded, and the prompt's own clock
        starts. True the first time."""
        if self.heard:
            return False
        self.heard = True
        if self.cold:
            timeout = self.settings.timeout
            self.deadline = None if timeout is None else time.monotonic() + timeout
        return True

    def loading(self) -> bool:
        return self.cold and not self.heard

    def stop_allowance(self) -> float:
        """Seconds its worker gets to stop before it is killed: the grace period,
        but a first load may use the rest of its allowance, so a cancel does not
        throw away a load the next prompt needs."""
        allowance = self.settings.grace
        if self.loading() and self.settings.load_timeout is not None:
            left = self.started + self.settings.load_timeout - time.monotonic()
            allowance = max(allowance, left)
        return allowance

    def overdue(self, now: float) -> Exception | None:
        """Why it must stop now, if it must: its time ran out, or its
        consumer's loop stopped running."""
        if self.deadline is not None and now >= self.deadline:
            if self.loading():
                limit = self.settings.load_timeout
                what = f"did not finish loading within LLM_ASYNC_POOL_LOAD_TIMEOUT={limit:g}"
            else:
                what = f"did not finish within LLM_ASYNC_POOL_TIMEOUT={self.settings.timeout:g}"
            return PromptTimeout(
                f"Model {self.job.model_id!r} {what} seconds; its worker was stopped"
            )
        loop = self.run.loop
        if loop.is_running() and not loop.is_closed():
            self.loop_stopped = None
        elif self.loop_stopped is None:
            self.loop_stopped = now
        elif now - self.loop_stopped >= STOPPED_LOOP:
            return PromptTimeout(
                f"Model {self.job.model_id!r} was stopped: the event loop reading it had "
                f"not run for {STOPPED_LOOP:g} seconds"
            )
        return None

    def next_check(self, now: float) -> float:
        """When ``overdue`` may next say yes."""
        due = now + 1.0 if self.loop_stopped is None else self.loop_stopped + STOPPED_LOOP
        return due if self.deadline is None else min(due, self.deadline)


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
    role: str = "worker"  # or "template", "zygote"
    node: str | None = None
    growth: int | None = None  # private bytes gained since its model loaded


class Pool(ABC):
    """Submit, cancel and time limits, the same for every kind of pool."""

    kind: str

    def __init__(self, settings: PoolSettings):
        self.settings = settings
        self.closed = False  # set by shutdown(); the registry then starts a new pool
        self._lock = threading.RLock()
        self._seqs = itertools.count(1)
        self._todo: deque = deque()  # decisions to carry out
        self._acting = False

    async def submit(self, model: llm.Model, job: Job, settings: Settings) -> Run:
        """Queue ``job``; it starts as soon as a worker is free."""
        job.seq = next(self._seqs)
        task = self.new_task(model, job, settings)
        task.run = Run(
            job,
            cancel=lambda: self.cancel(task),
            take=lambda count, nbytes: self.take(task, count, nbytes),
        )
        with self._lock:
            if self.closed:
                raise PoolClosed(f"The {self.kind} pool has shut down")
            self.enqueue(task)
        self.submitted()
        return task.run

    def act(self, actions: Iterable[Any]) -> None:
        """Carry out decisions in order (lock held). A decision's consequences
        queue behind it, so a long cascade never recurses."""
        self._todo.extend(actions)
        if self._acting:
            return
        self._acting = True
        try:
            while self._todo:
                self._do(self._todo.popleft())
        finally:
            self._acting = False

    def _do(self, action: Any) -> None:
        """Carry out one decision (lock held)."""
        raise NotImplementedError

    def new_task(self, model: llm.Model, job: Job, settings: Settings) -> Task:
        """The task, with its job pickled here, so a bad prompt fails before a
        worker is taken."""
        return Task(job, model, settings, payload=dumps_job(job))

    @abstractmethod
    def enqueue(self, task: Task) -> None:
        """Queue the task and start what can start (lock held)."""

    def submitted(self) -> None:
        """After a task is queued, outside the lock."""
        return None

    def prepare(self) -> None:
        """Start, in the background, what a first prompt would wait for."""
        return None

    def cancel(self, task: Task) -> None:
        """The consumer left: drop the task from the queue, or stop it."""
        with self._lock:
            if not self.unqueue(task) and task.slot is not None and not task.stopping:
                task.stopping = True
                self.stop(task)

    @abstractmethod
    def unqueue(self, task: Task) -> bool:
        """Take a waiting task out of the queue; False if it is not waiting."""

    @abstractmethod
    def stop(self, task: Task) -> None:
        """Stop a running task (lock held): its worker gets ``stop_allowance()``."""

    def fail(self, tasks: list[Task], error: Exception) -> None:
        """Tell each task's consumer it failed (they need not be running)."""
        for task in tasks:
            task.run.deliver(Failed(task.seq, error))

    def take(self, task: Task, count: int, nbytes: int) -> None:
        """The consumer took chunks: the backpressure window moves on."""
        return None

    @abstractmethod
    def running(self) -> Iterable[Task]:
        """The tasks a worker is running now (lock held)."""

    def check_running(self, now: float) -> float | None:
        """Stop every running task that is overdue; the next time to check."""
        due: list[float] = []
        overdue = []
        with self._lock:
            for task in list(self.running()):
                if task.stopping:
                    continue
                problem = task.overdue(now)
                if problem is None:
                    due.append(task.next_check(now))
                else:
                    task.stopping = True
                    overdue.append((task, problem))
                    self.stop(task)
        for task, problem in overdue:
            task.run.deliver(Failed(task.seq, problem))
        return min(due) if due else None

    @abstractmethod
    def workers(self) -> list[WorkerInfo]:
        """The processes alive now, for ``llm async-pool status``."""

    @abstractmethod
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker within ``timeout`` seconds; idempotent."""

    def forget(self) -> None:
        """In a forked copy of the app: let go of this pool without touching its
        processes (close our copies of its fds; signal, cancel and kill nothing)."""
        self.closed = True

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
