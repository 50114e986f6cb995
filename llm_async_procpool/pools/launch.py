"""How worker and template processes start, and how the parent watches and stops them.

A process is started by ``multiprocessing``: with the **fork** start method
while this process has a single thread (a fresh ``llm`` CLI run, a plain
script), which is safe then and costs a millisecond because the child already
has llm and its plugins; otherwise with **forkserver** (spawn where the
platform has no forkserver), because forking a process with threads can copy
a lock some thread holds. A worker for a model with a template is forked by
that template (``template.py``) instead.

Every process gets a ``Handle``: its pid, a sentinel fd that becomes readable
when it exits (checked by the pool's reactor, whatever the process did with
its pipes), its exit code, and a kill that cannot hit a recycled pid.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from .. import template, threads, worker
from ..template import STATUS

START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
PRELOAD = "llm_async_procpool._forkserver"
#: Templates need fork, SCM_RIGHTS on SOCK_SEQPACKET and pidfds: Linux.
CAN_SHARE = (
    sys.platform.startswith("linux")
    and hasattr(os, "pidfd_open")
    and hasattr(socket, "send_fds")
    and hasattr(signal, "pidfd_send_signal")
)


class Handle:
    """A worker or template process, as the parent sees it."""

    pid: int
    sentinel: int

    def exit_code(self, timeout: float = 1.0) -> int | None: ...
    def kill(self) -> None: ...
    def close(self) -> None: ...


class ProcessHandle(Handle):
    """A process started by ``multiprocessing`` (fork, forkserver or spawn)."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self.process = process
        self.pid = process.pid
        # A pidfd where there is one: it fires when the process ends, whatever
        # became of the pipe behind multiprocessing's own sentinel (a process
        # forked from the app closes the fds it inherited, that pipe among them).
        self.pidfd = os.pidfd_open(process.pid) if hasattr(os, "pidfd_open") else -1
        self.sentinel = self.pidfd if self.pidfd >= 0 else process.sentinel

    def exit_code(self, timeout: float = 1.0) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode

    def kill(self) -> None:
        try:
            self.process.kill()
        except (OSError, AttributeError, ValueError):
            pass

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        try:
            self.process.close()
        except ValueError:  # still running: it is being killed
            pass


class ForkedHandle(Handle):
    """A worker forked by a template: a pidfd, and the template's status pipe."""

    def __init__(self, pid: int, status: int):
        self.pid = pid
        self.sentinel = os.pidfd_open(pid)
        self._status = status
        self._code: int | None = None

    def exit_code(self, timeout: float = 1.0) -> int | None:
        if self._status >= 0:
            ready, _, _ = select.select([self._status], [], [], timeout)
            if ready:
                data = os.read(self._status, STATUS.size)
                if len(data) == STATUS.size:
                    (self._code,) = STATUS.unpack(data)
            os.close(self._status)
            self._status = -1
        return self._code

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.sentinel, signal.SIGKILL)
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self.sentinel, self._status):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.sentinel = self._status = -1


class Pipes:
    """A worker's job and event pipes: the parent's ends as fds, the child's as
    Connections, which ``multiprocessing`` knows how to hand to a child."""

    def __init__(self):
        child_jobs, self.jobs = os.pipe()
        self.events, child_events = os.pipe()
        self.child_jobs = Connection(child_jobs, writable=False)
        self.child_events = Connection(child_events, readable=False)

    def close_child_ends(self) -> None:
        self.child_jobs.close()
        self.child_events.close()


def fork_safe() -> bool:
    """Is it safe to fork this process right now? (See ``threads.forkable``.)"""
    return threading.active_count() == 1 and threads.forkable()


def context() -> multiprocessing.context.BaseContext:
    if CAN_SHARE and fork_safe():
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        _preload_forkserver(ctx)
    return ctx


def start(target: Any, boot: worker.Boot, extra: tuple, pipes: Pipes, name: str) -> ProcessHandle:
    """Start a process; the parent keeps only its own pipe ends."""
    ctx = context()
    boot.jobs, boot.events = pipes.child_jobs, pipes.child_events
    boot.inherited = ctx.get_start_method() == "fork"
    process = ctx.Process(target=target, args=(boot, *extra), name=name, daemon=False)
    try:
        with _single_threaded_forkserver(ctx):
            process.start()
    finally:
        pipes.close_child_ends()
    return ProcessHandle(process)


_START_LOCK = threading.Lock()


@contextlib.contextmanager
def _single_threaded_forkserver(ctx: multiprocessing.context.BaseContext):
    """Start the forkserver, if this start does, with native thread pools held
    to one thread: it imports the main module (and through it, say, numpy)
    before anything of ours runs, and every process is forked from it."""
    from multiprocessing import forkserver

    if ctx.get_start_method() != "forkserver" or forkserver._forkserver._forkserver_pid:
        yield
        return
    with _START_LOCK:
        saved = {name: os.environ.get(name) for name in (*threads.KNOBS, "OMP_WAIT_POLICY")}
        os.environ.update(threads.environment(dict(os.environ), 1))
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def start_worker(boot: worker.Boot, pipes: Pipes) -> ProcessHandle:
    return start(worker.main, boot, (), pipes, "llm-async-pool-worker")


class TemplateLink:
    """The parent's end of a template candidate; the pool's reactor reads its replies."""

    def __init__(self, boot: worker.Boot, pipes: Pipes):
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.handle = start(template.main, boot, (child_end,), pipes, "llm-async-pool-template")
        finally:
            child_end.close()
        self.sock = parent_end

    def close(self) -> None:
        """The template exits when its socket closes; its workers then follow."""
        try:
            self.sock.close()
        except OSError:
            pass


def _preload_forkserver(ctx: multiprocessing.context.BaseContext) -> None:
    """Add our warm-up module to the forkserver's preload list, keeping the
    user's entries. It takes effect only if the forkserver has not started yet."""
    from multiprocessing import forkserver

    current = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    if PRELOAD not in current:
        ctx.set_forkserver_preload([*current, PRELOAD])


def wait_all(handles: list[Handle], deadline: float) -> None:
    """Wait until every process has exited, or the deadline passes."""
    pending = [h.sentinel for h in handles if h.sentinel is not None and h.sentinel >= 0]
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            ready, _, _ = select.select(pending, [], [], left)
        except (OSError, ValueError):
            return
        pending = [fd for fd in pending if fd not in ready]


def abandon(handle: Handle, *closers: Any) -> None:
    """Kill a process started after shutdown, and let go of its ends."""
    handle.kill()
    for close in closers:
        try:
            close() if callable(close) else os.close(close)
        except OSError:
            pass
    handle.exit_code(1.0)


def describe_exit(code: int | None) -> str:
    """An exit code in words, for a crash report."""
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"
