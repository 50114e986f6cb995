"""A pool of Ray actors: the same twin, spread over a Ray cluster.

``LLM_ASYNC_POOL=ray``. With ``LLM_ASYNC_POOL_RAY_ADDRESS`` (or Ray's own
``RAY_ADDRESS``) it joins that cluster; otherwise it starts a local Ray
instance that listens on 127.0.0.1 only; if the app has already called
``ray.init()``, it uses that.

One actor per worker slot (``ray_worker.RayWorker``), each asking Ray for
``num_cpus`` = its thread budget and, with ``LLM_ASYNC_POOL_RAY_GPUS``, for GPUs.
A prompt goes to an idle actor that has its model loaded, else to any idle
actor, else to a new one while there is room; actors are spread over the
nodes. Each prompt is one call of the actor's streaming generator, consumed
on the app's event loop (``async for ref in gen``) and fed to the same
``Run`` as the other pools. Ray never retries a prompt (a retry would replay a
stream). Cancel, timeout and a consumer that walks away ``ray.cancel`` the
generator; an actor that has not stopped within the grace period is killed
and replaced. A dead actor or node fails its prompt with ``WorkerCrashed``.

The key travels as its own small task argument, apart from the pickled job,
so it is never written to Ray's object store (which spills to disk).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import cloudpickle
import llm

from ..config import MAX_WORKERS, Settings
from ..errors import PoolClosed, PoolConfigError, RemoteError, WorkerCrashed
from ..messages import KINDS, Chunks, Failed, Job, NeedModel
from ..wire import dumps_job, rebuild_error
from .base import Memory, Pool, WorkerInfo, memory
from .run import Dispatched, Run, stop_allowance

#: Streamed objects an actor may have yielded that the consumer has not read.
BACKPRESSURE = 16
#: Seconds between the watcher's checks of stopping and idle actors.
WATCH = 0.05
CHUNKS, NEED_MODEL = KINDS[Chunks], KINDS[NeedModel]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise PoolConfigError(
            "LLM_ASYNC_POOL=ray needs Ray: pip install 'llm-async-procpool[ray]' "
            "(or pip install ray)"
        ) from None
    return ray


@dataclass(eq=False)
class _Item:
    """A prompt waiting for, or running on, an actor."""

    job: Job
    model: llm.Model
    run: Run
    payload: bytes
    key: str | None
    settings: Settings
    actor: _Actor | None = None
    generator: Any = None
    task: Any = None  # the feeding task, kept so it is not collected mid-flight
    heard: bool = False
    cold: bool = False  # its actor had not loaded its model when it began
    started: float = 0.0


class _Actor:
    def __init__(self, handle: Any):
        self.handle = handle
        self.info: dict[str, Any] = {}  # node and pid, once it answers
        self.models: set[str] = set()
        self.item: _Item | None = None
        self.served = 0
        self.idle_since: float | None = time.monotonic()
        self.stopping: tuple[Any, float] | None = None  # (done ref, kill deadline)
        self.describing = handle.describe.remote()  # runs before its first prompt


class RayPool(Pool):
    kind = "ray"

    def __init__(self, settings):
        super().__init__(settings)
        self.ray = _import_ray()
        from ..ray_worker import RayWorker

        self.address = _connect(self.ray, settings.ray_address)
        self._threads = settings.threads or 1
        resources: dict[str, Any] = {"num_cpus": self._threads}
        if settings.ray_gpus:
            resources["num_gpus"] = settings.ray_gpus
        self._actor_class = self.ray.remote(max_restarts=0, max_task_retries=0, **resources)(
            RayWorker
        )
        self._lock = threading.RLock()
        self._actors: list[_Actor] = []
        self._queue: deque[_Item] = deque()
        self._seqs = itertools.count(1)
        self._watcher = threading.Thread(target=self._watch, name="llm-async-pool-ray", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------ submitting
    async def submit(self, model: llm.Model, job: Job, settings: Settings) -> Run:
        job.seq = next(self._seqs)
        key, job.key = job.key, None
        try:
            payload = dumps_job(job)
        finally:
            job.key = key
        item = _Item(job, model, None, payload, key, settings)  # type: ignore[arg-type]
        item.run = Run(
            job,
            settings,
            cancel=lambda: self._cancel(item),
            take=lambda count, nbytes: None,  # Ray's own backpressure bounds the stream
        )
        with self._lock:
            if self.closed:
                raise PoolClosed("The Ray pool has shut down")
            self._queue.append(item)
            self._dispatch()
        return item.run

    def _capacity(self) -> int:
        if self.settings.workers is not None:
            return self.settings.workers
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        return max(1, min(MAX_WORKERS, cpus // self._threads))

    def _dispatch(self) -> None:
        """Start every queued prompt an actor can take now (lock held)."""
        for item in list(self._queue):
            if item.run.closed:
                self._queue.remove(item)
                continue
            key = item.job.model_key
            idle = [a for a in self._actors if a.info and a.item is None and a.stopping is None]
            actor = next((a for a in idle if key in a.models), None) or (idle[0] if idle else None)
            if actor is None:
                starting = sum(1 for a in self._actors if not a.info)
                waiting = len(self._queue)
                if starting < waiting and len(self._actors) < self._capacity():
                    self._new_actor()  # it takes a prompt once Ray has placed it
                return
            self._queue.remove(item)
            self._begin(item, actor)

    def _new_actor(self) -> _Actor:
        handle = self._actor_class.options(scheduling_strategy="SPREAD").remote(
            dict(os.environ), self._threads
        )
        actor = _Actor(handle)
        self._actors.append(actor)
        return actor

    def _begin(self, item: _Item, actor: _Actor) -> None:
        actor.item, item.actor = item, actor
        actor.idle_since = None
        item.cold = item.job.model_key not in actor.models
        item.started = time.monotonic()
        item.run.deliver(Dispatched(cold=item.cold))
        try:
            item.run.loop.call_soon_threadsafe(self._feed_soon, item)
        except RuntimeError:  # the consumer's loop is gone
            self._finished(actor)

    def _feed_soon(self, item: _Item) -> None:
        item.task = asyncio.ensure_future(self._feed(item))

    # ------------------------------------------------------------ coming back
    async def _feed(self, item: _Item) -> None:
        """Read the actor's stream on the consumer's loop, frame by frame."""
        actor = item.actor
        blob = None
        try:
            while True:
                if actor.item is not item:  # cancelled before it started
                    return
                payload = item.payload
                if blob is not None:
                    item.job.model_blob = blob
                    payload = dumps_job(item.job)
                    item.job.model_blob = None
                generator = actor.handle.run.options(
                    num_returns="streaming", _generator_backpressure_num_objects=BACKPRESSURE
                ).remote(item.job.seq, payload, item.key)
                item.generator = generator
                ending = await self._read(item, generator)
                if ending is None:  # NeedModel: send it again, pickled
                    blob = cloudpickle.dumps(item.model)
                    continue
                self._settle(item, ending)
                return
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if actor.item is not item:  # cancelled: the watcher frees the actor
                return
            if isinstance(error, self.ray.exceptions.RayActorError):
                self._actor_died(actor, item, error)
                return
            cause = getattr(error, "cause", None) or error  # RayTaskError wraps ours
            self._settle(item, Failed(item.job.seq, cause))

    async def _read(self, item: _Item, generator: Any) -> Failed | Any:
        async for ref in generator:
            for seq, kind, data in await ref:
                if kind == NEED_MODEL:
                    return None
                try:
                    event = pickle.loads(data)
                except Exception as error:
                    event = Failed(seq, RemoteError(type(error).__name__, str(error)))
                if not item.heard:
                    item.heard = True
                    item.actor.models.add(item.job.model_key)
                if kind == CHUNKS and type(event) is Chunks:
                    event.nbytes = len(data)
                    item.run.deliver(event)
                    continue
                if type(event) is Failed:
                    event.error = rebuild_error(event.error, event.traceback)
                return event
        return Failed(item.job.seq, RemoteError("Error", "The actor's stream ended early"))

    def _settle(self, item: _Item, event: Any) -> None:
        actor = item.actor
        with self._lock:
            actor.served += 1
            self._finished(actor)
        item.run.deliver(event)

    def _finished(self, actor: _Actor) -> None:
        with self._lock:
            actor.item = None
            actor.idle_since = time.monotonic()
            self._dispatch()

    def _actor_died(self, actor: _Actor, item: _Item, error: Exception) -> None:
        node = actor.info.get("node", "?")
        with self._lock:
            self._drop(actor)
            self._drop_dead_nodes()
            self._dispatch()
        item.run.deliver(
            Failed(
                item.job.seq,
                WorkerCrashed(
                    f"The Ray actor running model {item.job.model_id!r} on node {node} "
                    f"died ({type(error).__name__}). The pool has replaced it; other "
                    "prompts are not affected."
                ),
            )
        )

    def _drop(self, actor: _Actor) -> None:
        if actor in self._actors:
            self._actors.remove(actor)
        if self.ray.is_initialized():
            try:
                self.ray.kill(actor.handle, no_restart=True)
            except Exception:
                pass

    def _drop_dead_nodes(self) -> None:
        """When one actor dies with its node, its idle neighbours did too."""
        try:
            dead = {n["NodeID"] for n in self.ray.nodes() if not n["Alive"]}
        except Exception:
            return
        for actor in list(self._actors):
            if actor.info.get("node") in dead and actor.item is None:
                self._drop(actor)

    # ------------------------------------------------------------ stopping early
    def _cancel(self, item: _Item) -> None:
        with self._lock:
            if item in self._queue:
                self._queue.remove(item)
                return
            actor = item.actor
            if actor is None or actor.item is not item:
                return
            generator = item.generator
            if generator is None:  # dispatched, not started: nothing runs yet
                self._finished(actor)
                return
            allowance = stop_allowance(item.settings, item.cold and not item.heard, item.started)
            actor.stopping = (generator.completed(), time.monotonic() + allowance)
            actor.item = None
        try:
            self.ray.cancel(generator)
        except Exception:
            pass

    def _watch(self) -> None:
        """Free actors whose cancelled prompt ended; kill those past their grace;
        retire idle ones; learn where new ones run."""
        while not self.closed:
            time.sleep(WATCH)
            if not self.ray.is_initialized():  # the app shut Ray down: so do we
                self.shutdown()  # (any Ray call now would start a new instance)
                return
            with self._lock:
                stopping = [a for a in self._actors if a.stopping is not None]
                unknown = [a for a in self._actors if not a.info]
            if stopping:
                refs = [a.stopping[0] for a in stopping]
                done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
                now = time.monotonic()
                with self._lock:
                    for actor in stopping:
                        if actor.stopping[0] in done:
                            actor.stopping = None
                            self._finished(actor)
                        elif actor.stopping[1] <= now:
                            self._drop(actor)  # stuck: killed, replaced on demand
                    self._dispatch()
            for actor in unknown:
                self._describe(actor)
            self._retire_idle()

    def _describe(self, actor: _Actor) -> None:
        """A new actor answers once Ray has placed and started it: it is ready."""
        ready, _ = self.ray.wait([actor.describing], timeout=0)
        if ready:
            try:
                info = self.ray.get(actor.describing)
            except Exception:  # it could not start: forget it
                with self._lock:
                    self._drop(actor)
                    self._dispatch()
                return
            with self._lock:
                actor.info, actor.describing = info, None
                self._dispatch()

    def _retire_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            for actor in list(self._actors):
                idle = actor.idle_since
                if actor.item is None and idle and now - idle >= self.settings.idle_timeout:
                    self._drop(actor)

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
                    sorted(k.split("\0", 1)[0] for k in actor.models),
                    actor.served,
                    actor.item is not None,
                    node=node,
                )
            )
        return infos

    def describe(self) -> dict[str, Any]:
        if not self.ray.is_initialized():
            return {"address": self.address, "nodes": []}
        nodes = [
            f"{n['NodeManagerAddress']} {n['NodeID'][:12]} ({'alive' if n['Alive'] else 'dead'})"
            for n in self.ray.nodes()
        ]
        return {"address": self.address, "nodes": nodes}

    def idle(self) -> bool:
        with self._lock:
            return not self._queue and not self._actors

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            queued, self._queue = list(self._queue), deque()
            actors, self._actors = list(self._actors), []
        for item in queued:
            item.run.deliver(Failed(item.job.seq, PoolClosed("The Ray pool has shut down")))
        alive = self.ray.is_initialized()
        for actor in actors:
            item = actor.item
            if item is not None:
                if item.generator is not None and alive:
                    try:
                        self.ray.cancel(item.generator)
                    except Exception:
                        pass
                item.run.deliver(
                    Failed(item.job.seq, PoolClosed("The Ray pool shut down while it ran"))
                )
            self._drop(actor)


def _connect(ray: Any, address: str | None) -> str:
    """Use the app's Ray, or join ``address``, or start one on loopback only."""
    if not ray.is_initialized():
        options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
        if address:
            ray.init(address=address, **options)
        else:  # ours alone: no usage report leaves the machine unless asked for
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(
                address="local",
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                **options,
            )
    return ray.get_runtime_context().gcs_address
