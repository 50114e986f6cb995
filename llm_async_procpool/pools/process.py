"""Where a prompt crosses into a worker process, and how its events come back.

    app                                            worker process
    submit() -> Placement -> _begin()
      --job pipe: [Context] Job frame------------>  Worker.serve() -> run_job() -> execute()
    Run <- Inbox, on the consumer's loop <-------  Outbox: Chunks..., Done | Failed
    Run.close() --cells: stop seq--------------->  stops before the next chunk

``placement`` decides where each prompt goes; this module carries the
decisions out and settles what comes back. Workers come from ``supply``; a
worker's state is a ``Slot``; its events are read on the consumer's loop
(``inbox``). The pool's thread, the ``reactor``, sees processes exit, reads the
zygote's and templates' answers, and runs the timers.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import channel
from ..cells import BUSY, Control
from ..config import api_backed
from ..errors import PoolClosed, PromptNotSendable
from ..faults import decode_event
from ..messages import KINDS, TERMINAL_KINDS, Chunks, Done, Failed, NeedModel
from ..wire import AppContext, dumps_with_model, key_model_id
from . import launch
from .base import Memory, Pool, Task, WorkerInfo, memory
from .inbox import Frames, Inbox
from .placement import Begin, ForkFrom, Placement, Retire, StartTemplate, StartWorker
from .reactor import Reactor
from .sizing import Sizing
from .slots import Slot, State
from .supply import Supply

#: Jobs larger than this are written from a helper thread, not under the lock.
INLINE_JOB = 60_000
#: Seconds a running prompt gets to stop when the pool shuts down (at most its grace).
SHUTDOWN_GRACE = 1.0
#: Seconds between two looks at the timers while the pool has processes, at most.
TICK = 1.0
NEED_MODEL = KINDS[NeedModel]


class ProcessPool(Pool):
    kind = "process"

    def __init__(self, settings):
        super().__init__(settings)
        self.supply = Supply(self, self._lock)
        self.sizing = Sizing(settings, self.supply.cores)
        self.placement = Placement(self.sizing.room)
        self.cells = self.supply.cells
        self._slots: set[Slot] = set()
        self._lingering: set[Inbox] = set()  # pipes of gone workers a stopped loop holds
        self._reactor: Reactor | None = None
        self._helper: ThreadPoolExecutor | None = None
        self.current_context = AppContext()  # the app's directory and environment now
        self._empty_since = time.monotonic()
        self._next_tick = 0.0  # when the reactor will look at the timers next

    # ------------------------------------------------------------ submitting
    def enqueue(self, task: Task) -> None:
        task.context = self.current_context()
        can_share = self.settings.share and launch.CAN_SHARE and not api_backed(task.model)
        self.act(self.placement.submit(task, can_share))

    def prepare(self) -> None:
        """The zygote: started fresh it imports llm and every plugin (seconds)."""
        with self._lock:
            if not self.closed:
                self.supply.zygote()
        self.submitted()

    def submitted(self) -> None:
        """Start the reactor after any fork from this thread: no threads before it."""
        with self._lock:
            if self._reactor is None and not self.closed:
                self._reactor = Reactor(f"llm-async-pool-{id(self):x}", self._tick)
                self.supply.watch_all(self._reactor)
                for slot in self._slots:
                    self._watch_exit(slot)
                    if slot.inbox.stranded:
                        slot.inbox.to_reactor()

    def _do(self, action: Any) -> None:
        if type(action) is Begin:
            self._begin(action.task, action.slot, action.cold)
        elif type(action) is StartWorker:
            self.supply.start_worker(action.key)
        elif type(action) is StartTemplate:
            self.supply.start_template(action.key, action.task)
            allowance = action.task.settings.load_timeout  # its load is bounded by it
            self._wake_by(None if allowance is None else time.monotonic() + allowance)
        elif type(action) is ForkFrom:
            self.supply.fork_from(action.template, action.key)
        elif type(action) is Retire:
            action.slot.retire()

    def _begin(self, task: Task, slot: Slot, cold: bool) -> None:
        slot.begin(task, cold)
        self._wake_by(task.deadline)
        self.cells[BUSY] += 1
        slot.inbox.to_loop(task.run.loop)
        frames = []
        if slot.context is not task.context:
            frames.append((0, channel.CONTEXT, pickle.dumps(task.context), 0))
            slot.context = task.context
        frames.append((task.seq, channel.JOB, task.payload, 0))
        if sum(len(frame[2]) for frame in frames) <= INLINE_JOB:  # an idle worker's pipe is empty
            slot.send(frames)
        else:
            self.later(slot.send, frames)

    def _wake_by(self, deadline: float | None) -> None:
        """Make sure the reactor looks again by ``deadline``; it already does
        at least every ``TICK`` seconds while the pool has processes."""
        if deadline is not None and deadline < self._next_tick and self._reactor is not None:
            self._reactor.wake()

    def later(self, function: Callable[..., Any], *args: Any) -> None:
        """Run a blocking step off the event loop and off the reactor."""
        if self._helper is None:
            self._helper = ThreadPoolExecutor(2, thread_name_prefix="llm-async-pool-helper")
        self._helper.submit(function, *args)

    def reactor(self) -> Reactor | None:
        return self._reactor

    def unwatch(self, fd: int, then: Callable[[], None] | None = None) -> None:
        """Stop watching ``fd``, then call ``then``; a stopped reactor watches nothing."""
        reactor = self._reactor
        if reactor is not None:
            reactor.unwatch(fd, then)
        elif then is not None:
            then()

    # ------------------------------------------------------------ workers arriving
    def add_slot(
        self,
        handle: launch.Handle,
        pipes: launch.Pipes,
        index: int,
        models: set[str],
        template: Any,
    ) -> Slot:
        holder: list[Slot] = []
        inbox = Inbox(pipes.events, lambda frames: self._on_events(holder[0], frames), self.reactor)
        slot = Slot(handle, pipes, index, Control(self.cells, index), inbox, models, template)
        slot.context = self.supply.context
        holder.append(slot)
        self._slots.add(slot)
        if self._reactor is not None:
            self._watch_exit(slot)
        return slot

    def _watch_exit(self, slot: Slot) -> None:
        self._reactor.watch(slot.handle.sentinel, lambda: self._on_exit(slot))

    # ------------------------------------------------------------ coming back
    def _on_events(self, slot: Slot, frames: Frames) -> None:
        """Frames from ``slot.inbox``: on the consumer's loop, or on the reactor."""
        if slot.state is State.GONE:
            return
        for seq, kind, payload, size in frames:
            self._on_frame(slot, seq, kind, payload, size)
        if slot.inbox.reader.eof:  # it closed its event pipe: it cannot serve; make sure it ends
            slot.inbox.release()
            slot.handle.kill()

    def _on_frame(self, slot: Slot, seq: int, kind: int, payload: bytes, size: int) -> None:
        task = slot.task
        if task is None or task.seq != seq:
            return  # from a job this slot no longer runs
        event = decode_event(kind, payload, task.job.model_id)
        if kind == NEED_MODEL:
            self.later(self._send_model, slot, task)
            return
        if not task.heard:
            self._heard(slot, task)
        if type(event) is Chunks:
            event.nbytes = size
            task.run.deliver(event)
        elif kind in TERMINAL_KINDS:
            self._finish(slot, event)
        else:  # a chunk that could not be read: its consumer gets the error now
            task.run.deliver(event)
            self.cancel(task)

    def _heard(self, slot: Slot, task: Task) -> None:
        """The job's first event: its model is loaded on this worker."""
        with self._lock:
            if task.hear() and slot.task is task:
                self.act(self.placement.loaded(slot, task.key))
        if task.cold or slot.loaded_private is None:  # (a forked one came loaded)
            self.later(self.sizing.measure, slot)

    def _send_model(self, slot: Slot, task: Task) -> None:
        """The worker's registry lacks this model: send it once, pickled."""
        try:
            payload = dumps_with_model(task.job, task.model)
        except PromptNotSendable as error:
            slot.control.cancel(task.seq)
            self._finish(slot, Failed(task.seq, error))
            return
        slot.send([(task.seq, channel.JOB, payload, 0)])

    def _finish(self, slot: Slot, event: Done | Failed) -> None:
        with self._lock:
            task = slot.end()
            if task is None:
                return
            slot.inbox.release()
            self.cells[BUSY] -= 1
            if slot.state is State.IDLE:
                limit = self.settings.max_tasks
                if limit is not None and slot.count >= limit:
                    slot.retire()  # recycled: a fresh worker replaces it on demand
                    self.act(self.placement.retire(slot))
                else:
                    self.act(self.placement.free(slot))
        if self.settings.max_memory is not None:
            self.later(self._check_memory, slot)
        if type(event) is Done and event.cancelled and task.stopping:
            return  # stopped by the pool (timeout, stopped loop): the consumer was told
        task.run.deliver(event)

    def _check_memory(self, slot: Slot) -> None:
        """Off the loop: one grown too big is retired (after any prompt it took since)."""
        if self.sizing.too_big(slot):
            with self._lock:
                if slot.state in (State.IDLE, State.BUSY, State.STOPPING):
                    slot.retire()
                    self.act(self.placement.retire(slot))

    def _on_exit(self, slot: Slot) -> None:
        """Its sentinel fired: the process is gone. Read what it sent, then settle."""
        if slot.state is State.GONE:
            return
        slot.inbox.read()  # what it wrote before it died, in order, on this thread
        code = slot.handle.exit_code()
        with self._lock:
            retired = slot.state is State.RETIRED
            task, slot.task = slot.task, None
            slot.state = State.GONE
            self._slots.discard(slot)
            self.supply.release(slot.index)
            if task is not None:
                self.cells[BUSY] -= 1
            if slot.template is not None:
                slot.template.children -= 1
                slot.template.idle_since = time.monotonic()
            self.act(self.placement.gone(slot, retired))
        self.unwatch(slot.handle.sentinel, lambda: self._let_go(slot))
        if task is not None:
            if self.closed:
                error = PoolClosed(f"The pool shut down while model {task.job.model_id!r} ran")
            else:
                error = slot.death(task, code)
            task.run.deliver(Failed(task.seq, error))

    def _let_go(self, slot: Slot) -> None:
        slot.gone()
        if slot.inbox.fd >= 0:  # a stopped loop still holds its pipe
            with self._lock:
                self._lingering.add(slot.inbox)

    # ------------------------------------------------------------ stopping early
    def unqueue(self, task: Task) -> bool:
        return self.placement.cancel(task)

    def stop(self, task: Task) -> None:
        slot = task.slot
        if slot is None or slot.task is not task:
            return  # already finished
        slot.stop(task.stop_allowance())
        slot.inbox.to_reactor()  # its consumer reads no more
        if self._reactor is not None:
            self._reactor.wake()

    def take(self, task: Task, count: int, nbytes: int) -> None:
        slot = task.slot
        if slot is not None and slot.task is task:
            slot.control.take(count, nbytes)

    def running(self) -> Iterable[Task]:
        return [slot.task for slot in self._slots if slot.task is not None]

    def _tick(self) -> float | None:
        """The reactor's timers. Returns how long it may sleep."""
        now = time.monotonic()
        due: list[float] = []
        first = self.check_running(now)
        if first is not None:
            due.append(first)
        idle_timeout = self.settings.idle_timeout
        with self._lock:
            for slot in list(self._slots):
                if slot.task is not None:
                    slot.inbox.watch_loop()  # a loop that stopped: the reactor reads for it
                retiring = slot.state is not State.RETIRED
                when = slot.timer(now, idle_timeout)  # may kill or retire it
                if retiring and slot.state is State.RETIRED:
                    self.act(self.placement.retire(slot))
                if when is not None:
                    due.append(when)
            due += self.supply.tick(now, idle_timeout)
            for inbox in list(self._lingering):
                if not inbox.prune():
                    self._lingering.discard(inbox)
            if self._slots or self.supply.busy() or self.placement.live or self._lingering:
                self._empty_since = now
                due.append(now + TICK)
            elif now - self._empty_since >= idle_timeout:
                self._stop_reactor()  # nothing left: the zygote and the reactor end
                return None
            else:
                due.append(self._empty_since + idle_timeout)
        self._next_tick = min(due)
        return max(0.0, self._next_tick - now)

    def _stop_reactor(self) -> None:
        """Lock held."""
        self.supply.close_zygote()
        self._reactor.stop()
        self._reactor = None

    # ------------------------------------------------------------ inspecting
    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            slots = sorted(self._slots, key=lambda s: s.pid)
            models = {s.pid: sorted(map(key_model_id, s.models)) for s in slots}
            infos = [
                WorkerInfo(s.pid, Memory(), models[s.pid], s.count, bool(s.task)) for s in slots
            ]
            loaded = {s.pid: s.loaded_private for s in slots}
            infos += self.supply.infos()
        for info in infos:
            info.memory = memory(info.pid)
            if loaded.get(info.pid) is not None and info.memory.private is not None:
                info.growth = info.memory.private - loaded[info.pid]
        return infos

    def sharing(self) -> dict[str, str]:
        """Per model: is it shared from a template, and if not, why."""
        with self._lock:
            return self.placement.sharing(lambda template: template.handle.pid)

    def idle(self) -> bool:
        with self._lock:
            return not (self._slots or self.supply.busy() or self.placement.live)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            queued = self.placement.drain()
            slots = list(self._slots)
            running = [slot for slot in slots if slot.task is not None]
            for slot in running:
                slot.control.cancel(slot.task.seq)
            for slot in slots:
                slot.retire()
            handles = [slot.handle for slot in slots] + self.supply.close_templates()
        self.fail(queued, PoolClosed("The process pool has shut down"))
        grace = max((s.task.settings.grace for s in running if s.task), default=0.0)
        bound = min(grace, SHUTDOWN_GRACE, max(0.0, timeout - 1.0))
        launch.wait_all(handles, time.monotonic() + (bound if running else 1.0))
        for handle in handles:
            handle.kill()
        launch.wait_all(handles, time.monotonic() + 1.0)
        for slot in running:
            task = slot.task
            if task is not None:
                message = f"The pool shut down while model {task.job.model_id!r} ran"
                task.run.deliver(Failed(task.seq, PoolClosed(message)))
        with self._lock:
            if self._reactor is not None:
                self._stop_reactor()
            else:
                self.supply.close_zygote()
        if self._helper is not None:
            self._helper.shutdown(wait=False, cancel_futures=True)

    def forget(self) -> None:
        self.closed = True
        for slot in self._slots:
            slot.forget()
        for inbox in self._lingering:
            inbox.forget()
        self.supply.forget()
        if self._reactor is not None:
            self._reactor.forget()
