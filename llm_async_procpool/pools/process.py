"""Where a prompt crosses into a worker process, and how its events come back.

Each worker is a one-process ``concurrent.futures.ProcessPoolExecutor`` that
runs ``worker.serve`` as one long task. One executor per worker means one dead
worker breaks only its own executor; the stdlib breaks a whole pool instead.

Per worker (a ``Slot``):

    parent                                   worker process
    submit() --job pipe: seq + pickle-------> serve() -> run_job() -> execute()
    Run <-- drain thread <--event pipe------- Outbox: Chunks..., Done|Failed
    Run.close() --shared Control cells------> stop before the next chunk

The parent closes its copies of the worker's pipe ends once the process has
started, so the drain thread reads EOF the moment the worker dies, after every
event it wrote: a crash is reported in order, within milliseconds.

A watchdog thread per pool retires idle workers and kills a worker whose
cancelled prompt has not stopped within the grace period.

Start method: forkserver where the platform has it, else spawn. Never fork:
the parent has threads and an event loop, and a forked child would inherit
locks held by them.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor

import cloudpickle
import llm

from .. import worker
from ..errors import PoolClosed, PromptNotSendable, RemoteError, WorkerCrashed
from ..messages import Chunks, Control, Done, Failed, Job, NeedModel, Started
from ..wire import dumps_job
from .base import Pool, WorkerInfo, rss_bytes
from .run import Run

START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
PRELOAD = "llm_async_procpool._forkserver"
STARTUP_HINT = (
    " It ran no prompt before it died, so it may have failed to start: see its"
    " traceback on stderr. A script must keep its top-level code under"
    " `if __name__ == '__main__':`, because workers import the main module again."
)
#: Jobs larger than this are written from a helper thread, not the event loop.
BIG_JOB = 1 << 20


class Slot:
    """One worker process: its executor, its two pipes, its control cells."""

    def __init__(self, pool: ProcessPool):
        context = pool.context
        jobs_end, self.jobs = context.Pipe(duplex=False)
        self.events, events_end = context.Pipe(duplex=False)
        self.control = Control(context.RawArray("q", 2))
        self.executor = ProcessPoolExecutor(
            1,
            mp_context=context,
            initializer=worker.init,
            initargs=(
                jobs_end,
                events_end,
                self.control.cells,
                dict(os.environ),
                pool.settings.nice,
                os.getpid(),
            ),
        )
        try:
            self.executor.submit(worker.serve)
            # submit() has started the process (it does for spawn and forkserver).
            self.process = next(iter(self.executor._processes.values()))
        except BaseException:
            self.executor.shutdown(wait=False)
            raise
        finally:
            jobs_end.close()
            events_end.close()
        self.pid: int = self.process.pid
        self.models: set[str] = set()
        self.served = 0
        self.run: Run | None = None
        self.job: Job | None = None
        self.model: llm.Model | None = None
        self.idle_since = time.monotonic()
        self.kill_at: float | None = None
        self.grace = 0.0
        self.retired = False
        self._send_lock = threading.Lock()
        with pool._lock:
            pool._slots.add(self)
        threading.Thread(
            target=pool._drain,
            args=(self,),
            name=f"procpool-drain-{self.pid}",
            daemon=True,
        ).start()

    def send(self, seq: int, payload: bytes) -> None:
        """Write one job; a dead worker is reported by the drain thread instead."""
        try:
            with self._send_lock:
                self.jobs.send_bytes(seq.to_bytes(8, "little") + payload)
        except OSError:
            pass

    def retire(self) -> None:
        """Let the worker finish and exit: EOF on its job pipe ends serve()."""
        self.retired = True
        with self._send_lock:
            self.jobs.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def kill(self) -> None:
        try:
            self.process.kill()
        except (OSError, AttributeError):
            pass


class ProcessPool(Pool):
    kind = "process"

    def __init__(self, settings):
        super().__init__(settings)
        self.context = multiprocessing.get_context(START_METHOD)
        if START_METHOD == "forkserver":
            _preload_forkserver(self.context)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._slots: set[Slot] = set()
        self._idle: list[Slot] = []
        self._live = 0  # slots alive or being spawned, never above settings.workers
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._seqs = itertools.count(1)
        threading.Thread(target=self._watch, name="procpool-watchdog", daemon=True).start()

    # ------------------------------------------------------------ submitting
    async def submit(self, model: llm.Model, job: Job, timeout: float | None, grace: float) -> Run:
        job.seq = seq = next(self._seqs)
        payload = dumps_job(job)  # fails here, before a worker is taken
        loop = asyncio.get_running_loop()
        while True:
            slot = await self._acquire(job.model_id)
            with self._lock:
                if slot.retired:  # died while idle; its capacity is back already
                    continue
                run = Run(
                    loop,
                    seq,
                    job.model_id,
                    cancel=lambda slot=slot: self._cancel(slot, seq),
                    take=lambda count, slot=slot: _take(slot, seq, count),
                    timeout=timeout,
                )
                slot.control.reset()
                slot.run, slot.job, slot.model = run, job, model
                slot.models.add(job.model_id)
                slot.idle_since = None
                slot.grace = grace
                break
        if len(payload) < BIG_JOB:
            slot.send(seq, payload)
        else:
            try:
                await asyncio.shield(loop.run_in_executor(None, slot.send, seq, payload))
            except asyncio.CancelledError:
                run.close()
                raise
        return run

    async def _acquire(self, model_id: str) -> Slot:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.closed:
                raise PoolClosed("The process pool has shut down")
            slot = self._take_idle(model_id)
            if slot is not None:
                return slot
            waiter = None
            if self._live < self.settings.workers:
                self._live += 1
            else:
                waiter = loop.create_future()
                self._waiters.append((loop, waiter))
        if waiter is not None:
            try:
                slot = await waiter
            except asyncio.CancelledError:
                with self._lock:
                    if (loop, waiter) in self._waiters:
                        self._waiters.remove((loop, waiter))
                    elif waiter.done() and not waiter.cancelled():
                        self._grant(waiter.result())
                raise
            if slot is not None:
                return slot
        # We hold one unit of capacity: start a worker with it.
        spawning = loop.run_in_executor(None, Slot, self)
        try:
            return await asyncio.shield(spawning)
        except asyncio.CancelledError:
            spawning.add_done_callback(self._adopt)
            raise
        except BaseException:
            with self._lock:
                self._grant(None)
            raise

    def _take_idle(self, model_id: str) -> Slot | None:
        for slot in reversed(self._idle):
            if model_id in slot.models:
                self._idle.remove(slot)
                return slot
        return self._idle.pop() if self._idle else None

    def _adopt(self, spawning: asyncio.Future) -> None:
        """A spawn whose requester was cancelled: give the worker to another."""
        with self._lock:
            if spawning.cancelled() or spawning.exception() is not None:
                self._grant(None)
            elif not spawning.result().retired:
                self._grant(spawning.result())

    def _grant(self, item: Slot | None) -> None:
        """Hand a free slot, or a unit of capacity (None), to the next waiter.

        Called with the lock held. A waiter whose loop is closed is skipped.
        """
        while self._waiters and not self.closed:
            loop, waiter = self._waiters.popleft()
            try:
                loop.call_soon_threadsafe(self._accept, waiter, item)
                return
            except RuntimeError:
                continue
        if item is None:
            self._live -= 1
        elif self.closed:
            item.retire()
        else:
            item.idle_since = time.monotonic()
            self._idle.append(item)
            self._wake.notify()

    def _accept(self, waiter: asyncio.Future, item: Slot | None) -> None:
        if waiter.done():  # its task was cancelled meanwhile: pass it on
            with self._lock:
                self._grant(item)
        else:
            waiter.set_result(item)

    # ------------------------------------------------------------ stopping early
    def _cancel(self, slot: Slot, seq: int) -> None:
        with self._lock:
            if slot.run is None or slot.run.seq != seq:
                return  # already finished
            slot.control.cancel(seq)
            slot.kill_at = time.monotonic() + slot.grace
            self._wake.notify()

    def _watch(self) -> None:
        """Retire idle workers; kill those that ignore a stop for the grace period."""
        with self._lock:
            while not self.closed:
                now = time.monotonic()
                due: list[float] = []
                for slot in list(self._idle):
                    retire_at = slot.idle_since + self.settings.idle_timeout
                    if retire_at <= now:
                        self._idle.remove(slot)
                        slot.retire()
                        self._grant(None)
                    else:
                        due.append(retire_at)
                for slot in self._slots:
                    if slot.kill_at is not None:
                        if slot.kill_at <= now:
                            slot.kill_at = None
                            slot.kill()
                        else:
                            due.append(slot.kill_at)
                self._wake.wait(min(due) - now if due else None)

    # ------------------------------------------------------------ coming back
    def _drain(self, slot: Slot) -> None:
        """The slot's reader thread: route events until the worker is gone."""
        while True:
            try:
                data = slot.events.recv_bytes()
            except (EOFError, OSError):
                break
            try:
                event = pickle.loads(data)
            except Exception as error:
                # e.g. a chunk of a class the parent cannot import. Fail the prompt
                # and stop the job; had this been its terminal event, the worker
                # sends nothing more, and the grace-period kill recycles it.
                with self._lock:
                    run = slot.run
                if run is not None:
                    run.deliver(Failed(run.seq, RemoteError(type(error).__name__, str(error))))
                    self._cancel(slot, run.seq)
                continue
            if type(event) is Chunks or type(event) is Started:
                run = slot.run
                if run is not None:
                    run.deliver(event)
            elif type(event) is NeedModel:
                self._send_model(slot)
            else:
                self._finish(slot, event)
        self._exited(slot)

    def _send_model(self, slot: Slot) -> None:
        """The worker's registry lacks this model: send it once, pickled."""
        job = slot.job
        try:
            job.model_blob = cloudpickle.dumps(slot.model)
            payload = dumps_job(job)
        except Exception as error:
            reason = PromptNotSendable(
                f"Model {job.model_id!r} is not installed as a plugin where the "
                "worker can load it, and it cannot be pickled either "
                f"({type(error).__name__}: {error}). Install its plugin, or set "
                "LLM_ASYNC_POOL=thread."
            )
            self._finish(slot, Failed(job.seq, reason))
            return
        finally:
            job.model_blob = None
        slot.send(job.seq, payload)

    def _finish(self, slot: Slot, event: Done | Failed) -> None:
        with self._lock:
            run = slot.run
            slot.run = slot.job = slot.model = None
            slot.kill_at = None
            slot.served += 1
            if not slot.retired:
                limit = self.settings.max_tasks
                if limit is not None and slot.served >= limit:
                    slot.retire()  # recycled: a fresh worker replaces it on demand
                    self._grant(None)
                else:
                    self._grant(slot)
        if run is not None:
            run.deliver(event)

    def _exited(self, slot: Slot) -> None:
        code = _exit_code(slot.process)
        with self._lock:
            self._slots.discard(slot)
            if slot in self._idle:
                self._idle.remove(slot)
            run = slot.run
            slot.run = slot.job = slot.model = None
            slot.kill_at = None
            was_retired = slot.retired
            slot.retired = True
            if not was_retired:
                self._grant(None)
        slot.executor.shutdown(wait=False, cancel_futures=True)
        if run is not None:
            if self.closed:
                error: Exception = PoolClosed(
                    f"The pool shut down while model {run.model_id!r} ran"
                )
            else:
                error = WorkerCrashed(
                    f"The worker process (pid {slot.pid}) running model "
                    f"{run.model_id!r} {describe_exit(code)}. The pool has "
                    "replaced it; other prompts are not affected."
                    + (STARTUP_HINT if slot.served == 0 and code and code > 0 else "")
                )
            run.deliver(Failed(run.seq, error))

    # ------------------------------------------------------------ inspecting
    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            slots = sorted(self._slots, key=lambda s: s.pid)
            return [
                WorkerInfo(
                    s.pid,
                    rss_bytes(s.pid),
                    sorted(s.models),
                    s.served,
                    s.run is not None,
                )
                for s in slots
            ]

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            waiters, self._waiters = list(self._waiters), deque()
            slots = list(self._slots)
            self._wake.notify()
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(_fail_waiter, waiter)
            except RuntimeError:
                pass
        for slot in slots:
            run = slot.run
            if run is not None:
                slot.control.cancel(run.seq)
            slot.retire()
        grace = max((slot.grace for slot in slots), default=0.0)
        deadline = time.monotonic() + max(0.0, min(timeout - 1.0, grace))
        for slot in slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
        survivors = [slot for slot in slots if slot.process.exitcode is None]
        for slot in survivors:
            slot.kill()
        deadline = time.monotonic() + 1.0
        for slot in survivors:
            slot.process.join(max(0.0, deadline - time.monotonic()))


def _preload_forkserver(context) -> None:
    """Add our warm-up module to the forkserver's preload list (kept: the
    user's own entries). It takes effect only if the forkserver has not
    started yet."""
    from multiprocessing import forkserver

    current = getattr(forkserver._forkserver, "_preload_modules", ["__main__"])
    if PRELOAD not in current:
        context.set_forkserver_preload([*current, PRELOAD])


def _exit_code(process, timeout: float = 1.0) -> int | None:
    """The exit code of a dead worker.

    Its executor's manager thread reaps it too, and a forkserver child's status
    can be read only once (a second reader gets 255), so wait for that reaping
    and read the cached code; poll ourselves only if it does not come.
    """
    popen = getattr(process, "_popen", None)
    deadline = time.monotonic() + timeout
    while popen is not None and time.monotonic() < deadline:
        if popen.returncode is not None:
            return popen.returncode
        time.sleep(0.005)
    process.join(0.1)
    return process.exitcode


def _take(slot: Slot, seq: int, count: int) -> None:
    """Count chunks the consumer took, unless the slot moved on to another job."""
    run = slot.run
    if run is not None and run.seq == seq:
        slot.control.take(count)


def _fail_waiter(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(PoolClosed("The process pool has shut down"))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"
