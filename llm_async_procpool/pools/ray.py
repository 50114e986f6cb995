"""A pool of Ray actors: the same twin, spread over a Ray cluster.

``LLM_ASYNC_POOL=ray``; ``ray_cluster`` joins or starts the cluster. One
actor per worker (``ray_worker.RayWorker``), each asking Ray for
``num_cpus`` = its thread budget and, with ``LLM_ASYNC_POOL_RAY_GPUS``, for
GPUs. Prompts are placed by the same policy as the process pool's
(``placement``), with an actor for a worker. A request no node of the
cluster can ever satisfy fails at once, naming the setting; one not placed
within the load allowance fails then. Each prompt is one call of the actor's
streaming generator, consumed on the app's event loop (``async for ref in
gen``) and fed to the same ``Run`` as the other pools. Ray never retries a
prompt (a retry would replay a stream); but a prompt sent to an actor that
had died (with its node, say), before any of it ran, is placed again, once.
Cancel, timeout and a consumer that walks away ``ray.cancel`` the generator;
an actor that has not stopped within the grace period is killed and replaced.

The key travels as its own small task argument, apart from the pickled job,
so it is never written to Ray's object store (which spills to disk). A
model in an actor sees the environment and directory the app had when the
actor started (its node may be another machine).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..cells import WINDOW, WINDOW_BYTES
from ..config import MAX_WORKERS
from ..errors import PoolClosed, PoolConfigError, PromptTimeout, RemoteError, WorkerCrashed
from ..faults import decode_event
from ..messages import KINDS, Chunks, Done, Failed, Job, NeedModel
from ..wire import dumps_job, dumps_with_model, key_model_id
from .base import Memory, Pool, Task, WorkerInfo, memory
from .placement import Begin, Placement, Retire, StartWorker
from .ray_cluster import Actor, Cluster

#: Streamed objects an actor may have yielded that the pool has not read (each
#: at most about 256 chunks); the pool itself reads no further than the
#: backpressure window (``cells.WINDOW``) ahead of the consumer. Fewer would
#: slow a cancel: an actor blocked on this limit sees it only once a second.
BACKPRESSURE = 16
#: Seconds between the watcher's checks of starting, stopping and idle actors.
WATCH = 0.05
NEED_MODEL = KINDS[NeedModel]


@dataclass(eq=False)
class RayTask(Task):
    api_key: str | None = None  # sent apart from the pickled job
    generator: Any = None  # the actor's stream, once called
    feeder: Any = None  # the asyncio task reading it, kept so it is not collected
    requeued: bool = False  # placed again once already: its actor was dead
    ahead: list = field(default_factory=lambda: [0, 0])  # chunks, bytes not yet taken
    room: Any = None  # an asyncio.Event the feeder waits on while ``ahead`` is full


def _full(ahead: list, share: float) -> bool:
    """Has the consumer left ``share`` of the backpressure window untaken?"""
    return ahead[0] >= WINDOW * share or ahead[1] >= WINDOW_BYTES * share


class RayPool(Pool):
    kind = "ray"

    def __init__(self, settings):
        super().__init__(settings)
        self._threads = settings.threads or 1
        self.cluster = Cluster(settings.ray_address, self._threads, settings.ray_gpus)
        self.ray = self.cluster.ray
        from ..ray_worker import RayWorker

        resources: dict[str, Any] = {"num_cpus": self._threads}
        if settings.ray_gpus:
            resources["num_gpus"] = settings.ray_gpus
        self._actor_class = self.ray.remote(max_restarts=0, max_task_retries=0, **resources)(
            RayWorker
        )
        self._placement = Placement(self._room)
        self._actors: list[Actor] = []
        self._failed: list[tuple[Task, Exception]] = []  # to tell, outside the lock
        self._watcher = threading.Thread(target=self._watch, name="llm-async-pool-ray", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------ submitting
    def new_task(self, model: Any, job: Job, settings: Any) -> RayTask:
        task = RayTask(job, model, settings)
        task.api_key, job.key = job.key, None
        try:
            task.payload = dumps_job(job)
        finally:
            job.key = task.api_key
        return task

    def submitted(self) -> None:
        self._tell_failed()

    def enqueue(self, task: Task) -> None:
        self.act(self._placement.submit(task, False))

    def _room(self, live: int) -> bool:
        if self.settings.workers is not None:
            return live < self.settings.workers
        return live < max(1, min(MAX_WORKERS, self.cluster.cpus() // self._threads))

    def _do(self, action: Any) -> None:
        if type(action) is Begin:
            self._begin(action.task, action.slot, action.cold)
        elif type(action) is StartWorker:
            self._new_actor(action.key)
        elif type(action) is Retire:
            self._drop(action.slot)

    def _new_actor(self, key: str) -> None:
        problem = self.cluster.infeasible()
        if problem is not None:
            self._start_failed(key, PoolConfigError(problem))
            return
        handle = self._actor_class.options(scheduling_strategy="SPREAD").remote(
            dict(os.environ), self._threads
        )
        head = self._placement.models[key].waiting
        self._actors.append(Actor(handle, key, head[0].settings.load_timeout if head else None))

    def _start_failed(self, key: str, error: Exception) -> None:
        failed, actions = self._placement.start_failed(key)
        if failed is not None:
            self._failed.append((failed, error))
        self.act(actions)

    def _tell_failed(self) -> None:
        with self._lock:
            failed, self._failed = self._failed, []
        for task, error in failed:
            task.run.deliver(Failed(task.seq, error))

    def _begin(self, task: RayTask, actor: Actor, cold: bool) -> None:
        actor.task, actor.idle_since = task, None
        task.begin(actor, cold)
        try:
            task.run.loop.call_soon_threadsafe(self._feed_soon, task)
        except RuntimeError:  # the consumer's loop is gone
            self._free(actor)

    def _feed_soon(self, task: RayTask) -> None:
        task.feeder = asyncio.ensure_future(self._feed(task))

    # ------------------------------------------------------------ coming back
    async def _feed(self, task: RayTask) -> None:
        """Read the actor's stream on the consumer's loop, frame by frame."""
        actor = task.slot
        payload = task.payload
        try:
            while True:
                if actor.task is not task or task.stopping:  # stopped before it started
                    return
                generator = actor.handle.run.options(
                    num_returns="streaming", _generator_backpressure_num_objects=BACKPRESSURE
                ).remote(task.seq, payload, task.api_key)
                task.generator = generator
                ending = await self._read(task, generator)
                if ending is None:  # NeedModel: send it again, with the model
                    key, task.job.key = task.job.key, None
                    try:
                        payload = dumps_with_model(task.job, task.model)
                    finally:
                        task.job.key = key
                    continue
                self._settle(task, ending)
                return
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if actor.task is not task or task.stopping:  # stopped: the watcher frees the actor
                return
            if isinstance(error, self.ray.exceptions.RayActorError):
                self._actor_died(actor, task, error)
                return
            cause = getattr(error, "cause", None) or error  # RayTaskError wraps ours
            self._settle(task, Failed(task.seq, cause))

    async def _read(self, task: RayTask, generator: Any) -> Any:
        async for ref in generator:
            for _seq, kind, data in await ref:
                if kind == NEED_MODEL:
                    return None
                event = decode_event(kind, data, task.job.model_id)
                if not task.heard:
                    with self._lock:
                        task.hear()
                        self.act(self._placement.loaded(task.slot, task.key))
                if type(event) is not Chunks:
                    return event  # terminal (or a chunk that could not be read: it ends)
                event.nbytes = len(data)
                task.run.deliver(event)
                task.ahead[0] += len(event.items)
                task.ahead[1] += event.nbytes
                while _full(task.ahead, 1) and not task.stopping:  # the consumer is behind
                    task.room = task.room or asyncio.Event()
                    task.room.clear()
                    await task.room.wait()
        return Failed(task.seq, RemoteError("Error", "The actor's stream ended early"))

    def _settle(self, task: RayTask, event: Any) -> None:
        with self._lock:
            self._free(task.slot)
        if not (task.stopping and type(event) is Done and event.cancelled):
            task.run.deliver(event)

    def _free(self, actor: Actor) -> None:
        """Lock held, or taken here."""
        with self._lock:
            task, actor.task = actor.task, None
            if task is not None:
                actor.count += 1
                conversation = task.job.conversation
                actor.served = None if conversation is None else conversation.id
            actor.stopping = None
            actor.idle_since = time.monotonic()
            if actor in self._actors:
                self.act(self._placement.free(actor))

    def _actor_died(self, actor: Actor, task: RayTask, error: Exception) -> None:
        node = actor.info.get("node", "?")
        with self._lock:
            dead = self.cluster.dead_nodes()
            self._drop(actor)
            for other in list(self._actors):  # its idle neighbours died with the node
                if other.info.get("node") in dead and other.task is None:
                    self._drop(other)
            if not task.heard and not task.requeued:  # none of it ran: place it again
                task.slot, task.requeued = None, True  # (once: its model may be what kills)
                self.act(self._placement.requeue(task))
                return
        task.run.deliver(
            Failed(
                task.seq,
                WorkerCrashed(
                    f"The Ray actor running model {task.job.model_id!r} on node {node} "
                    f"died ({type(error).__name__}). The pool has replaced it; other "
                    "prompts are not affected."
                ),
            )
        )

    def _drop(self, actor: Actor) -> None:
        """Forget an actor and kill it (lock held)."""
        if actor in self._actors:
            self._actors.remove(actor)
            self.act(self._placement.gone(actor, retired=False))
        self.cluster.kill(actor)

    # ------------------------------------------------------------ stopping early
    def unqueue(self, task: Task) -> bool:
        return self._placement.cancel(task)

    def take(self, task: Task, count: int, nbytes: int) -> None:
        """On the consumer's loop: the feeder may read on once half the window is free."""
        task.ahead[0] -= count
        task.ahead[1] -= nbytes
        if task.room is not None and not _full(task.ahead, 0.5):
            task.room.set()

    def stop(self, task: Task) -> None:
        if task.room is not None:  # a feeder waiting for the consumer stops waiting
            task.run.loop.call_soon_threadsafe(task.room.set)
        actor = task.slot
        if actor is None or actor.task is not task:
            return
        generator = task.generator
        if generator is None:  # dispatched, not started: nothing runs yet
            self._free(actor)
            return
        actor.stopping = (generator.completed(), time.monotonic() + task.stop_allowance())
        try:
            self.ray.cancel(generator)
        except Exception:
            pass

    def running(self) -> Iterable[Task]:
        return [a.task for a in self._actors if a.task is not None]

    def _watch(self) -> None:
        """Free actors whose stopped prompt ended; kill those past their grace;
        learn where new ones run; retire idle ones; enforce time limits."""
        while not self.closed:
            time.sleep(WATCH)
            if not self.ray.is_initialized():  # the app shut Ray down: so do we
                self.shutdown()  # (any Ray call now would start a new instance)
                return
            with self._lock:
                stopping = [a for a in self._actors if a.stopping is not None]
                unplaced = [a for a in self._actors if not a.info]
            if stopping:
                refs = [a.stopping[0] for a in stopping]
                done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
                now = time.monotonic()
                with self._lock:
                    for actor in stopping:
                        if actor.stopping[0] in done:
                            self._free(actor)
                        elif actor.stopping[1] <= now:
                            self._drop(actor)  # stuck: killed, replaced on demand
            for actor in unplaced:
                self._describe(actor)
            self._retire_idle()
            self.check_running(time.monotonic())
            self._tell_failed()

    def _describe(self, actor: Actor) -> None:
        """A new actor answers once Ray has placed and started it: it is ready."""
        ready, _ = self.ray.wait([actor.describing], timeout=0)
        with self._lock:
            if actor not in self._actors:
                return
            if not ready:
                if actor.place_by is not None and time.monotonic() > actor.place_by:
                    self._actors.remove(actor)
                    self.cluster.kill(actor)
                    self._start_failed(actor.key, PromptTimeout(self.cluster.unplaced(actor.key)))
                return
            try:
                info = self.ray.get(actor.describing)
            except Exception as error:  # it could not start
                self._actors.remove(actor)
                self.cluster.kill(actor)
                self._start_failed(
                    actor.key, WorkerCrashed(f"A Ray actor could not start: {error}")
                )
                return
            actor.info, actor.describing = info, None
            self.act(self._placement.arrived(actor, actor.key))

    def _retire_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            for actor in list(self._actors):
                idle = actor.idle_since
                if actor.task is None and idle and now - idle >= self.settings.idle_timeout:
                    self._actors.remove(actor)
                    self.act(self._placement.retire(actor))
                    self.act(self._placement.gone(actor, retired=True))
                    self.cluster.kill(actor)

    # ------------------------------------------------------------ inspecting
    def workers(self) -> list[WorkerInfo]:
        if not self.ray.is_initialized():
            return []
        local = self.ray.get_runtime_context().get_node_id()
        with self._lock:
            actors = list(self._actors)
        infos = []
        for actor in actors:
            node, pid = actor.info.get("node"), actor.info.get("pid", 0)
            infos.append(
                WorkerInfo(
                    pid,
                    memory(pid) if node == local else Memory(),
                    sorted(key_model_id(k) for k in actor.models),
                    actor.count,
                    actor.task is not None,
                    node=node,
                )
            )
        return infos

    def describe(self) -> dict[str, Any]:
        return self.cluster.describe()

    def idle(self) -> bool:
        with self._lock:
            return not self._placement.waiting() and not self._actors

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            queued = self._placement.drain()
            actors, self._actors = list(self._actors), []
        for task in queued:
            task.run.deliver(Failed(task.seq, PoolClosed("The Ray pool has shut down")))
        alive = self.ray.is_initialized()
        for actor in actors:
            task = actor.task
            if task is not None:
                if task.generator is not None and alive:
                    try:
                        self.ray.cancel(task.generator)
                    except Exception:
                        pass
                task.run.deliver(
                    Failed(task.seq, PoolClosed("The Ray pool shut down while it ran"))
                )
            self.cluster.kill(actor)
