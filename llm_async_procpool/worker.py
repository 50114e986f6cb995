"""What runs in the worker: the model cache, the serve loop and one prompt.

A worker process runs ``serve()`` as one long task of its
``ProcessPoolExecutor``: it reads jobs from its job pipe until the parent closes
it, and writes events (``messages``) to its event pipe. ``run_job`` is shared
with the thread pool, so both pools treat a model the same way.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
import traceback
from typing import Any, Protocol

import cloudpickle
import llm

from .messages import WINDOW, Chunks, Control, Done, Event, Failed, Job, NeedModel, Started
from .wire import capture_state, decode_job, portable_error

#: A chunk never waits in the outbox longer than this, in seconds.
MAX_HOLD = 0.002
#: Largest batch of chunks in one pipe write.
MAX_BATCH = 1024
#: Seconds between checks that the parent is still alive.
PARENT_CHECK = 0.5
#: Chunks closer together than this, in seconds, are a fast stream: batch them.
FAST_GAP = 0.0002


class Out(Protocol):
    def put(self, chunk: Any) -> None: ...
    def flush(self) -> None: ...


def run_job(job: Job, model: llm.Model, out: Out, control: Control) -> Event:
    """Run one prompt to its terminal event; never raises."""
    seq = job.seq
    response = generator = None
    try:
        prompt, response, conversation = decode_job(job, model)
        if isinstance(model, llm.KeyModel):
            generator = model.execute(prompt, job.stream, response, conversation, key=job.key)
        else:
            generator = model.execute(prompt, job.stream, response, conversation)
        chunks = iter(generator)
        sent = 0
        while True:
            if control.cancelled(seq):
                _close(generator)
                out.flush()
                return Done(seq, capture_state(response), cancelled=True)
            if sent - control.consumed() >= WINDOW:
                out.flush()
                _wait_for_window(control, seq, sent)
                continue
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            out.put(chunk)
            sent += 1
        out.flush()
        return Done(seq, capture_state(response))
    except BaseException as error:  # the model's exception goes to the consumer
        out.flush()
        text = traceback.format_exc()
        state = capture_state(response) if response is not None else None
        return Failed(seq, portable_error(error, text), state, text)
    finally:
        generator = None


def _close(generator: Any) -> None:
    """Run the model's ``finally`` blocks; an error from them changes nothing."""
    try:
        close = getattr(generator, "close", None)
        if close is not None:
            close()
    except Exception:
        pass


def _wait_for_window(control: Control, seq: int, sent: int) -> None:
    """Pause until the consumer has taken half the window (or the job is stopped).

    Resuming at half keeps chunks in flight while the consumer drains the rest;
    polling is fine-grained at first, then backs off for a consumer that left.
    """
    paused = time.monotonic()
    delay = 0.0002
    while sent - control.consumed() > WINDOW // 2 and not control.cancelled(seq):
        time.sleep(delay)
        cap = 0.001 if time.monotonic() - paused < 0.5 else 0.01
        delay = min(delay * 2, cap)


class Outbox:
    """Batches the chunks of a fast stream so it costs one pipe write per batch.

    A chunk that comes more than ``FAST_GAP`` after the previous one goes at
    once: for a slow model a write per chunk is cheap, and batching would only
    add latency. In a fast stream a chunk waits for its batch, at most
    ``MAX_HOLD``; a flusher thread covers a model that stalls mid-batch.
    """

    def __init__(self, connection: Any):
        self._connection = connection
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._batch: list[Any] = []
        self._seq = 0
        self._first = 0.0
        self._last_put = 0.0
        threading.Thread(target=self._flusher, name="outbox-flusher", daemon=True).start()

    def start(self, seq: int) -> None:
        self._seq = seq

    def put(self, chunk: Any) -> None:
        now = time.perf_counter()
        with self._lock:
            batch = self._batch
            batch.append(chunk)
            if len(batch) == 1:
                if now - self._last_put >= FAST_GAP:
                    self._flush_locked()
                else:
                    self._first = now
                    self._wake.notify()
            elif now - self._first >= MAX_HOLD / 2 or len(batch) >= MAX_BATCH:
                self._flush_locked()
            self._last_put = now

    def flush(self) -> None:
        with self._lock:
            if self._batch:
                self._flush_locked()

    def send(self, event: Event) -> None:
        data = pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._connection.send_bytes(data)

    def _flush_locked(self) -> None:
        batch, self._batch = self._batch, []
        self._connection.send_bytes(
            pickle.dumps(Chunks(self._seq, batch), protocol=pickle.HIGHEST_PROTOCOL)
        )

    def _flusher(self) -> None:
        with self._wake:
            while True:
                if not self._batch:
                    self._wake.wait()
                    continue
                due = self._first + MAX_HOLD - time.perf_counter()
                if due > 0:
                    self._wake.wait(due)
                else:
                    self._flush_locked()


class _Worker:
    def __init__(self, jobs: Any, events: Any, control: Control):
        self.jobs = jobs
        self.out = Outbox(events)
        self.control = control
        self.models: dict[str, llm.Model] = {}
        self.registry: dict[str, llm.Model] | None = None


_worker: _Worker | None = None  # this process's state, set by init()


def init(
    jobs: Any, events: Any, shared: Any, environ: dict[str, str], nice: int, parent: int
) -> None:
    """Executor initializer: adopt the parent's environment and pipes."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's to handle
    if nice and hasattr(os, "nice"):  # the parent's event loop wins the CPU when it wakes
        os.nice(nice)
    os.environ.clear()
    os.environ.update(environ)
    sys.setswitchinterval(0.001)  # lets the outbox flusher in within MAX_HOLD
    _worker = _Worker(jobs, events, Control(shared))
    threading.Thread(target=_exit_with, args=(parent,), name="lifeline", daemon=True).start()


def _exit_with(parent: int) -> None:
    """Exit soon after the parent dies, even mid-prompt (SIGKILL, OOM).

    The worker is a child of the forkserver, not of the parent, and holds the
    forkserver's own lifeline open, so nothing else would ever stop them.
    """
    while True:
        time.sleep(PARENT_CHECK)
        if not _alive(parent):
            os._exit(0)


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


def serve() -> str:
    """Run jobs until the parent closes the job pipe."""
    worker = _worker
    assert worker is not None, "serve() runs only in a pool worker"
    while True:
        try:
            data = worker.jobs.recv_bytes()
        except (EOFError, OSError):
            return "closed"
        seq = int.from_bytes(data[:8], "little")
        try:
            job = pickle.loads(memoryview(data)[8:])
            del data
            loaded_now = job.model_id not in worker.models
            model = _model(worker, job)
        except BaseException as error:
            text = traceback.format_exc()
            worker.out.send(Failed(seq, portable_error(error, text), None, text))
            continue
        if model is None:
            worker.out.send(NeedModel(seq))
            continue
        worker.out.start(seq)
        if loaded_now:  # restart the prompt's timeout: loading is not running
            worker.out.send(Started(seq))
        worker.out.send(run_job(job, model, worker.out, worker.control))
        del job


def _model(worker: _Worker, job: Job) -> llm.Model | None:
    """The model for this job, loaded at most once in this process."""
    model = worker.models.get(job.model_id)
    if model is None:
        if job.model_blob is not None:
            model = cloudpickle.loads(job.model_blob)
        else:
            model = _registry(worker).get(job.model_id)
        if model is not None:
            worker.models[job.model_id] = model
    return model


def _registry(worker: _Worker) -> dict[str, llm.Model]:
    """Sync models from the plugins installed in this environment."""
    if worker.registry is None:
        try:
            found = llm.get_models_with_aliases()
        except Exception:
            found = []
        worker.registry = {m.model.model_id: m.model for m in found if m.model}
    return worker.registry
