"""Where a prompt crosses into a worker process, and how its events come back.

    parent                                      worker process
    submit() -> queue -> _dispatch()
      --job pipe: Job frame------------------->  Worker.serve() -> run_job() -> execute()
    Run <- Inbox, on the consumer's loop <----  Outbox: Chunks..., Done | Failed
    Run.close() --shared cells: stop seq------>  stops before the next chunk

Prompts wait in one queue. ``_dispatch`` gives each to an idle worker that
has its model loaded, else starts a worker for it while there is room, else
to any idle worker. A model's first load happens once: while it is under way,
other prompts for that model wait for it instead of loading it elsewhere
(so weights are downloaded once, and memory never holds N half-loaded
copies). Where it is safe, that first load happens in a template process
(``templates.py`` here, ``template.py`` in that process) and every worker for
the model is forked from it, sharing its memory.

A running prompt's events are read on its consumer's event loop
(``inbox.py``). One reactor thread (``reactor.py``) watches every process's
sentinel, so a death is noticed from the process itself even if a helper it
forked still holds its pipes; it also reads a pipe nobody else will (after a
cancel, or when the consumer's loop closed). Crashes, timeouts, grace-period
kills, idle retirement and recycling all end in the same bookkeeping: the
slot's capacity comes back and the queue moves on, whatever happened to the
event loop that submitted the prompt.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cloudpickle
import llm

from .. import channel, threads
from ..config import MAX_WORKERS, Settings, api_backed
from ..errors import PoolClosed, PromptNotSendable, RemoteError, WorkerCrashed
from ..messages import (
    BUSY,
    CELLS,
    KINDS,
    POOL_CELLS,
    TERMINAL_KINDS,
    Chunks,
    Control,
    Done,
    Failed,
    Job,
    NeedModel,
)
from ..wire import dumps_job, rebuild_error
from ..worker import Boot
from . import launch
from .base import Memory, Pool, WorkerInfo, available_memory, memory, total_memory
from .inbox import Frames, Inbox
from .reactor import Reactor
from .run import Dispatched, Run, stop_allowance
from .templates import Template, TemplateHost

STARTUP_HINT = (
    " It died while starting, before any of its own code ran: see its traceback on"
    " stderr. If it names your main module, keep the script's top-level code under"
    " `if __name__ == '__main__':`, because workers started by spawn or forkserver"
    " import the main module again."
)
#: Jobs larger than this are written from a helper thread, not under the lock.
INLINE_JOB = 60_000
#: Seconds a running prompt gets to stop when the pool shuts down (at most its grace).
SHUTDOWN_GRACE = 1.0
#: Seconds a retired worker gets to exit on its own before it is killed.
RETIRE_GRACE = 5.0
#: Seconds between checks that a running prompt's event loop has not closed.
LOOP_CHECK = 1.0
#: A new worker starts by default only while this share of memory stays available.
KEEP_FREE = 0.5
CHUNKS = KINDS[Chunks]
NEED_MODEL = KINDS[NeedModel]


@dataclass(eq=False)
class Pending:
    """A prompt waiting for a worker."""

    job: Job
    model: llm.Model
    run: Run
    payload: bytes
    settings: Settings
    slot: Slot | None = None
    requested: bool = False  # it asked for a new worker


@dataclass
class ModelState:
    """What the pool knows of one model (by ``Job.model_key``)."""

    loading: Any = None  # who is doing the first load: a Slot or a Template
    warm: bool = False  # a first load has finished somewhere
    template: Template | None = None
    shareable: bool | None = None
    reason: str = ""


class Slot:
    """One worker process: its handle, its pipes, its cells and its current job."""

    def __init__(
        self, pool: ProcessPool, handle: launch.Handle, jobs: int, events: int, index: int
    ):
        self.handle = handle
        self.pid = handle.pid
        self.jobs = jobs
        self.inbox = Inbox(
            events, lambda frames: pool._on_events(self, frames), lambda: pool._reactor
        )
        self.index = index
        self.control = Control(pool.cells, index)
        self.models: set[str] = set()
        self.item: Pending | None = None
        self.cold = False  # the current job's model is not loaded here yet
        self.heard = False  # an event of the current job has come back
        self.started = 0.0
        self.idle_since: float | None = time.monotonic()
        self.kill_at: float | None = None
        self.served = 0
        self.retired = False
        self.gone = False  # its exit has been settled
        self.template: Template | None = None
        self.send_lock = threading.Lock()

    @property
    def run(self) -> Run | None:
        return None if self.item is None else self.item.run

    def send(self, seq: int, payload: bytes) -> None:
        """Write one job; a dead worker is noticed by the reactor instead."""
        try:
            with self.send_lock:
                channel.write_frame(self.jobs, seq, channel.JOB, payload)
        except OSError:
            pass


class ProcessPool(TemplateHost, Pool):
    kind = "process"

    def __init__(self, settings):
        super().__init__(settings)
        self.cells = multiprocessing.RawArray("q", POOL_CELLS + CELLS * MAX_WORKERS)
        self._lock = threading.RLock()
        self._slots: set[Slot] = set()
        self._idle: list[Slot] = []
        self._live = 0  # workers alive or starting, never above the capacity
        self._queue: deque[Pending] = deque()
        self._models: dict[str, ModelState] = {}
        self._templates: set[Template] = set()
        self._indexes = list(range(MAX_WORKERS - 1, -1, -1))
        self._seqs = itertools.count(1)
        self._cores = threads.usable_cores()
        self._worker_cost = 0  # the most private memory a loaded worker has needed
        self._executor: ThreadPoolExecutor | None = None
        self._reactor: Reactor | None = None
        self._empty_since = time.monotonic()

    # ------------------------------------------------------------ submitting
    async def submit(self, model: llm.Model, job: Job, settings: Settings) -> Run:
        job.seq = next(self._seqs)
        payload = dumps_job(job)  # fails here, before a worker is taken
        item = Pending(job, model, None, payload, settings)  # type: ignore[arg-type]
        item.run = Run(
            job,
            settings,
            cancel=lambda: self._cancel(item),
            take=lambda count, nbytes: self._take(item, count, nbytes),
        )
        with self._lock:
            if self.closed:
                raise PoolClosed("The process pool has shut down")
            self._queue.append(item)
            self._dispatch()
            if self._reactor is None:  # after a first fork, if any: no threads before it
                self._reactor = Reactor(f"llm-async-pool-{id(self):x}", self._tick)
                for slot in self._slots:
                    self._watch(slot)
                    if slot.inbox.stranded:
                        slot.inbox.to_reactor()
                for template in self._templates:
                    self._watch_template(template)
        return item.run

    def _dispatch(self) -> None:
        """Start every queued prompt that can start now (lock held)."""
        if self.closed:
            return
        for item in list(self._queue):
            if item.run.closed:
                self._queue.remove(item)
                continue
            key = item.job.model_key
            state = self._models.setdefault(key, ModelState())
            slot = self._idle_with(key)
            if slot is None and state.loading is None:
                slot = self._make_room(item, state)
            if slot is not None:
                self._queue.remove(item)
                self._begin(item, slot, state)

    def _idle_with(self, key: str) -> Slot | None:
        for slot in reversed(self._idle):
            if key in slot.models:
                self._idle.remove(slot)
                return slot
        return None

    def _make_room(self, item: Pending, state: ModelState) -> Slot | None:
        """Start a worker for ``item`` if there is room; or hand it any idle worker."""
        template = state.template if state.template is not None and state.template.ready else None
        if item.requested:
            return None if template is not None or not self._idle else self._idle.pop()
        if template is not None:
            if not self._room():
                if not self._idle:
                    return None
                self._retire(self._idle.pop(0))  # its room goes to a worker of this model
            self._live += 1
            item.requested = True
            self._fork(template)
            return None
        fresh = next((slot for slot in self._idle if not slot.models), None)
        if fresh is not None:  # a worker started for no model yet: this one
            self._idle.remove(fresh)
            return fresh
        if self._room():
            self._live += 1
            item.requested = True
            if self._can_share(item.model, state):
                state.loading = "template"
                self._later(self._start_template, item)
            else:
                self._later(self._start_worker)
            return None
        return self._idle.pop() if self._idle else None

    def _room(self) -> bool:
        """May another worker start? By default, one per usable core, while at
        least half of the machine's memory stays available after it."""
        if self.settings.workers is not None:
            return self._live < self.settings.workers
        if self._live >= self._cores:
            return False
        if self._live == 0 or not self._worker_cost:
            return True
        free, total = available_memory(), total_memory()
        return free is None or not total or free - self._worker_cost >= KEEP_FREE * total

    def _can_share(self, model: llm.Model, state: ModelState) -> bool:
        return (
            self.settings.share
            and launch.CAN_SHARE
            and not api_backed(model)  # its warm-up prompt would call the API
            and state.shareable is not False
        )

    def _begin(self, item: Pending, slot: Slot, state: ModelState) -> None:
        key = item.job.model_key
        slot.item, item.slot = item, slot
        slot.cold = key not in slot.models
        slot.heard = False
        slot.started = time.monotonic()
        slot.idle_since = None
        if slot.cold and not state.warm:
            state.loading = slot
        slot.control.reset()
        self.cells[BUSY] += 1
        item.run.deliver(Dispatched(cold=slot.cold))
        slot.inbox.to_loop(item.run.loop)
        if len(item.payload) <= INLINE_JOB:  # the idle worker's pipe is empty: no block
            slot.send(item.job.seq, item.payload)
        else:
            self._later(slot.send, item.job.seq, item.payload)

    # ------------------------------------------------------------ starting workers
    def _boot(self, index: int) -> Boot:
        workers = self.settings.workers or self._cores
        return Boot(
            jobs=None,
            events=None,
            cells=self.cells,
            index=index,
            environ=dict(os.environ),
            nice=self.settings.nice,
            threads=self.settings.threads or max(1, self._cores // workers),
            fixed_threads=self.settings.threads,
            cores=self._cores,
            parent=os.getpid(),
        )

    def _later(self, function: Any, *args: Any) -> None:
        """Run a blocking step off the event loop and off the reactor.

        While this process has one thread, a worker can be forked right here,
        which is both safe and fast; the reactor starts only after that.
        """
        if self._reactor is None and function in (self._start_worker, self._start_template):
            if launch.CAN_SHARE and launch.fork_safe():
                function(*args)
                return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(4, thread_name_prefix="llm-async-pool-start")
        self._executor.submit(function, *args)

    def _start_worker(self) -> None:
        index = self._take_index()
        try:
            pipes = launch.Pipes()
            handle = launch.start_worker(self._boot(index), pipes)
        except BaseException as error:
            self._start_failed(index, error)
            return
        self._add_slot(handle, pipes.jobs, pipes.events, index)

    def _take_index(self) -> int:
        with self._lock:
            index = self._indexes.pop()
            Control(self.cells, index).clear()
            return index

    def _start_failed(self, index: int, error: BaseException) -> None:
        with self._lock:
            self._indexes.append(index)
            self._live -= 1
            waiting = [item for item in self._queue if item.requested]
            for item in waiting:
                self._queue.remove(item)
        for item in waiting:
            item.run.deliver(
                Failed(item.job.seq, WorkerCrashed(f"Could not start a worker process: {error}"))
            )

    def _add_slot(
        self,
        handle: launch.Handle,
        jobs: int,
        events: int,
        index: int,
        models: set[str] | None = None,
        template: Template | None = None,
    ) -> Slot:
        slot = Slot(self, handle, jobs, events, index)
        slot.models |= models or set()
        slot.template = template
        with self._lock:
            self._slots.add(slot)
            if self._reactor is not None:
                self._watch(slot)
            for item in self._queue:
                item.requested = False  # the new worker may go to another: ask again
            if self.closed:  # shut down while it started: it must not outlive us
                self._retire(slot)
                slot.handle.kill()
            else:
                self._idle.append(slot)
                self._dispatch()
        return slot

    def _watch(self, slot: Slot) -> None:
        self._reactor.watch(slot.handle.sentinel, lambda: self._on_exit(slot))

    # ------------------------------------------------------------ coming back
    def _on_events(self, slot: Slot, frames: Frames) -> None:
        """Frames from ``slot.inbox``: on the consumer's loop, or on the reactor."""
        if slot.gone:
            return
        for seq, kind, payload, size in frames:
            self._on_frame(slot, seq, kind, payload, size)
        if slot.inbox.reader.eof:  # it closed its event pipe: it cannot serve; make sure it ends
            slot.inbox.release()
            slot.handle.kill()

    def _on_frame(self, slot: Slot, seq: int, kind: int, payload: bytes, size: int) -> None:
        item = slot.item
        if item is None or item.job.seq != seq:
            return  # from a job this slot no longer runs
        try:
            event = pickle.loads(payload)
        except Exception as error:
            event = Failed(
                seq,
                RemoteError(
                    type(error).__name__,
                    f"A reply from model {item.job.model_id!r} could not be read in this "
                    f"process: {error}",
                ),
            )
            if kind not in TERMINAL_KINDS:  # stop the job; its consumer gets the error now
                item.run.deliver(event)
                self._cancel(item)
                return
        if kind == NEED_MODEL:
            self._later(self._send_model, slot, item)
            return
        if not slot.heard:
            self._heard(slot, item)
        if kind == CHUNKS:
            event.nbytes = size
            item.run.deliver(event)
            return
        if type(event) is Failed:
            event.error = rebuild_error(event.error, event.traceback)
        self._finish(slot, event)

    def _heard(self, slot: Slot, item: Pending) -> None:
        """The job's first event: its model is loaded on this worker."""
        with self._lock:
            slot.heard = True
            key = item.job.model_key
            slot.models.add(key)
            state = self._models.get(key)
            if state is not None and state.loading is slot:
                state.loading, state.warm = None, True
                self._dispatch()
        if slot.cold and self.settings.workers is None and slot.template is None:
            self._later(self._measure, slot)

    def _measure(self, slot: Slot) -> None:
        cost = memory(slot.pid).private or 0
        with self._lock:
            self._worker_cost = max(self._worker_cost, cost)

    def _send_model(self, slot: Slot, item: Pending) -> None:
        """The worker's registry lacks this model: send it once, pickled."""
        job = item.job
        try:
            job.model_blob = cloudpickle.dumps(item.model)
            payload = dumps_job(job)
        except Exception as error:
            reason = PromptNotSendable(
                f"Model {job.model_id!r} is not installed as a plugin where the "
                "worker can load it, and it cannot be pickled either "
                f"({type(error).__name__}: {error}). Install its plugin, or set "
                "LLM_ASYNC_POOL=thread."
            )
            self._finish(slot, Failed(job.seq, reason))
            slot.control.cancel(job.seq)
            return
        finally:
            job.model_blob = None
        slot.send(job.seq, payload)

    def _finish(self, slot: Slot, event: Done | Failed) -> None:
        with self._lock:
            item = slot.item
            if item is None:
                return
            slot.item = item.slot = None
            slot.inbox.release()
            slot.kill_at = None
            slot.served += 1
            self.cells[BUSY] -= 1
            if not slot.retired:
                limit = self.settings.max_tasks
                if limit is not None and slot.served >= limit:
                    self._retire(slot)  # recycled: a fresh worker replaces it on demand
                else:
                    slot.idle_since = time.monotonic()
                    self._idle.append(slot)
            self._dispatch()
        item.run.deliver(event)

    def _on_exit(self, slot: Slot) -> None:
        """Its sentinel fired: the process is gone. Read what it sent, then settle."""
        if slot.gone:
            return
        slot.inbox.read()  # what it wrote before it died, in order, on this thread
        slot.gone = True
        slot.inbox.close()
        code = slot.handle.exit_code()
        self._reactor.unwatch(slot.handle.sentinel, slot.handle.close)
        try:
            os.close(slot.jobs)
        except OSError:
            pass
        with self._lock:
            self._slots.discard(slot)
            if slot in self._idle:
                self._idle.remove(slot)
            if not slot.retired:
                self._live -= 1
            self._indexes.append(slot.index)
            item = slot.item
            slot.item = None
            if item is not None:
                self.cells[BUSY] -= 1
                state = self._models.get(item.job.model_key)
                if state is not None and state.loading is slot:
                    state.loading = None
            if slot.template is not None:
                slot.template.children -= 1
                slot.template.idle_since = time.monotonic()
            self._dispatch()
        if item is not None:
            item.run.deliver(Failed(item.job.seq, self._crash_error(slot, item, code)))

    def _crash_error(self, slot: Slot, item: Pending, code: int | None) -> Exception:
        if self.closed:
            return PoolClosed(f"The pool shut down while model {item.job.model_id!r} ran")
        how = launch.describe_exit(code)
        if slot.template is not None and slot.template not in self._templates:
            how += " (its template process had ended)"
        hint = STARTUP_HINT if code and code > 0 and not slot.control.started() else ""
        return WorkerCrashed(
            f"The worker process (pid {slot.pid}) running model {item.job.model_id!r} "
            f"{how}. The pool has replaced it; other prompts are not affected.{hint}"
        )

    # ------------------------------------------------------------ stopping early
    def _cancel(self, item: Pending) -> None:
        with self._lock:
            if item in self._queue:
                self._queue.remove(item)
                return
            slot = item.slot
            if slot is None or slot.item is not item:
                return  # already finished
            slot.control.cancel(item.job.seq)
            slot.inbox.to_reactor()  # its consumer reads no more
            loading = slot.cold and not slot.heard
            slot.kill_at = time.monotonic() + stop_allowance(item.settings, loading, slot.started)
        if self._reactor is not None:
            self._reactor.wake()

    def _take(self, item: Pending, count: int, nbytes: int) -> None:
        slot = item.slot
        if slot is not None and slot.item is item:
            slot.control.take(count, nbytes)

    def _retire(self, slot: Slot) -> None:
        """Let the worker finish and exit (EOF on its job pipe); lock held."""
        if slot.retired:
            return
        slot.retired = True
        self._live -= 1
        if slot in self._idle:
            self._idle.remove(slot)
        with slot.send_lock:
            try:
                os.close(slot.jobs)
            except OSError:
                pass
            slot.jobs = -1
        slot.kill_at = time.monotonic() + RETIRE_GRACE

    def _tick(self) -> float | None:
        """The reactor's timers: kills, retirement, load limits. Returns the next wait."""
        now = time.monotonic()
        due: list[float] = []
        expired: list[Template] = []
        with self._lock:
            for slot in self._slots:
                if slot.item is not None and slot.inbox.watch_loop():
                    due.append(now + LOOP_CHECK)
                if slot.kill_at is not None:
                    if slot.kill_at <= now:  # retired with the kill: a Done already on
                        self._retire(slot)  # its way must not free it for another prompt
                        slot.kill_at = None
                        slot.handle.kill()
                    else:
                        due.append(slot.kill_at)
            for slot in list(self._idle):
                retire_at = slot.idle_since + self.settings.idle_timeout
                if retire_at <= now:
                    self._retire(slot)
                else:
                    due.append(retire_at)
            for template in list(self._templates):
                if template.deadline is not None:
                    if template.deadline <= now:
                        template.deadline = None
                        expired.append(template)
                    else:
                        due.append(template.deadline)
                elif template.ready and not (
                    template.children or template.waiting or template.closing
                ):
                    retire_at = template.idle_since + self.settings.idle_timeout
                    if retire_at <= now:  # it exits when its socket closes
                        self._close_template(template)
                    else:
                        due.append(retire_at)
            if self._slots or self._templates or self._queue or self._live:
                self._empty_since = now
            elif now - self._empty_since >= self.settings.idle_timeout:
                self._reactor.stop()  # nothing left: the reactor thread ends
                self._reactor = None
                return None
        for template in expired:
            self._load_expired(template)
        return max(0.0, min(due) - now) if due else None

    # ------------------------------------------------------------ inspecting
    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            slots = sorted(self._slots, key=lambda s: s.pid)
            templates = sorted((t for t in self._templates if t.ready), key=lambda t: t.handle.pid)
            infos = [
                WorkerInfo(
                    s.pid,
                    Memory(),
                    sorted(_model_id(k) for k in s.models),
                    s.served,
                    s.item is not None,
                )
                for s in slots
            ]
            infos += [
                WorkerInfo(t.handle.pid, Memory(), [_model_id(t.key)], role="template")
                for t in templates
            ]
        for info in infos:
            info.memory = memory(info.pid)
        return infos

    def sharing(self) -> dict[str, str]:
        """Per model: is it shared from a template, and if not, why."""
        with self._lock:
            report = {}
            for key, state in self._models.items():
                if state.template is not None and state.template.ready:
                    report[_model_id(key)] = f"shared from template pid {state.template.handle.pid}"
                elif state.shareable is False:
                    report[_model_id(key)] = f"not shared: {state.reason}"
            return report

    def idle(self) -> bool:
        with self._lock:
            return not (self._slots or self._templates or self._queue or self._live)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            queued, self._queue = list(self._queue), deque()
            slots = list(self._slots)
            templates = list(self._templates)
            running = [slot for slot in slots if slot.item is not None]
            for slot in running:
                slot.control.cancel(slot.item.job.seq)
            for slot in slots:
                self._retire(slot)
        for item in queued:
            item.run.deliver(Failed(item.job.seq, PoolClosed("The process pool has shut down")))
        for template in templates:
            if self._reactor is not None:
                self._close_template(template)
            else:
                template.link.close()
        grace = max((slot.item.settings.grace for slot in running if slot.item), default=0.0)
        bound = min(grace, SHUTDOWN_GRACE, max(0.0, timeout - 1.0))
        handles = [slot.handle for slot in slots] + [t.handle for t in templates]
        launch.wait_all(handles, time.monotonic() + (bound if running else 1.0))
        for handle in handles:
            handle.kill()
        launch.wait_all(handles, time.monotonic() + 1.0)
        for slot in running:
            item = slot.item
            if item is not None:
                item.run.deliver(
                    Failed(
                        item.job.seq,
                        PoolClosed(f"The pool shut down while model {item.job.model_id!r} ran"),
                    )
                )
        if self._reactor is not None:
            self._reactor.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _model_id(key: str) -> str:
    return key.split("\0", 1)[0]
