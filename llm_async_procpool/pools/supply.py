"""Where the process pool's workers come from: its zygote, and the templates it forks.

    placement says        Supply does                       then tells placement
    StartWorker(key)      the zygote forks a worker         arrived()
    StartTemplate(key)    the zygote forks a candidate,     template_ready(), or
                          which loads the model             template_became_worker()
    ForkFrom(template)    the template forks a worker       arrived()

A start that fails (the zygote died, or could not fork) hands its prompt back
to fail; a fork asked of a template that died is placed again. Each worker
gets its own set of shared cells (an index), returned when it is gone.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .. import cells, threads
from ..cells import Control
from ..config import MAX_WORKERS, PoolSettings
from ..errors import PoolConfigError, PromptTimeout, WorkerCrashed
from ..messages import Boot, Context, Failed, Fork, Ready, Warmed
from ..wire import key_model_id
from . import launch
from .base import Memory, Task, WorkerInfo
from .placement import Placement
from .reactor import Reactor
from .slots import Slot
from .templates import State, Template


class Host(Protocol):
    """What Supply needs of the pool (all of it under the pool's lock)."""

    settings: PoolSettings
    closed: bool
    placement: Placement

    def reactor(self) -> Reactor | None: ...
    def act(self, actions: Iterable[Any]) -> None: ...
    def add_slot(
        self,
        handle: launch.Handle,
        pipes: launch.Pipes,
        index: int,
        models: set[str],
        template: Any,
    ) -> Slot: ...
    def current_context(self) -> Context: ...
    def later(self, function: Callable[..., Any], *args: Any) -> None: ...
    def fail(self, tasks: list[Task], error: Exception) -> None: ...
    def unwatch(self, fd: int, then: Callable[[], None] | None = None) -> None: ...


class Supply:
    def __init__(self, host: Host, lock: Any):
        self.host = host
        self.lock = lock
        self.cells_fd, self.cells = cells.shared(cells.size_for(MAX_WORKERS))
        self.cores = threads.usable_cores()
        self.templates: set[Template] = set()
        self.starting: dict[int, launch.Pipes] = {}  # forks asked for, by cell index
        self.context: Context | None = None  # the app's, when the zygote started
        self._indexes = list(range(MAX_WORKERS - 1, -1, -1))
        self._zygote: launch.Zygote | None = None
        self._ready = False

    # ------------------------------------------------------------ the zygote
    def zygote(self) -> launch.Zygote:
        """The pool's zygote, started if it is not running (lock held)."""
        if self._zygote is None or self._zygote.ended:
            settings = self.host.settings
            context = self.host.current_context()
            boot = Boot(
                environ=context.environ,
                nice=settings.nice,
                threads=settings.threads or max(1, self.cores // (settings.workers or self.cores)),
                fixed_threads=settings.threads,
                cores=self.cores,
                parent=os.getpid(),
                cells=cells.size_for(MAX_WORKERS),
                path=list(sys.path),
                cwd=context.cwd,
                preload=list(settings.preload),
            )
            self._zygote = launch.Zygote(boot, self.cells_fd, self.cells)
            self._ready = False
            self.context = context
            if self.host.reactor() is not None:
                self.host.reactor().watch(self._zygote.fd, self._on_zygote)
        return self._zygote

    def watch_all(self, reactor: Reactor) -> None:
        """A new reactor: watch what we have (lock held)."""
        if self._zygote is not None and not self._zygote.ended:
            reactor.watch(self._zygote.fd, self._on_zygote)
        for template in self.templates:
            if template.forker is not None:
                self._watch_template(reactor, template)

    def _on_zygote(self) -> None:
        zygote = self._zygote
        if zygote is None:
            return
        for message in zygote.receive():
            if type(message) is Ready:
                self._ready = True
                zygote.problem = message.problem
                if message.problem:  # prompts fail with it until the setting is fixed
                    self.host.unwatch(zygote.fd, zygote.close)
                    self._fail_waiting(PoolConfigError(message.problem))
                    return
        if zygote.ended:
            self.host.unwatch(zygote.fd, zygote.close)
            if not self._ready:
                problem = f"Could not start a worker process: {self.problem()}"
                self._fail_waiting(WorkerCrashed(problem))

    def _fail_waiting(self, error: Exception) -> None:
        with self.lock:
            tasks = self.host.placement.drain()
        self.host.fail(tasks, error)

    def problem(self) -> str:
        """Why the zygote gave no workers, in words."""
        zygote = self._zygote
        if zygote is None:
            return "the pool has no zygote process"
        if zygote.problem:
            return zygote.problem
        code = zygote.reap(0.5)
        how = f" ({launch.describe_exit(code)})" if code is not None else ""
        return f"the pool's zygote process (pid {zygote.pid}) ended{how}; see its output on stderr"

    def close_zygote(self) -> None:
        """Lock held; it exits, and every worker with it."""
        if self._zygote is not None:
            self.host.unwatch(self._zygote.fd, self._zygote.close)
            self._zygote = None

    # ------------------------------------------------------------ workers
    def take_index(self) -> int:
        index = self._indexes.pop()
        Control(self.cells, index).clear()
        return index

    def release(self, index: int) -> None:
        self._indexes.append(index)

    def start_worker(self, key: str) -> None:
        index, pipes = self.take_index(), launch.Pipes()
        self.starting[index] = pipes
        try:
            zygote = self.zygote()
        except Exception as error:
            self._forked(None, pipes, index, key, None, error)
            return
        zygote.fork(
            Fork("worker", index),
            pipes.child_ends(),
            lambda handle: self._forked(handle, pipes, index, key, None),
        )
        pipes.close_child_ends()

    def fork_from(self, template: Template, key: str) -> None:
        index, pipes = self.take_index(), launch.Pipes()
        self.starting[index] = pipes
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
        placement = self.host.placement
        with self.lock:
            self.starting.pop(index, None)
            if handle is None:
                pipes.close()
                self.release(index)
                if template is not None:  # its template died: the prompt waits on
                    self.host.act(placement.fork_lost(key, template))
                else:
                    failed, actions = placement.start_failed(key)
                    self.host.act(actions)
            else:
                models = {key} if template is not None else set()
                slot = self.host.add_slot(handle, pipes, index, models, template)
                if template is not None:
                    template.children += 1
                if self.host.closed:  # shut down while it started: it must not outlive us
                    slot.retire()
                    handle.kill()
                else:
                    self.host.act(placement.arrived(slot, key))
        if failed is not None:
            reason = error or self.problem()
            self.host.fail([failed], WorkerCrashed(f"Could not start a worker process: {reason}"))

    # ------------------------------------------------------------ templates
    def start_template(self, key: str, task: Task) -> None:
        index, pipes = self.take_index(), launch.Pipes()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        limit = task.settings.load_timeout
        deadline = None if limit is None else time.monotonic() + limit
        template = Template(key, task.model, pipes, index, deadline)
        self.templates.add(template)
        self.host.placement.template_started(key, template)
        try:
            zygote = self.zygote()
        except Exception:
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
        with self.lock:
            if handle is None or self.host.closed or template.state is State.GONE:
                if handle is not None:
                    handle.kill()
                    handle.close()
                sock.close()
                self._gone(template, "it could not be started")
                return
            template.started(launch.Forker(sock, handle.pid), handle)
            reactor = self.host.reactor()
            if reactor is not None:
                self._watch_template(reactor, template)
        template.send_warm_up()

    def _watch_template(self, reactor: Reactor, template: Template) -> None:
        reactor.watch(template.forker.fd, lambda: template.receive(self))
        reactor.watch(template.handle.sentinel, lambda: self._on_template_exit(template))

    def later(self, function: Callable[..., Any], *args: Any) -> None:
        self.host.later(function, *args)

    def template_ready(self, template: Template) -> None:
        """Its warm-up loaded the model, and forking it is safe."""
        with self.lock:
            template.pipes.close()  # it serves no jobs itself
            template.pipes = None
            self.release(template.index)
            self.host.act(self.host.placement.template_ready(template.key, template))

    def template_became_worker(self, template: Template, warmed: Warmed) -> None:
        """Forking it is not safe (or its warm-up failed): it serves as a worker."""
        with self.lock:
            self.templates.discard(template)
            template.close(self.host.reactor())
            self.host.unwatch(template.handle.sentinel)
            models = {template.key} if warmed.loaded else set()
            pipes, template.pipes = template.pipes, None
            slot = self.host.add_slot(template.handle, pipes, template.index, models, None)
            placement = self.host.placement
            self.host.act(placement.template_became_worker(slot, template.key, warmed.reason))

    def _on_template_exit(self, template: Template) -> None:
        code = template.handle.exit_code()
        self.host.unwatch(template.handle.sentinel, template.handle.close)
        template.close(self.host.reactor())
        while template.forker.pending:  # forks it will never answer
            template.forker.pending.popleft()(None)
        with self.lock:
            self._gone(template, f"its template process {launch.describe_exit(code)} while loading")

    def _gone(self, template: Template, reason: str) -> None:
        """Lock held."""
        self.templates.discard(template)
        if template.pipes is not None:  # it never became a template: its room is back
            template.pipes.close()
            template.pipes = None
            self.release(template.index)
        template.state = State.GONE
        self.host.act(self.host.placement.template_gone(template.key, template, reason))

    def tick(self, now: float, idle_timeout: float) -> list[float]:
        """Templates' timers: load allowances, idle templates (lock held)."""
        due = []
        for template in list(self.templates):
            if template.deadline is not None:
                if template.deadline <= now:
                    template.deadline = None
                    self._load_expired(template)
                else:
                    due.append(template.deadline)
            elif template.state is State.READY and not (
                template.children or template.forker.pending
            ):
                retire_at = template.idle_since + idle_timeout
                if retire_at <= now:  # it exits when its socket closes
                    template.close(self.host.reactor())
                else:
                    due.append(retire_at)
        return due

    def _load_expired(self, template: Template) -> None:
        """A template's warm-up took longer than the load allowance (lock held)."""
        if template.handle is not None:  # it exits, and settles as any template death
            template.handle.kill()
        elif template.state is not State.GONE:  # killed once it has started
            self._gone(template, "it did not start within the load allowance")
        placement = self.host.placement
        waiting = [task for task in placement.waiting() if task.key == template.key]
        for task in waiting:
            placement.cancel(task)
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

    def infos(self) -> list[WorkerInfo]:
        """Its ready templates and the zygote, for ``status`` (lock held)."""
        infos = [
            WorkerInfo(t.handle.pid, Memory(), [key_model_id(t.key)], role="template")
            for t in sorted(self.templates, key=lambda t: t.index)
            if t.state is State.READY
        ]
        zygote = self._zygote
        if zygote is not None and not zygote.ended:
            infos.append(WorkerInfo(zygote.pid, Memory(), role="zygote"))
        return infos

    def busy(self) -> bool:
        return bool(self.templates or self.starting)

    def close_templates(self) -> list[launch.Handle]:
        """Shutting down: each template exits, and its workers with it."""
        templates = list(self.templates)
        for template in templates:
            template.close(self.host.reactor())
        return [t.handle for t in templates if t.handle is not None]

    def forget(self) -> None:
        for template in self.templates:
            template.forget()
        for pipes in self.starting.values():
            pipes.close()
        if self._zygote is not None:
            self._zygote.forget()
        try:
            os.close(self.cells_fd)
        except OSError:
            pass
