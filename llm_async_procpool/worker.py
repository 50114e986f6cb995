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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle
import llm

from . import channel, threads
from .errors import ModelNotLoadable, RemoteError
from .messages import KINDS, Chunks, Control, Done, Failed, Job, NeedModel, ResponseState
from .runner import run_job
from .wire import describe_unsendable, portable_error

#: A chunk never waits in the outbox longer than this, in seconds.
MAX_HOLD = 0.002
#: Largest batch of chunks in one pipe write.
MAX_BATCH = 1024
#: Chunks closer together than this, in seconds, are a fast stream: batch them.
#: (A job's first chunk always goes at once.)
FAST_GAP = 0.001
#: Seconds after the last chunk that the flusher keeps checking without being woken.
FLUSHER_AWAKE = 0.05
#: A batch of text this long goes at once (and so counts against the bytes window).
MAX_BATCH_TEXT = 1 << 16
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


#: A frame on its way out: (seq, kind, pickled payload, how many chunks it carries).
Frame = tuple[int, int, bytes, int]


class Outbox:
    """Batches a fast stream's chunks so it costs one pipe write per batch.

    A chunk that comes more than ``FAST_GAP`` after the previous one goes at
    once: for a slow model a write per chunk is cheap, and batching would only
    add latency. In a fast stream a chunk waits for its batch, at most
    ``MAX_HOLD``; a flusher thread covers a model that stalls mid-batch.

    A chunk that cannot be pickled is never dropped silently: the chunks
    before it are sent, and ``error`` fails the job, naming the chunk.
    """

    def __init__(self, sink: Callable[[list[Frame]], int]):
        self._sink = sink  # sends frames (seq, kind, payload, chunks in it); returns their size
        self._held: list[Frame] = []  # the last batch, to leave with the terminal event
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._batch: list[Any] = []
        self._seq = 0
        self._model_id = ""
        self._first = 0.0
        self._last_put = 0.0
        self._chunks = 0
        self._bytes = 0
        self._text = 0  # characters of str chunks in the batch
        self.error: BaseException | None = None
        self._flusher_running = False  # started on first need: a template forks threadless
        self._flusher_asleep = False

    def start(self, seq: int, model_id: str) -> None:
        with self._lock:
            self._seq, self._model_id = seq, model_id
            self._chunks = self._bytes = 0
            self._last_put = 0.0  # a job's first chunk always goes at once
            self.error = None

    def sent(self) -> tuple[int, int]:
        return self._chunks, self._bytes

    def put(self, chunk: Any) -> None:
        now = time.perf_counter()
        with self._lock:
            if self.error is not None:
                return
            batch = self._batch
            batch.append(chunk)
            self._chunks += 1
            if type(chunk) is str:
                self._text += len(chunk)
            if len(batch) == 1:
                if now - self._last_put >= FAST_GAP:
                    self._flush_locked()
                else:
                    self._first = now
                    if not self._flusher_running:
                        self._flusher_running = True
                        threading.Thread(
                            target=self._flusher, name="outbox-flusher", daemon=True
                        ).start()
                    elif self._flusher_asleep:
                        self._wake.notify()
            elif (
                now - self._first >= MAX_HOLD / 2
                or len(batch) >= MAX_BATCH
                or self._text >= MAX_BATCH_TEXT
            ):
                self._flush_locked()
            self._last_put = now

    def flush(self, last: bool = False) -> None:
        """Send the batch now; or, when it is the job's ``last``, pickle it now (so
        a chunk that cannot be sent is known) and send it with the terminal event."""
        with self._lock:
            if self._batch:
                self._flush_locked(hold=last)

    def send(self, event: Done | Failed | NeedModel) -> None:
        """Send a terminal event, in one write with the last batch; whatever the
        event holds, something readable arrives."""
        payload = _terminal_payload(event, self._model_id)
        with self._lock:
            frames, self._held = self._held, []
            self._sink([*frames, (event.seq, KINDS[type(event)], payload, 0)])

    def _flush_locked(self, hold: bool = False) -> None:
        batch, self._batch = self._batch, []
        self._text = 0
        try:
            payload = channel.dumps(Chunks(self._seq, batch))
        except Exception:
            self._fail_batch(batch)
            return
        frame = (self._seq, KINDS[Chunks], payload, len(batch))
        if hold:
            self._held.append(frame)
            self._bytes += len(payload) + channel.HEADER.size
        else:
            self._bytes += self._sink([frame])

    def _fail_batch(self, batch: list[Any]) -> None:
        """Send the chunks before the first unpicklable one, then fail the job."""
        good: list[Any] = []
        for position, item in enumerate(batch):
            try:
                channel.dumps(item)
            except Exception as error:
                number = self._chunks - len(batch) + position + 1
                self.error = describe_unsendable(f"chunk {number}", item, self._model_id, error)
                break
            good.append(item)
        if good:
            payload = channel.dumps(Chunks(self._seq, good))
            self._bytes += self._sink([(self._seq, KINDS[Chunks], payload, len(good))])

    def _flusher(self) -> None:
        """Flush a batch the model left waiting. While chunks keep coming it
        checks every ``MAX_HOLD``, so ``put`` need not wake it for each batch;
        after a quiet spell it sleeps until ``put`` wakes it."""
        with self._wake:
            while True:
                try:
                    now = time.perf_counter()
                    if self._batch:
                        due = self._first + MAX_HOLD - now
                        if due > 0:
                            self._wake.wait(due)
                        else:
                            self._flush_locked()
                    elif now - self._last_put < FLUSHER_AWAKE:
                        self._wake.wait(MAX_HOLD)
                    else:
                        self._flusher_asleep = True
                        self._wake.wait()
                        self._flusher_asleep = False
                except Exception as error:  # never die: the next batch needs us
                    self.error = self.error or error


def _terminal_payload(event: Done | Failed | NeedModel, model_id: str) -> bytes:
    """Pickle a terminal event, degrading what cannot cross to a clear error."""
    if type(event) is Failed:
        event.error = portable_error(event.error, event.traceback)
    try:
        return channel.dumps(event)
    except Exception as error:
        problem: Exception = error
    if type(event) is Failed:  # keep the model's error; drop the state that failed
        fallback = Failed(event.seq, event.error, None, event.traceback)
    else:
        name, value, problem = _first_unsendable(getattr(event, "state", None)) or (
            "state",
            None,
            problem,
        )
        reason = describe_unsendable(f"response.{name}", value, model_id, problem)
        fallback = Failed(event.seq, reason, None, "")
    try:
        return channel.dumps(fallback)
    except Exception:
        error = getattr(event, "error", None)
        last = RemoteError(type(error).__name__, _safe_text(error, problem))
        return pickle.dumps(Failed(event.seq, last, None, getattr(event, "traceback", "")))


def _first_unsendable(state: ResponseState | None) -> tuple[str, Any, Exception] | None:
    if state is None:
        return None
    for name, value in vars(state).items():
        try:
            channel.dumps(value)
        except Exception as error:
            return name, value, error
    return None


def _safe_text(error: Any, problem: Exception) -> str:
    try:
        text = str(error)
    except Exception:
        text = "(its message could not be read)"
    return f"{text} [it could not be sent back from the worker: {type(problem).__name__}]"


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
