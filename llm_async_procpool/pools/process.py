"""Where a prompt crosses into a worker process, and how its events come back.

    app                                            worker process
    submit() -> Placement -> _begin()
      --job pipe: [Context] Job frame------------>  Worker.serve() -> run_job() -> execute()
    Run <- Inbox, on the consumer's loop <-------  Outbox: Chunks..., Done | Failed
    Run.close() --cells: stop seq--------------->  stops before the next chunk

``placement`` decides where each prompt goes; this module carries the
decisions out and reports back what happened. Workers and templates are
forked by the pool's zygote (``launch``); a worker's state is a ``Slot``
(``slots``), a model's template a ``Template`` (``templates``). Events are
read on the consumer's loop (``inbox``). The pool's one thread, the
``reactor``, sees processes exit, reads the zygote's and templates' answers,
and runs the timers: time limits, kills after a grace period, idle
retirement.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cloudpickle

from .. import cells, channel, threads
from ..cells import BUSY, Control
from ..config import MAX_WORKERS, api_backed
from ..errors import PoolClosed, PoolConfigError, PromptNotSendable, PromptTimeout, WorkerCrashed
from ..messages import (
    KINDS,
    TERMINAL_KINDS,
    Boot,
    Chunks,
    Context,
    Done,
    Failed,
    Fork,
    NeedModel,
    Ready,
    Warmed,
)
from ..wire import decode_event, dumps_job
from . import launch
from .base import Memory, Pool, Task, WorkerInfo, available_memory, memory, total_memory
from .inbox import Frames, Inbox
from .placement import Begin, ForkFrom, Placement, Retire, StartTemplate, StartWorker
from .reactor import Reactor
from .slots import Slot, State
from .templates import State as TemplateState
from .templates import Template

#: Jobs larger than this are written from a helper thread, not under the lock.
INLINE_JOB = 60_000
#: Seconds a running prompt gets to stop when the pool shuts down (at most its grace).
SHUTDOWN_GRACE = 1.0
#: Seconds between two looks at the timers while the pool has processes, at most.
TICK = 1.0
#: A new worker starts by default only while this share of memory stays available.
KEEP_FREE = 0.5
CHUNKS = KINDS[Chunks]
NEED_MODEL = KINDS[NeedModel]


class ProcessPool(Pool):
    kind = "process"

    def __init__(self, settings):
        super().__init__(settings)
        self._cells_fd, self.cells = cells.shared(cells.size_for(MAX_WORKERS))
        self._placement = Placement(self._room)
        self._slots: set[Slot] = set()
        self._templates: set[Template] = set()
        self._starting: dict[int, launch.Pipes] = {}  # forks asked for, by cell index
        self._lingering: set[Inbox] = set()  # pipes of gone workers a stopped loop holds
        self._indexes = list(range(MAX_WORKERS - 1, -1, -1))
        self._cores = threads.usable_cores()
        self._worker_cost = 0  # the most private memory a loaded worker has needed
        self._zygote: launch.Zygote | None = None
        self._zygote_ready = False
        self._zygote_context: Context | None = None
        self._reactor: Reactor | None = None
        self._helper: ThreadPoolExecutor | None = None
        self._environ: dict | None = None
        self._context: Context | None = None
        self._empty_since = time.monotonic()
        self._next_tick = 0.0  # when the reactor will look at the timers next

    # ------------------------------------------------------------ submitting
    def enqueue(self, task: Task) -> None:
        task.context = self._current_context()
        can_share = self.settings.share and launch.CAN_SHARE and not api_backed(task.model)
        self._act(self._placement.submit(task, can_share))

    def submitted(self) -> None:
        """Start the reactor after any fork from this thread: no threads before it."""
        with self._lock:
            if self._reactor is None and not self.closed:
                self._reactor = Reactor(f"llm-async-pool-{id(self):x}", self._tick)
                if self._zygote is not None:
                    self._watch_forker(self._zygote, self._on_zygote)
                for slot in self._slots:
                    self._watch_exit(slot)
                    if slot.inbox.stranded:
                        slot.inbox.to_reactor()

    def _current_context(self) -> Context:
        """The app's directory and environment now (a new object only when they changed)."""
        cwd = os.getcwd()
        raw = getattr(os.environ, "_data", os.environ)
        context = self._context
        if context is None or context.cwd != cwd or raw != self._environ:
            self._environ = dict(raw)
            context = self._context = Context(cwd, dict(os.environ))
        return context

    def _do(self, action: Any) -> None:
        """Carry out one decision of placement (lock held)."""
        if type(action) is Begin:
            self._begin(action.task, action.slot, action.cold)
        elif type(action) is StartWorker:
            self._start_worker(action.key)
        elif type(action) is StartTemplate:
            self._start_template(action.key, action.task)
        elif type(action) is ForkFrom:
            self._fork_from(action.template, action.key)
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
        """Make sure the reactor checks again by ``deadline``; it already does
        at least every ``TICK`` seconds while the pool has processes."""
        if deadline is not None and deadline < self._next_tick and self._reactor is not None:
            self._reactor.wake()

    def _room(self, live: int) -> bool:
        """May another worker start? By default, one per usable core, while at
        least half of the machine's memory stays available after it."""
        if self.settings.workers is not None:
            return live < self.settings.workers
        if live >= self._cores:
            return False
        if live == 0 or not self._worker_cost:
            return True
        free, total = available_memory(), total_memory()
        return free is None or not total or free - self._worker_cost >= KEEP_FREE * total

    def later(self, function: Callable[..., Any], *args: Any) -> None:
        """Run a blocking step off the event loop and off the reactor."""
        if self._helper is None:
            self._helper = ThreadPoolExecutor(2, thread_name_prefix="llm-async-pool-helper")
        self._helper.submit(function, *args)

    # ------------------------------------------------------------ starting processes
    def _zygote_now(self) -> launch.Zygote:
        """The pool's zygote, started if it is not running (lock held)."""
        if self._zygote is None or self._zygote.ended:
            context = self._current_context()
            boot = Boot(
                environ=context.environ,
                nice=self.settings.nice,
                threads=self.settings.threads or max(1, self._cores // self._size()),
                fixed_threads=self.settings.threads,
                cores=self._cores,
                parent=os.getpid(),
                cells=cells.size_for(MAX_WORKERS),
                path=list(sys.path),
                cwd=context.cwd,
                preload=list(self.settings.preload),
            )
            self._zygote = launch.Zygote(boot, self._cells_fd, self.cells)
            self._zygote_ready = False
            self._zygote_context = context
            if self._reactor is not None:
                self._watch_forker(self._zygote, self._on_zygote)
        return self._zygote

    def _size(self) -> int:
        return self.settings.workers or self._cores

    def _take_index(self) -> int:
        index = self._indexes.pop()
        Control(self.cells, index).clear()
        return index

    def _start_worker(self, key: str) -> None:
        index, pipes = self._take_index(), launch.Pipes()
        self._starting[index] = pipes
        try:
            zygote = self._zygote_now()
        except Exception as error:
            self._forked(None, pipes, index, key, None, error)
            return
        zygote.fork(
            Fork("worker", index),
            pipes.child_ends(),
            lambda handle: self._forked(handle, pipes, index, key, None),
        )
        pipes.close_child_ends()

    def _fork_from(self, template: Template, key: str) -> None:
        index, pipes = self._take_index(), launch.Pipes()
        self._starting[index] = pipes
        template.fork_worker(
            index, pipes, lambda handle: self._forked(handle, pipes, index, key, template)
        )

    def _forked(
        self,
        handle: launch.Handle | None,
        pipes: launch.Pipes,
        index: int,
        key: str,
        template: Template | None,
        error: Exception | None = None,
    ) -> None:
        """A worker asked for has come (or will not)."""
        failed = None
        with self._lock:
            self._starting.pop(index, None)
            if handle is None:
                pipes.close()
                self._indexes.append(index)
                if template is not None:  # its template died: the prompt waits on
                    actions = self._placement.fork_lost(key, template)
                else:
                    failed, actions = self._placement.start_failed(key)
                self._act(actions)
            else:
                models = {key} if template is not None else set()
                slot = self._add_slot(handle, pipes, index, models, template)
                if template is not None:
                    template.children += 1
                if self.closed:  # shut down while it started: it must not outlive us
                    slot.retire()
                    handle.kill()
                else:
                    self._act(self._placement.arrived(slot, key))
        if failed is not None:
            reason = error or self._zygote_problem()
            failed.run.deliver(
                Failed(failed.seq, WorkerCrashed(f"Could not start a worker process: {reason}"))
            )

    def _add_slot(
        self,
        handle: launch.Handle,
        pipes: launch.Pipes,
        index: int,
        models: set[str],
        template: Template | None,
    ) -> Slot:
        holder: list[Slot] = []
        inbox = Inbox(
            pipes.events, lambda frames: self._on_events(holder[0], frames), self._get_reactor
        )
        slot = Slot(handle, pipes, index, Control(self.cells, index), inbox, models, template)
        slot.context = self._zygote_context
        holder.append(slot)
        self._slots.add(slot)
        if self._reactor is not None:
            self._watch_exit(slot)
        return slot

    def _get_reactor(self) -> Reactor | None:
        return self._reactor

    def _zygote_problem(self) -> str:
        zygote = self._zygote
        if zygote is None:
            return "the pool has no zygote process"
        if zygote.problem:
            return zygote.problem
        code = zygote.reap(0.5)
        how = f" ({launch.describe_exit(code)})" if code is not None else ""
        return f"the pool's zygote process (pid {zygote.pid}) ended{how}; see its output on stderr"

    # ------------------------------------------------------------ templates
    def _start_template(self, key: str, task: Task) -> None:
        index, pipes = self._take_index(), launch.Pipes()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        limit = task.settings.load_timeout
        deadline = None if limit is None else time.monotonic() + limit
        template = Template(key, task.model, pipes, index, deadline)
        self._wake_by(deadline)
        self._templates.add(template)
        self._placement.template_started(key, template)
        try:
            zygote = self._zygote_now()
        except Exception:
            ours.close()
            theirs.close()
            self._template_started(template, ours, None)
            return
        zygote.fork(
            Fork("template", index),
            [*pipes.child_ends(), theirs.fileno()],
            lambda handle: self._template_started(template, ours, handle),
        )
        theirs.close()
        pipes.close_child_ends()

    def _template_started(
        self, template: Template, sock: socket.socket, handle: launch.Handle | None
    ) -> None:
        with self._lock:
            if handle is None or self.closed or template.state is TemplateState.GONE:
                if handle is not None:
                    handle.kill()
                    handle.close()
                sock.close()
                self._template_gone(template, "it could not be started")
                return
            template.started(launch.Forker(sock, handle.pid), handle)
            self._watch_template(template)
        template.send_warm_up()

    def _watch_template(self, template: Template) -> None:
        self._watch_forker(template.forker, lambda: template.receive(self))
        self._reactor.watch(template.handle.sentinel, lambda: self._on_template_exit(template))

    def template_ready(self, template: Template) -> None:
        """Its warm-up loaded the model, and forking it is safe."""
        with self._lock:
            template.pipes.close()  # it serves no jobs itself
            template.pipes = None
            self._indexes.append(template.index)
            self._act(self._placement.template_ready(template.key, template))

    def template_became_worker(self, template: Template, warmed: Warmed) -> None:
        """Forking it is not safe (or its warm-up failed): it serves as a worker."""
        with self._lock:
            self._templates.discard(template)
            template.close(self._reactor)
            self._unwatch(template.handle.sentinel)
            models = {template.key} if warmed.loaded else set()
            pipes, template.pipes = template.pipes, None
            slot = self._add_slot(template.handle, pipes, template.index, models, None)
            self._act(self._placement.template_became_worker(slot, template.key, warmed.reason))

    def _on_template_exit(self, template: Template) -> None:
        code = template.handle.exit_code()
        self._unwatch(template.handle.sentinel, template.handle.close)
        template.close(self._reactor)
        while template.forker.pending:  # forks it will never answer
            template.forker.pending.popleft()(None)
        with self._lock:
            reason = f"its template process {launch.describe_exit(code)} while loading it"
            self._template_gone(template, reason)

    def _template_gone(self, template: Template, reason: str) -> None:
        """Lock held."""
        self._templates.discard(template)
        if template.pipes is not None:  # it never became a template: its room is back
            template.pipes.close()
            template.pipes = None
            self._indexes.append(template.index)
        template.state = TemplateState.GONE
        self._act(self._placement.template_gone(template.key, template, reason))

    def _unwatch(self, fd: int, then: Callable[[], None] | None = None) -> None:
        """Stop watching ``fd``, then call ``then``; a stopped reactor watches nothing."""
        reactor = self._reactor
        if reactor is not None:
            reactor.unwatch(fd, then)
        elif then is not None:
            then()

    def _watch_forker(self, forker: launch.Forker, on_readable: Callable[[], None]) -> None:
        self._reactor.watch(forker.fd, on_readable)

    def _on_zygote(self) -> None:
        zygote = self._zygote
        if zygote is None:
            return
        for message in zygote.receive():
            if type(message) is Ready:
                self._zygote_ready = True
                zygote.problem = message.problem
                if message.problem:  # prompts fail with it until the setting is fixed
                    self._unwatch(zygote.fd, zygote.close)
                    self._fail_waiting(PoolConfigError(message.problem))
                    return
        if zygote.ended:
            self._unwatch(zygote.fd, zygote.close)
            if not self._zygote_ready:
                self._fail_waiting(
                    WorkerCrashed(f"Could not start a worker process: {self._zygote_problem()}")
                )

    def _fail_waiting(self, error: Exception) -> None:
        with self._lock:
            tasks = self._placement.drain()
        for task in tasks:
            task.run.deliver(Failed(task.seq, error))

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
                self._act(self._placement.loaded(slot, task.key))
        if task.cold and self.settings.workers is None and slot.template is None:
            self.later(self._measure, slot)

    def _measure(self, slot: Slot) -> None:
        cost = memory(slot.pid).private or 0
        with self._lock:
            self._worker_cost = max(self._worker_cost, cost)

    def _send_model(self, slot: Slot, task: Task) -> None:
        """The worker's registry lacks this model: send it once, pickled."""
        job = task.job
        try:
            job.model_blob = cloudpickle.dumps(task.model)
            payload = dumps_job(job)
        except Exception as error:
            reason = PromptNotSendable(
                f"Model {job.model_id!r} is not installed as a plugin where the "
                "worker can load it, and it cannot be pickled either "
                f"({type(error).__name__}: {error}). Install its plugin, or set "
                "LLM_ASYNC_POOL=thread."
            )
            slot.control.cancel(job.seq)
            self._finish(slot, Failed(job.seq, reason))
            return
        finally:
            job.model_blob = None
        slot.send([(job.seq, channel.JOB, payload, 0)])

    def _finish(self, slot: Slot, event: Done | Failed) -> None:
        with self._lock:
            task = slot.task
            if task is None:
                return
            slot.end()
            slot.inbox.release()
            self.cells[BUSY] -= 1
            if slot.state is State.IDLE:
                limit = self.settings.max_tasks
                if limit is not None and slot.count >= limit:
                    slot.retire()  # recycled: a fresh worker replaces it on demand
                    self._act(self._placement.retire(slot))
                else:
                    self._act(self._placement.free(slot))
        if type(event) is Done and event.cancelled and task.stopping:
            return  # stopped by the pool (timeout, stopped loop): the consumer was told
        task.run.deliver(event)

    def _watch_exit(self, slot: Slot) -> None:
        self._reactor.watch(slot.handle.sentinel, lambda: self._on_exit(slot))

    def _on_exit(self, slot: Slot) -> None:
        """Its sentinel fired: the process is gone. Read what it sent, then settle."""
        if slot.state is State.GONE:
            return
        slot.inbox.read()  # what it wrote before it died, in order, on this thread
        code = slot.handle.exit_code()
        template = slot.template
        template_code = template.handle.exit_code(0.2) if template and code is None else None
        with self._lock:
            retired = slot.state is State.RETIRED
            task, slot.task = slot.task, None
            slot.state = State.GONE
            self._slots.discard(slot)
            self._indexes.append(slot.index)
            if task is not None:
                self.cells[BUSY] -= 1
            if template is not None:
                template.children -= 1
                template.idle_since = time.monotonic()
            self._act(self._placement.gone(slot, retired))
        self._unwatch(slot.handle.sentinel, lambda: self._let_go(slot))
        if task is not None:
            error = self._crash_error(slot, task, code, template_code)
            task.run.deliver(Failed(task.seq, error))

    def _let_go(self, slot: Slot) -> None:
        slot.gone()
        if slot.inbox.fd >= 0:  # a stopped loop still holds its pipe
            with self._lock:
                self._lingering.add(slot.inbox)

    def _crash_error(
        self, slot: Slot, task: Task, code: int | None, template_code: int | None
    ) -> Exception:
        model_id = task.job.model_id
        if self.closed:
            return PoolClosed(f"The pool shut down while model {model_id!r} ran")
        if code is None and slot.template is not None:
            how = launch.describe_exit(template_code).replace("ended when the process", "the")
            return WorkerCrashed(
                f"The worker process (pid {slot.pid}) running model {model_id!r} ended "
                f"because the template process it was forked from (pid "
                f"{slot.template.handle.pid}) {how}. Every prompt running on a worker "
                "forked from that template ended with it; the pool loads the model again "
                "for the next prompts."
            )
        how = launch.describe_exit(code)
        if code is None:
            how = "ended because the pool's zygote process ended"
        return WorkerCrashed(
            f"The worker process (pid {slot.pid}) running model {model_id!r} {how}. "
            "The pool has replaced it; other prompts are not affected."
        )

    # ------------------------------------------------------------ stopping early
    def unqueue(self, task: Task) -> bool:
        return self._placement.cancel(task)

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
        expired: list[Template] = []
        with self._lock:
            for slot in list(self._slots):
                if slot.task is not None and slot.inbox.watch_loop():
                    due.append(now + 1.0)
                if slot.kill_at is not None:
                    if slot.kill_at <= now:  # retired with the kill: a Done already on
                        if slot.state is not State.RETIRED:  # its way must not free it
                            slot.retire()
                            self._act(self._placement.retire(slot))
                        slot.kill_at = None
                        slot.handle.kill()
                    else:
                        due.append(slot.kill_at)
                elif slot.state is State.IDLE:
                    retire_at = slot.idle_since + self.settings.idle_timeout
                    if retire_at <= now:
                        slot.retire()
                        self._act(self._placement.retire(slot))
                    else:
                        due.append(retire_at)
            for template in list(self._templates):
                if template.deadline is not None:
                    if template.deadline <= now:
                        template.deadline = None
                        expired.append(template)
                    else:
                        due.append(template.deadline)
                elif template.state is TemplateState.READY and not (
                    template.children or template.forker.pending
                ):
                    retire_at = template.idle_since + self.settings.idle_timeout
                    if retire_at <= now:  # it exits when its socket closes
                        template.close(self._reactor)
                    else:
                        due.append(retire_at)
            for inbox in list(self._lingering):
                if not inbox.prune():
                    self._lingering.discard(inbox)
            if self._lingering:
                due.append(now + 1.0)
            if self._slots or self._templates or self._starting or self._placement.live:
                self._empty_since = now
                due.append(now + TICK)
            elif now - self._empty_since >= self.settings.idle_timeout:
                self._stop_reactor()  # nothing left: the zygote and the reactor end
                return None
            else:
                due.append(self._empty_since + self.settings.idle_timeout)
        for template in expired:
            self._load_expired(template)
        self._next_tick = min(due, default=now + TICK)
        return max(0.0, self._next_tick - now)

    def _stop_reactor(self) -> None:
        """Lock held."""
        if self._zygote is not None:
            self._unwatch(self._zygote.fd, self._zygote.close)
            self._zygote = None
        self._reactor.stop()
        self._reactor = None

    def _load_expired(self, template: Template) -> None:
        """A template's warm-up took longer than the load allowance."""
        with self._lock:
            if template.handle is not None:  # it exits, and settles as any template death
                template.handle.kill()
            elif template.state is not TemplateState.GONE:  # killed once it has started
                self._template_gone(template, "it did not start within the load allowance")
            waiting = [t for t in self._placement.waiting() if t.key == template.key]
            for task in waiting:
                self._placement.cancel(task)
        for task in waiting:
            seconds = task.settings.load_timeout
            task.run.deliver(
                Failed(
                    task.seq,
                    PromptTimeout(
                        f"Model {task.job.model_id!r} did not finish loading within "
                        f"LLM_ASYNC_POOL_LOAD_TIMEOUT={seconds:g} seconds"
                    ),
                )
            )

    # ------------------------------------------------------------ inspecting
    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            infos = [
                WorkerInfo(
                    s.pid,
                    Memory(),
                    sorted(_model_id(k) for k in s.models),
                    s.count,
                    s.task is not None,
                )
                for s in sorted(self._slots, key=lambda s: s.pid)
            ]
            infos += [
                WorkerInfo(t.handle.pid, Memory(), [_model_id(t.key)], role="template")
                for t in sorted(self._templates, key=lambda t: t.index)
                if t.state is TemplateState.READY
            ]
            if self._zygote is not None and not self._zygote.ended:
                infos.append(WorkerInfo(self._zygote.pid, Memory(), role="zygote"))
        for info in infos:
            info.memory = memory(info.pid)
        return infos

    def sharing(self) -> dict[str, str]:
        """Per model: is it shared from a template, and if not, why."""
        with self._lock:
            report = {}
            for key, state in self._placement.models.items():
                template = state.template
                if template is not None and template.state is TemplateState.READY:
                    report[_model_id(key)] = f"shared from template pid {template.handle.pid}"
                elif state.shareable is False:
                    report[_model_id(key)] = f"not shared: {state.reason}"
            return report

    def idle(self) -> bool:
        with self._lock:
            return not (self._slots or self._templates or self._starting or self._placement.live)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            queued = self._placement.drain()
            slots = list(self._slots)
            templates = list(self._templates)
            running = [slot for slot in slots if slot.task is not None]
            for slot in running:
                slot.control.cancel(slot.task.seq)
            for slot in slots:
                slot.retire()
        for task in queued:
            task.run.deliver(Failed(task.seq, PoolClosed("The process pool has shut down")))
        for template in templates:
            template.close(self._reactor)
        grace = max((s.task.settings.grace for s in running if s.task), default=0.0)
        bound = min(grace, SHUTDOWN_GRACE, max(0.0, timeout - 1.0))
        handles = [slot.handle for slot in slots]
        handles += [t.handle for t in templates if t.handle is not None]
        launch.wait_all(handles, time.monotonic() + (bound if running else 1.0))
        for handle in handles:
            handle.kill()
        launch.wait_all(handles, time.monotonic() + 1.0)
        for slot in running:
            task = slot.task
            if task is not None:
                task.run.deliver(
                    Failed(
                        task.seq,
                        PoolClosed(f"The pool shut down while model {task.job.model_id!r} ran"),
                    )
                )
        with self._lock:
            if self._reactor is not None:
                self._stop_reactor()
            elif self._zygote is not None:
                self._zygote.close()
                self._zygote = None
        if self._helper is not None:
            self._helper.shutdown(wait=False, cancel_futures=True)

    def forget(self) -> None:
        self.closed = True
        for slot in self._slots:
            slot.forget()
        for template in self._templates:
            template.forget()
        for pipes in self._starting.values():
            pipes.close()
        for inbox in self._lingering:
            inbox.forget()
        for part in (self._zygote, self._reactor):
            if part is not None:
                part.forget()
        try:
            os.close(self._cells_fd)
        except OSError:
            pass


def _model_id(key: str) -> str:
    return key.split("\0", 1)[0]
