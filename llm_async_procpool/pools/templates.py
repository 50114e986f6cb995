"""The pool's side of template processes: a model loaded once, workers forked from it.

    pool                                         template process (``template.py``)
    _start_template()  --warm-up job: "hello"-->  loads the model, runs one prompt
    _on_template()    <--Warmed(shareable)-----   safe to fork? (thread pools parked)
    _fork()            --("fork", index) + fds->  forks a worker that shares its memory
    _on_template()    <--("forked", pid) + fd--   the worker serves on those pipes

A candidate whose model is not safe to fork becomes an ordinary worker with
the model loaded. A template that dies or overruns the load allowance hands
its waiting prompts back to the queue (or fails them with ``PromptTimeout``),
and workers then load the model for themselves.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import cloudpickle
import llm

from .. import channel
from ..errors import PromptTimeout
from ..messages import Failed, NeedModel, Warmed
from ..wire import encode_job
from . import launch

if TYPE_CHECKING:
    from .process import Pending


class Template:
    """A template candidate while it warms up, then a template that forks workers."""

    def __init__(
        self, key: str, model: llm.Model, link: launch.TemplateLink, pipes: launch.Pipes, index: int
    ):
        self.key = key
        self.model = model
        self.link = link
        self.sock = link.sock.fileno()  # kept: a closed socket forgets its fd
        self.handle = link.handle
        self.pipes = pipes
        self.index = index
        self.ready = False
        self.closing = False
        self.deadline: float | None = None
        self.waiting: deque[tuple[launch.Pipes, int]] = deque()  # fork requests
        self.children = 0
        self.idle_since = time.monotonic()


class TemplateHost:
    """Template handling for ``ProcessPool``, which holds the state it uses:
    ``_lock``, ``_models``, ``_templates``, ``_reactor``, ``_queue`` and the
    worker slots' bookkeeping."""

    _lock: Any
    _models: dict
    _templates: set[Template]
    _reactor: Any
    _queue: deque
    _indexes: list[int]
    _live: int
    closed: bool

    def _start_template(self, item: Pending) -> None:
        key = item.job.model_key
        index = self._take_index()
        try:
            pipes = launch.Pipes()
            link = launch.TemplateLink(self._boot(index), pipes)
        except BaseException as error:
            with self._lock:
                self._models[key].loading = None
            self._start_failed(index, error)
            return
        template = Template(key, item.model, link, pipes, index)
        load_timeout = item.settings.load_timeout
        template.deadline = None if load_timeout is None else time.monotonic() + load_timeout
        with self._lock:
            if not self.closed:
                self._templates.add(template)
                self._models[key].loading = template
                if self._reactor is not None:
                    self._watch_template(template)
        if self.closed:  # shut down while it started: it must not outlive us
            launch.abandon(link.handle, link.close, pipes.jobs, pipes.events)
            return
        self._send_warm_up(template, with_model=False)

    def _send_warm_up(self, template: Template, with_model: bool) -> None:
        """Send the warm-up job; a model that cannot be sent ends the candidate
        (its sentinel then settles the books, and workers load for themselves)."""
        try:
            model = template.model
            prompt = llm.Prompt("hello", model, options=model.Options())
            job = encode_job(model, prompt, True, None, None)
            job.seq = 1  # any seq but 0, which fresh stop cells hold
            if with_model:
                job.model_blob = cloudpickle.dumps(model)
            channel.write_frame(template.pipes.jobs, job.seq, channel.JOB, channel.dumps(job))
        except Exception:
            template.handle.kill()

    def _fork(self, template: Template) -> None:
        """Ask a template for one more worker (lock held); it answers on its socket."""
        index = self._take_index()
        pipes = launch.Pipes()
        template.waiting.append((pipes, index))
        try:
            socket.send_fds(
                template.link.sock,
                [pickle.dumps(("fork", index))],
                [pipes.child_jobs.fileno(), pipes.child_events.fileno()],
            )
        except OSError:
            pass  # the template is dying: its sentinel will settle the books
        finally:
            pipes.close_child_ends()

    def _watch_template(self, template: Template) -> None:
        self._reactor.watch(template.sock, lambda: self._on_template(template))
        self._reactor.watch(template.handle.sentinel, lambda: self._on_template_exit(template))

    def _on_template(self, template: Template) -> None:
        """A reply from a template: NeedModel, Warmed, or a forked worker."""
        try:
            data, fds, _flags, _address = socket.recv_fds(template.link.sock, 1 << 16, 1)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:  # it closed its end: it died, or it serves as a worker now
            self._close_template(template)
            return
        reply = pickle.loads(data)
        if isinstance(reply, NeedModel):
            self._later(self._send_warm_up, template, True)
        elif isinstance(reply, Warmed):
            if reply.shareable:
                self._template_ready(template)
            else:
                self._candidate_becomes_worker(template, reply.reason)
        else:  # ("forked", pid), with the read end of its status pipe
            _, pid = reply
            with self._lock:
                pipes, index = template.waiting.popleft()
                template.children += 1
            handle = launch.ForkedHandle(pid, fds[0])
            self._add_slot(handle, pipes.jobs, pipes.events, index, {template.key}, template)

    def _template_ready(self, template: Template) -> None:
        with self._lock:
            template.ready = True
            template.deadline = None
            state = self._models[template.key]
            state.template, state.loading, state.warm, state.shareable = template, None, True, True
            os.close(template.pipes.jobs)  # the template serves no jobs itself
            self._reactor.unwatch(template.pipes.events, lambda: os.close(template.pipes.events))
            self._indexes.append(template.index)
            self._fork(template)  # with the room the candidate held
            self._dispatch()

    def _candidate_becomes_worker(self, template: Template, reason: str) -> None:
        with self._lock:
            self._templates.discard(template)
            self._reactor.unwatch(template.handle.sentinel)
            state = self._models[template.key]
            state.loading, state.warm, state.shareable, state.reason = None, True, False, reason
        self._close_template(template)
        pipes = template.pipes
        self._add_slot(template.handle, pipes.jobs, pipes.events, template.index, {template.key})

    def _close_template(self, template: Template) -> None:
        """Close our end of its socket once unwatched (a template then exits).
        Only once: its fd number may be reused right after."""
        if not template.closing:
            template.closing = True
            self._reactor.unwatch(template.sock, template.link.close)

    def _on_template_exit(self, template: Template) -> None:
        self._close_template(template)
        self._reactor.unwatch(template.handle.sentinel, template.handle.close)
        with self._lock:
            self._templates.discard(template)
            state = self._models.get(template.key)
            if state is not None and state.template is template:
                state.template, state.warm = None, False
            if not template.ready:  # died while loading: workers will load for themselves
                if state is not None:
                    state.loading, state.shareable = None, False
                    state.reason = "the template process died while loading the model"
                self._live -= 1
                self._indexes.append(template.index)
                os.close(template.pipes.jobs)
                self._reactor.unwatch(
                    template.pipes.events, lambda: os.close(template.pipes.events)
                )
            for pipes, index in template.waiting:  # forks it will never answer
                self._live -= 1
                self._indexes.append(index)
                os.close(pipes.jobs)
                os.close(pipes.events)
            template.waiting.clear()
            self._dispatch()

    def _load_expired(self, template: Template) -> None:
        """A template's warm-up took longer than the load allowance."""
        template.handle.kill()
        with self._lock:
            waiting = [item for item in self._queue if item.job.model_key == template.key]
            for item in waiting:
                self._queue.remove(item)
        for item in waiting:
            seconds = item.settings.load_timeout
            item.run.deliver(
                Failed(
                    item.job.seq,
                    PromptTimeout(
                        f"Model {item.job.model_id!r} did not finish loading within "
                        f"LLM_ASYNC_POOL_LOAD_TIMEOUT={seconds:g} seconds"
                    ),
                )
            )
