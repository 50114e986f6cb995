"""What runs in a worker process: its set-up, its model cache and its serve loop.

A worker reads ``Job`` frames from its job pipe until the parent closes it,
runs each with ``runner.run_job`` and writes events to its event pipe through
an ``Outbox``. Nothing a model does (an unpicklable chunk, reply or
exception, an exception whose ``__str__`` raises) may stop the loop: every
job ends with exactly one terminal event.
"""

from __future__ import annotations

import ctypes
import gc
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import cloudpickle
import llm

from . import channel, threads
from .errors import ModelNotLoadable
from .messages import Control, Failed, Job, NeedModel
from .outbox import Frame, Outbox
from .runner import run_job

#: Seconds between checks that the parent is still alive (the fallback lifeline).
PARENT_CHECK = 0.5
PR_SET_PDEATHSIG = 1


@dataclass
class Boot:
    """What a worker (or template) process is started with."""

    jobs: Any  # the read end of the job pipe: a Connection, or an fd once detached
    events: Any  # the write end of the event pipe
    cells: Any  # the pool's shared control cells
    index: int  # this worker's cells
    environ: dict[str, str]
    nice: int
    threads: int  # the static thread share: cores // workers
    fixed_threads: int | None  # LLM_ASYNC_POOL_THREADS, or None for auto
    cores: int
    parent: int  # the app's pid
    inherited: bool = False  # forked from the app: it holds the app's own classes


class Models:
    """The models this process has built, by ``Job.model_key``: each at most once,
    from the plugin registry installed here, or sent pickled by the parent."""

    def __init__(self, inherited: bool = False):
        self.inherited = inherited  # forked from the app: it holds the app's own classes
        self.built: dict[str, llm.Model] = {}
        self.registry: dict[str, llm.Model] | None = None

    def get(self, job: Job) -> llm.Model | None:
        model = self.built.get(job.model_key)
        if model is None:
            if job.model_blob is not None:
                model = cloudpickle.loads(job.model_blob)
            else:
                if self.registry is None:
                    self.registry = registry()
                found = self.registry.get(job.model_id)
                if found is not None and self._same_class(found, job):
                    model = found
            if model is not None:
                for key in [k for k in self.built if k.split("\0")[0] == job.model_id]:
                    del self.built[key]  # an older version of this model id
                self.built[job.model_key] = model
        return model

    def _same_class(self, found: llm.Model, job: Job) -> bool:
        """Is our registry's model the parent's? A forked process holds the
        parent's very class objects; a fresh one imported the installed code."""
        if self.inherited:
            return id(type(found)) == job.class_id
        return class_name(found) == job.model_class


class Server:
    """Runs one job from its frame to its terminal event, whatever the model does."""

    def __init__(self, models: Models, out: Outbox, control: Control, budget: Any):
        self.models, self.out, self.control, self.budget = models, out, control, budget

    def handle(self, seq: int, payload: bytes, key: str | None = None) -> None:
        """Send exactly one of Done, Failed or NeedModel for this job; never raises.

        ``key``, when given, travels apart from the pickled job (see ``pools.ray``).
        """
        try:
            self._handle(seq, payload, key)
        except BaseException as error:  # a last guard: the caller goes on serving
            self.out.send(Failed(seq, error, None, traceback.format_exc()))

    def _handle(self, seq: int, payload: bytes, key: str | None) -> None:
        try:
            job = pickle.loads(payload)
            del payload
            if key is not None:
                job.key = key
            model = self.models.get(job)
        except BaseException as error:
            text = traceback.format_exc()
            self.out.send(Failed(seq, _not_loadable(error), None, text))
            return
        if model is None:
            self.out.send(NeedModel(seq))
            return
        self.out.start(seq, job.model_id)
        self.out.send(run_job(job, model, self.out, self.control, self.budget))


class Worker(Server):
    """A worker process: its pipes, its cells, and its serve loop."""

    def __init__(self, boot: Boot, models: Models | None = None):
        self.jobs = _fd(boot.jobs)
        self.events = _fd(boot.events)
        control = Control(boot.cells, boot.index)
        control.mark_started()
        budget = None
        if not threads.user_pinned(boot.environ):
            budget = threads.Budget(boot.cells, boot.cores, boot.fixed_threads)
        super().__init__(models or Models(boot.inherited), Outbox(self._write), control, budget)

    def _write(self, frames: list[Frame]) -> int:
        try:
            return channel.write_frames(self.events, frames)
        except OSError:  # the parent closed the pipe: nobody is left to serve
            os._exit(0)

    def serve(self) -> None:
        """Run jobs until the parent closes the job pipe."""
        while True:
            try:
                frame = channel.read_frame(self.jobs)
            except OSError:
                frame = None
            if frame is None:
                return
            seq, _kind, payload = frame
            del frame
            self.handle(seq, payload)


def class_name(model: Any) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def registry() -> dict[str, llm.Model]:
    """Sync models from the plugins installed here, one plugin at a time, so a
    plugin whose models fail to build here breaks only its own models."""
    found: dict[str, llm.Model] = {}

    def register(model, async_model=None, aliases=None):
        if model is not None:
            found.setdefault(model.model_id, model)

    try:
        llm.load_plugins()
        impls = llm.pm.hook.register_models.get_hookimpls()
    except Exception:
        return found
    for impl in impls:
        if impl.plugin_name == "async_procpool" or "model_aliases" in impl.argnames:
            continue  # hooks that adjust others' registrations, ours among them
        try:
            impl.function(register=register)
        except Exception:
            pass
    return found


def _not_loadable(error: BaseException) -> BaseException:
    if isinstance(error, (ImportError, AttributeError)) and not isinstance(error, ModelNotLoadable):
        return ModelNotLoadable(
            f"The worker process could not load the model: {type(error).__name__}: {error}. "
            "A worker imports the model's module afresh, so a model defined where the "
            "worker cannot import it (a notebook cell, or a script's module that is not "
            "on the worker's path) cannot be rebuilt there. Define it in an importable "
            "module or an installed plugin, or set LLM_ASYNC_POOL=thread."
        )
    return error


def _fd(end: Any) -> int:
    """A raw fd from what we were given: an fd, or a multiprocessing Connection."""
    if isinstance(end, int):
        return end
    fd = os.dup(end.fileno())
    end.close()
    return fd


# ----------------------------------------------------------------- set-up
def prepare(boot: Boot, threads_now: int) -> None:
    """Make this process a quiet, well-behaved child before any model code runs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's to handle
    if boot.nice and hasattr(os, "nice"):  # the parent's event loop wins the CPU
        os.nice(boot.nice)
    die_with_parent()
    _drop_forkserver_lifeline()
    os.environ.clear()
    os.environ.update(threads.environment(boot.environ, threads_now))
    if not threads.user_pinned(boot.environ):
        threads.patch_cpu_count(boot.threads)
    sys.setswitchinterval(0.001)  # lets the outbox flusher in within MAX_HOLD


def die_with_parent() -> None:
    """Be killed by the kernel when the process that forked us dies (Linux).

    Needs no thread and no GIL, so it works even while the model sits in a C
    call. The forkserver exits when the app does (nothing else holds its
    lifeline: see ``_drop_forkserver_lifeline``), and templates' children
    follow their template.
    """
    if not sys.platform.startswith("linux"):
        return
    expected = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != expected:  # it died before the call took effect
        os._exit(0)


def _drop_forkserver_lifeline() -> None:
    """Close our copy of the forkserver's alive pipe, so it exits with the app."""
    try:
        from multiprocessing import forkserver

        server = forkserver._forkserver
        fd = getattr(server, "_forkserver_alive_fd", None)
        if fd is not None:
            server._forkserver_alive_fd = None
            server._forkserver_address = None
            os.close(fd)
    except Exception:
        pass


def watch_parent(parent: int) -> None:
    """A fallback lifeline: exit soon after the app dies, where the kernel's
    parent-death signal cannot tell (another platform, or a forkserver kept
    alive by the app's own processes)."""

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK)
            if not _alive(parent):
                os._exit(0)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead parent not yet reaped is a zombie
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def close_inherited_fds(keep: set[int]) -> None:
    """Close every fd a process forked from the app inherited but does not use:
    the app's sockets, files and pipes (a pipe to one of its subprocesses, held
    open here, would keep that subprocess from ever seeing end of file).

    ``gc.freeze()`` first: the app's objects stay alive, never collected, so
    none of them closes a number that is reused by then.
    """
    gc.freeze()
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in open_fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def main(boot: Boot) -> None:
    """Entry point of a worker process started by multiprocessing."""
    prepare(boot, boot.threads)
    watch_parent(boot.parent)
    worker = Worker(boot)
    if boot.inherited:  # forked from the app: let go of its files and sockets
        close_inherited_fds({worker.jobs, worker.events})
    worker.serve()
