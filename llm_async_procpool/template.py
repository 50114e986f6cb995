"""A template process: it loads a model once, then forks workers that share it.

The zygote forks a template candidate for a model that can be shared. It
loads the model the way its plugin does, lazily, by running one short warm-up
prompt ("hello", the model's default options) and stopping it at its first
chunk (a llama.cpp model: as soon as its context is built, see ``llama``),
with every native thread pool held to one thread. Then:

- if forking it is safe, it becomes the model's template, and every worker
  for that model is forked from it (``forks.serve``), so the workers share its
  memory (the weights, the imported libraries) copy-on-write.
  ``gc.freeze()`` keeps Python's collector from touching, and so copying,
  those pages;
- otherwise it becomes an ordinary worker, with the model already loaded.
  Forking is not safe when loading the model left threads running (a plugin's
  own thread, a torch pool: a fork copies their memory without them; GNU
  OpenMP's pool is ended first, see ``threads.forkable``), or opened a
  socket, pipe or other channel (every forked worker would share it, and
  read the others' replies), or when the warm-up failed (there is nothing to
  share).

The warm-up ``Job`` comes on the job pipe, as any job does. On its socket the
template answers ``NeedModel`` (send the model pickled) or ``Warmed``, then
serves ``Fork`` requests.
"""

from __future__ import annotations

import gc
import os
import pickle
import socket
import sys
from typing import Any

from . import channel, child, forks, llama, threads, worker
from .cells import Control, local
from .messages import Boot, Done, NeedModel, Warmed
from .runner import run_job


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


def main(
    boot: Boot,
    cells: Any,
    index: int,
    jobs: int,
    events: int,
    sock: socket.socket,
    models: worker.Models,
    parked: int,
) -> None:
    """A template candidate, forked from the zygote. ``parked``: OpenBLAS
    threads the zygote had before it held OpenBLAS to one thread."""
    child.die_with_parent()
    openblas = max(parked, threads.openblas_threads())
    threads.limit(1)
    if not threads.user_pinned(boot.environ):  # a model built in the warm-up sizes by it
        threads.patch_cpu_count(lambda: 1)
    server = worker.Worker(boot, cells, index, jobs, events, models)
    before = _descriptors()
    problem, threads_left = _warm_up(server, sock)
    opened = _opened_since(before)
    shareable = not problem and not opened and threads.forkable(openblas)
    if problem:
        reason = f"its warm-up prompt failed in the template ({problem})"
    elif opened:
        reason = (
            f"loading it opened {', '.join(opened)}, which every worker forked from "
            "it would share (each could read the others' replies)"
        )
    elif not shareable:
        reason = (
            f"loading it left {threads_left - 1} more thread(s) running (a torch, OpenMP "
            "or plugin thread pool), and forking would copy their memory without them"
        )
    else:
        reason = ""
    forks.send(sock, Warmed(shareable, reason, threads_left, loaded=not problem))
    if not shareable:  # serve as an ordinary worker (its jobs get any load error)
        sock.close()
        server.setup(boot)
        server.serve()
        return
    os.close(server.jobs)
    os.close(server.events)
    gc.freeze()  # the collector would touch, and so copy, every shared object

    def fork_worker(request: Any, fds: list[int]) -> None:
        worker.main(boot, cells, request.index, fds[0], fds[1], server.models)

    forks.serve(sock, fork_worker)


def _warm_up(server: worker.Worker, sock: socket.socket) -> tuple[str, int]:
    """Load the model as its plugin does; returns a problem (or "") and our
    thread count."""
    while True:
        frame = channel.read_frame(server.jobs)
        if frame is None:
            os._exit(0)
        job = pickle.loads(frame[2])
        try:
            model = server.models.get(job)
        except BaseException as error:
            return f"{type(error).__name__}: {error}", threads.threads_now()
        if model is not None:
            break
        forks.send(sock, NeedModel(job.seq))
    job.model_blob = None
    control = Control(local())
    llama.warming_up(True)
    try:
        result = run_job(job, model, _StopAtFirstChunk(control, job.seq), control, _One())
    finally:
        llama.warming_up(False)
    gc.collect()
    problem = ""
    if type(result) is not Done and type(result.error) is not llama.Loaded:
        problem = f"{type(result.error).__name__}: {result.error}"
    return problem, threads.threads_now()


def _descriptors() -> dict[int, tuple[str, int]]:
    """The sockets, pipes and the like open now, with their inode numbers."""
    found = {}
    for fd in child.open_fds():
        kind = child.shared_kind(fd)
        if kind is not None:
            try:
                found[fd] = (kind, os.fstat(fd).st_ino)
            except OSError:
                pass
    return found


def _opened_since(before: dict[int, tuple[str, int]]) -> list[str]:
    return [
        f"{kind} (fd {fd})"
        for fd, (kind, inode) in _descriptors().items()
        if before.get(fd) != (kind, inode)
    ]
