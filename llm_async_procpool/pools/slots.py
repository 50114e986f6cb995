"""A worker process as the pool sees it: its pipes, its cells, its prompt, its state.

    IDLE --begin--> BUSY --end--> IDLE
                     |  stop: its cells say "stop"; killed if it overruns
                     v
                  STOPPING --end--> IDLE
    IDLE, BUSY, STOPPING --retire--> RETIRED  (job pipe closed: it exits when
                                               its prompt ends; killed if not)
    any --its sentinel fires--> GONE

Every change of state happens under the pool's lock.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Hashable
from typing import Any

from .. import channel
from ..cells import Control
from ..errors import WorkerCrashed
from ..messages import Context
from .base import Task
from .inbox import Inbox
from .launch import Handle, Pipes, describe_exit

#: Seconds a retired worker gets to exit on its own before it is killed.
RETIRE_GRACE = 5.0


class State(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"
    RETIRED = "retired"
    GONE = "gone"


class Slot:
    def __init__(
        self,
        handle: Handle,
        pipes: Pipes,
        index: int,
        control: Control,
        inbox: Inbox,
        models: set[str],
        template: Any = None,
        context: Context | None = None,
    ):
        self.handle = handle
        self.pid = handle.pid
        self.jobs = pipes.jobs
        self.index = index
        self.control = control
        self.inbox = inbox
        self.models = models
        self.template = template  # the template it was forked from, if any
        self.context = context  # the app's directory and environment it has
        self.state = State.IDLE
        self.task: Task | None = None
        self.served: Hashable | None = None  # the last conversation it served
        self.count = 0  # prompts it has finished
        self.idle_since: float | None = time.monotonic()
        self.kill_at: float | None = None
        self.loaded_private: int | None = None  # private memory once its model loaded
        self._send_lock = threading.Lock()

    def begin(self, task: Task, cold: bool) -> None:
        self.state, self.task, self.idle_since = State.BUSY, task, None
        task.begin(self, cold)
        self.control.reset()

    def send(self, frames: list[tuple[int, int, bytes, int]]) -> None:
        """Write frames to its job pipe; a dead worker is noticed by its sentinel."""
        with self._send_lock:
            if self.jobs < 0:
                return
            try:
                channel.write_frames(self.jobs, frames)
            except OSError:
                pass

    def stop(self, allowance: float) -> None:
        """Tell its prompt to stop before the next chunk; kill it if it overruns."""
        if self.task is not None:
            self.control.cancel(self.task.seq)
            self.kill_at = time.monotonic() + allowance
            if self.state is State.BUSY:
                self.state = State.STOPPING

    def end(self) -> Task | None:
        """Its prompt ended; returns it. A retired worker stays retired."""
        task, self.task = self.task, None
        if task is not None:
            self.count += 1
            conversation = task.job.conversation
            self.served = None if conversation is None else conversation.id
        if self.state is not State.RETIRED:  # (a retired one keeps its kill deadline)
            self.state, self.idle_since, self.kill_at = State.IDLE, time.monotonic(), None
        return task

    def retire(self) -> None:
        """No more prompts: closing its job pipe makes it exit once its prompt
        ends; it is killed if it has not within ``RETIRE_GRACE``."""
        if self.state in (State.RETIRED, State.GONE):
            return
        self.state = State.RETIRED
        with self._send_lock:
            fd, self.jobs = self.jobs, -1
        if fd >= 0:
            os.close(fd)
        deadline = time.monotonic() + RETIRE_GRACE
        self.kill_at = deadline if self.kill_at is None else min(self.kill_at, deadline)

    def timer(self, now: float, idle_timeout: float) -> float | None:
        """Kill it if it overran its stop or retirement, retire it if it was idle
        too long (a kill retires it too, so a reply already on its way cannot
        free it for another prompt); when to look again."""
        if self.kill_at is not None:
            if self.kill_at > now:
                return self.kill_at
            self.retire()
            self.kill_at = None
            self.handle.kill()
        elif self.state is State.IDLE:
            if self.idle_since + idle_timeout > now:
                return self.idle_since + idle_timeout
            self.retire()
        return None

    def gone(self) -> None:
        """Its exit has been seen: let go of everything of it but the inbox,
        which closes once no reader holds it."""
        self.state = State.GONE
        with self._send_lock:
            fd, self.jobs = self.jobs, -1
        if fd >= 0:
            os.close(fd)
        self.inbox.close()
        self.handle.close()

    def death(self, task: Task, code: int | None) -> WorkerCrashed:
        """What its prompt's consumer is told when it died running it."""
        model_id = task.job.model_id
        template = self.template
        if code is None and template is not None:
            how = describe_exit(template.handle.exit_code(0.2))
            return WorkerCrashed(
                f"The worker process (pid {self.pid}) running model {model_id!r} ended "
                f"because the template process it was forked from (pid {template.handle.pid}) "
                f"{how.replace('ended when the process', 'the process')}. Every prompt "
                "running on a worker forked from that template ended with it; the pool "
                "loads the model again for the next prompts."
            )
        how = describe_exit(code) if code is not None else "ended with the pool's zygote process"
        return WorkerCrashed(
            f"The worker process (pid {self.pid}) running model {model_id!r} {how}. "
            "The pool has replaced it; other prompts are not affected."
        )

    def forget(self) -> None:
        """In a forked copy of the app: close our copies of its fds, nothing else."""
        for fd in (self.jobs, self.inbox.fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.handle.forget()
