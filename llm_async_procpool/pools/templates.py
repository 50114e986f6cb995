"""A model's template process, as the pool sees it.

    pool                                      template (``template.py``)
    zygote forks a candidate  ------------->  loads the model: warm-up "hello"
    Template.receive()       <--NeedModel---  (send the model pickled)
                             <--Warmed-----   safe to fork? loaded?
    Template.fork_worker()   --Fork + fds-->  forks a worker that shares its memory
                             <--Forked-----   (``launch.Forker`` hands it over)

A template reports to its ``Host`` (the process pool): ready, became a worker
(forking it is not safe, or its warm-up failed), or gone.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Any, Protocol

import llm

from .. import channel
from ..messages import Fork, NeedModel, Warmed
from ..wire import dumps_with_model, encode_job
from .launch import Forker, Handle, Pipes

WARM_UP_SEQ = 1  # any seq but 0, which fresh stop cells hold


class Host(Protocol):
    def template_ready(self, template: Template) -> None: ...
    def template_became_worker(self, template: Template, warmed: Warmed) -> None: ...
    def later(self, function: Callable[..., Any], *args: Any) -> None: ...


class State(enum.Enum):
    STARTING = "starting"  # asked of the zygote
    LOADING = "loading"  # a candidate, running its warm-up
    READY = "ready"  # forks workers
    CLOSING = "closing"  # its socket is closing: it exits, and its workers with it
    GONE = "gone"


class Template:
    def __init__(
        self, key: str, model: llm.Model, pipes: Pipes, index: int, deadline: float | None
    ):
        self.key = key
        self.model = model
        self.pipes: Pipes | None = pipes  # the candidate's own job and event pipes
        self.index = index
        self.deadline = deadline  # when its load allowance runs out
        self.state = State.STARTING
        self.forker: Forker | None = None
        self.handle: Handle | None = None
        self.children = 0
        self.idle_since = time.monotonic()

    def started(self, forker: Forker, handle: Handle) -> None:
        self.forker, self.handle, self.state = forker, handle, State.LOADING

    def send_warm_up(self, with_model: bool = False) -> None:
        """The warm-up job; a model that cannot be sent ends the candidate (its
        exit then settles the books, and workers load for themselves)."""
        try:
            model = self.model
            prompt = llm.Prompt("hello", model, options=model.Options())
            job = encode_job(model, prompt, True, None, None)
            job.seq = WARM_UP_SEQ
            payload = dumps_with_model(job, model) if with_model else channel.dumps(job)
            channel.write_frame(self.pipes.jobs, job.seq, channel.JOB, payload)
        except Exception:
            if self.handle is not None:
                self.handle.kill()

    def receive(self, host: Host) -> None:
        """Its socket is readable: forks go to their callers, the rest to ``host``."""
        for message in self.forker.receive():
            if type(message) is NeedModel:
                host.later(self.send_warm_up, True)
            elif type(message) is Warmed:
                self.deadline = None
                if message.shareable:
                    self.state = State.READY
                    host.template_ready(self)
                else:
                    host.template_became_worker(self, message)

    def fork_worker(self, index: int, pipes: Pipes, then: Callable[[Handle | None], None]) -> None:
        self.forker.fork(Fork("worker", index), pipes.child_ends(), then)
        pipes.close_child_ends()

    def close(self, reactor: Any) -> None:
        """Close our end of its socket, once the reactor has let go of it (once:
        its fd number may be reused after). It exits, and its workers with it."""
        if self.state in (State.CLOSING, State.GONE) or self.forker is None:
            return
        self.state = State.CLOSING
        if reactor is None:
            self.forker.close()
        else:
            reactor.unwatch(self.forker.fd, self.forker.close)

    def forget(self) -> None:
        for part in (self.forker, self.handle, self.pipes):
            if part is not None:
                part.forget() if hasattr(part, "forget") else part.close()
