"""A template process: it loads a model once, then forks workers that share it.

The first process started for a model that can be shared runs ``main``. It
loads the model the way its plugin does, lazily, by running one short warm-up
prompt ("hello", the model's default options) and stopping it at its first
chunk, with every native thread pool held to one thread. Then:

- if the process still has a single thread, it is a safe place to fork from:
  it becomes the model's template, and every worker for that model is forked
  from it, so the workers share its memory (the weights, the imported
  libraries) copy-on-write. ``gc.freeze()`` keeps Python's collector from
  touching, and so copying, those pages;
- otherwise (the model left threads running: a torch or OpenMP pool, a
  plugin's own thread), a fork would copy those threads' memory without the
  threads, so it is not safe: the process becomes an ordinary worker instead,
  with the model already loaded.

Linux only: it needs ``os.fork``, ``prctl`` and pidfds. The template reaps its
children and reports each exit status on a pipe the parent watches, as the
standard library's forkserver does.

The warm-up ``Job`` comes on the job pipe, as any job does. The rest goes on
a ``SOCK_SEQPACKET`` socket. Template to parent: ``NeedModel`` (send the model
pickled), then ``Warmed``. Parent to template: ``("fork", index)`` with the
new worker's two pipe ends as ancillary fds; the template answers
``("forked", pid)`` with the read end of the child's status pipe.
"""

from __future__ import annotations

import gc
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
from dataclasses import replace
from typing import Any

from . import channel, threads
from .messages import Control, NeedModel, Warmed, local_cells
from .runner import run_job
from .worker import Boot, Worker, close_inherited_fds, die_with_parent, prepare, watch_parent

STATUS = struct.Struct("<i")
MESSAGE_SIZE = 1 << 16


class _StopAtFirstChunk:
    """The warm-up's outbox: the first chunk means the model is loaded."""

    error = None

    def __init__(self, control: Control, seq: int):
        self.control, self.seq, self.count = control, seq, 0

    def put(self, chunk: Any) -> None:
        self.count += 1
        self.control.cancel(self.seq)

    def flush(self, last: bool = False) -> None:
        pass

    def sent(self) -> tuple[int, int]:
        return self.count, 0


class _One:
    """The warm-up's thread budget: one thread, for whatever the model loads."""

    def adjust(self) -> None:
        if any(name in sys.modules for name in threads.NATIVE):
            threads.limit(1)


def main(boot: Boot, sock: socket.socket) -> None:
    """Entry point of a template candidate started by multiprocessing."""
    prepare(boot, 1)
    openblas = threads.openblas_threads()
    threads.limit(1)  # pools of libraries the forkserver or the app had already loaded
    worker = Worker(boot)
    if boot.inherited:  # forked from the app: let go of its files and sockets
        close_inherited_fds({worker.jobs, worker.events, sock.fileno()})
    problem, threads_left = _warm_up(worker, sock)
    shareable = not problem and threads.forkable(openblas)
    if problem:
        reason = f"it did not load in the template ({problem})"
    elif not shareable:
        reason = (
            f"loading it left {threads_left - 1} more thread(s) running (a torch, OpenMP "
            "or plugin thread pool), and forking would copy their memory without them"
        )
    else:
        reason = ""
    _send(sock, Warmed(shareable, reason, threads_left))
    if not shareable:  # serve as an ordinary worker (its jobs get any load error)
        sock.close()
        _raise_threads(boot)
        watch_parent(boot.parent)
        worker.serve()
        return
    os.close(worker.jobs)
    os.close(worker.events)
    gc.freeze()  # the collector would touch, and so copy, every shared object
    _fork_loop(boot, sock, worker)


def _warm_up(worker: Worker, sock: socket.socket) -> tuple[str, int]:
    """Load the model as its plugin does; returns a problem (or "") and our
    thread count."""
    while True:
        frame = channel.read_frame(worker.jobs)
        if frame is None:
            os._exit(0)
        job = pickle.loads(frame[2])
        try:
            model = worker.models.get(job)
        except BaseException as error:
            return f"{type(error).__name__}: {error}", threads.threads_now()
        if model is not None:
            break
        _send(sock, NeedModel(job.seq))
    job.model_blob = None
    control = Control(local_cells())
    run_job(job, model, _StopAtFirstChunk(control, job.seq), control, _One())
    gc.collect()
    return "", threads.threads_now()


def _raise_threads(boot: Boot) -> None:
    """Give this process its real thread share (the warm-up held it to one)."""
    os.environ.update(threads.environment(boot.environ, boot.threads))


def _fork_loop(boot: Boot, sock: socket.socket, worker: Worker) -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    status: dict[int, int] = {}  # child pid -> write end of its status pipe
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                try:
                    message, fds, _flags, _address = socket.recv_fds(sock, MESSAGE_SIZE, 2)
                except OSError:
                    message, fds = b"", []
                if not message:
                    os._exit(0)  # the parent is done with us; children follow
                _, index = pickle.loads(message)
                jobs, events = fds
                read_end, write_end = os.pipe()
                pid = os.fork()
                if pid == 0:
                    try:
                        for fd in (wake_r, wake_w, read_end, write_end, *status.values()):
                            os.close(fd)
                        sock.close()
                        selector.close()
                        _child(boot, worker, jobs, events, index)
                    finally:
                        os._exit(0)
                os.close(jobs)
                os.close(events)
                status[pid] = write_end
                socket.send_fds(sock, [pickle.dumps(("forked", pid))], [read_end])
                os.close(read_end)
            else:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                _reap(status)


def _child(boot: Boot, template: Worker, jobs: int, events: int, index: int) -> None:
    """A forked worker: the template's model is already in its cache."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_parent()
    _raise_threads(boot)
    watch_parent(boot.parent)
    Worker(replace(boot, jobs=jobs, events=events, index=index), template.models).serve()


def _reap(status: dict[int, int]) -> None:
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, STATUS.pack(os.waitstatus_to_exitcode(code)))
            except OSError:
                pass
            os.close(fd)


def _send(sock: socket.socket, value: Any) -> None:
    sock.send(pickle.dumps(value))
