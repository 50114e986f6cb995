"""The zygote: a clean process with llm loaded, from which every worker is forked.

Each process pool has one. It forks the pool's workers, and the template
candidates that load a model once for workers to share, so a new or
replacement worker starts in a millisecond with llm and its plugins already
imported, and never from the app itself, whose threads, descriptors and
signal handlers are not ours to copy. It starts one of two ways:

- **forked from the app** while the app has a single thread (a fresh ``llm``
  CLI run, a plain script), or only OpenBLAS's threads besides (which stop
  for a fork) once its GNU OpenMP pool is ended (``threads.forkable``):
  instant, and it holds the app's own classes. It then lets go of the app's
  signals and descriptors (``child.detach_from_app``);
- **executed fresh** (``python -c``) when the app has threads: it imports
  llm, its plugins and ``LLM_ASYNC_POOL_PRELOAD``, but never the app's main
  module, so a script's top-level code never runs in it.

It holds every native thread pool to one thread, so it stays safe to fork
from; each child takes its own share. It exits when its socket closes: the
pool shut down, or the app is gone. Its children follow it.
"""

from __future__ import annotations

import gc
import importlib
import os
import pickle
import socket
import sys
import traceback
from typing import Any, NoReturn

from . import cells as shared_cells
from . import child, forks, llama, template, threads, worker
from .messages import Boot, Fork, Ready


def start_forked(boot: Boot, sock: socket.socket, cells: Any) -> NoReturn:
    """In the child of the app's ``os.fork()``."""
    try:
        child.detach_from_app(keep={sock.fileno()})
        serve(boot, sock, cells)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)


def main(fd: int) -> NoReturn:
    """Entry point of a zygote executed fresh: its socket is ``fd``."""
    sock = socket.socket(fileno=fd)
    data, fds = forks.receive(sock)
    if not data:
        os._exit(0)
    boot: Boot = pickle.loads(data)
    sys.path[:] = boot.path
    try:
        os.chdir(boot.cwd)
    except OSError:
        pass
    cells = shared_cells.attach(fds[0], boot.cells)
    os.close(fds[0])
    serve(boot, sock, cells)


def serve(boot: Boot, sock: socket.socket, cells: Any) -> NoReturn:
    child.quiet(boot.nice)
    os.environ.update(threads.environment(dict(os.environ), 1))
    parked = threads.openblas_threads()  # OpenBLAS keeps them, parked, after this:
    threads.limit(1)  # pools of libraries the app had already loaded
    llama.watch()  # before any model code, so the budget can resize them
    problem = _load(boot.preload)
    models = worker.Models(boot.inherited)
    models.registry = worker.registry()  # built once: every worker inherits it
    forks.send(sock, Ready(problem))
    gc.freeze()  # the collector would touch, and so copy, every shared object

    def make_child(request: Fork, fds: list[int]) -> None:
        if request.kind == "template":
            tsock = socket.socket(fileno=fds[2])
            template.main(boot, cells, request.index, fds[0], fds[1], tsock, models, parked)
        else:
            worker.main(boot, cells, request.index, fds[0], fds[1], models)

    forks.serve(sock, make_child)


def _load(preload: list[str]) -> str:
    """Import llm's plugins and the preload modules; a problem, or ""."""
    import llm

    try:
        llm.load_plugins()
    except Exception:  # a broken plugin fails its own prompts, not the zygote
        pass
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as error:
            return (
                f"LLM_ASYNC_POOL_PRELOAD names {name!r}, which failed to import in the "
                f"zygote: {type(error).__name__}: {error}"
            )
    return ""
