"""The Ray cluster, as the Ray pool sees it: joining it, and what its nodes can run.

With ``LLM_ASYNC_POOL_RAY_ADDRESS`` (or Ray's own ``RAY_ADDRESS``) the pool
joins that cluster; otherwise it starts a local Ray instance that listens on
127.0.0.1 only; if the app has already called ``ray.init()``, it uses that.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..errors import PoolConfigError


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise PoolConfigError(
            "LLM_ASYNC_POOL=ray needs Ray: pip install 'llm-async-procpool[ray]' "
            "(or pip install ray)"
        ) from None
    return ray


class Actor:
    """A Ray actor running ``ray_worker.RayWorker``: one worker of the pool."""

    def __init__(self, handle: Any, key: str, load_timeout: float | None):
        self.handle = handle
        self.key = key  # the model it was started for
        self.info: dict[str, Any] = {}  # node and pid, once Ray has placed it
        self.models: set[str] = set()
        self.task: Any = None
        self.served: Any = None  # the last conversation it served
        self.count = 0
        self.idle_since: float | None = time.monotonic()
        self.stopping: tuple[Any, float] | None = None  # (done ref, kill deadline)
        self.describing = handle.describe.remote()  # answers once it runs
        self.place_by = None if load_timeout is None else time.monotonic() + load_timeout


class Cluster:
    def __init__(self, address: str | None, threads: int, gpus: float):
        self.ray = import_ray()
        self.address = connect(self.ray, address)
        self.threads, self.gpus = threads, gpus

    def cpus(self) -> int:
        return int(self.ray.cluster_resources().get("CPU", 1))

    def infeasible(self) -> str | None:
        """Why no node of the cluster can ever run a worker, if none can."""
        need = {"CPU": self.threads, "GPU": self.gpus}
        try:
            nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        except Exception:
            return None
        if any(all(node.get(r, 0) >= n for r, n in need.items() if n) for node in nodes):
            return None
        largest = max(nodes, key=lambda node: node.get("CPU", 0), default={})
        return (
            f"No node of the Ray cluster can run a worker: each asks for {self._asks()}, "
            f"and the largest node has {largest.get('CPU', 0):g} CPU and "
            f"{largest.get('GPU', 0):g} GPU. Lower those settings, or add a node that has them."
        )

    def unplaced(self, key: str) -> str:
        return (
            f"The Ray cluster did not place a worker for model {key.split(chr(0))[0]!r} "
            f"within LLM_ASYNC_POOL_LOAD_TIMEOUT: each asks for {self._asks()}, and no "
            "node had them free"
        )

    def _asks(self) -> str:
        gpus = f" and {self.gpus:g} GPU (LLM_ASYNC_POOL_RAY_GPUS)" if self.gpus else ""
        return f"{self.threads:g} CPU (LLM_ASYNC_POOL_THREADS){gpus}"

    def dead_nodes(self) -> set[str]:
        try:
            return {n["NodeID"] for n in self.ray.nodes() if not n["Alive"]}
        except Exception:
            return set()

    def kill(self, actor: Actor) -> None:
        if self.ray.is_initialized():
            try:
                self.ray.kill(actor.handle, no_restart=True)
            except Exception:
                pass

    def describe(self) -> dict[str, Any]:
        if not self.ray.is_initialized():
            return {"address": self.address, "nodes": []}
        nodes = [
            f"{n['NodeManagerAddress']} {n['NodeID'][:12]} ({'alive' if n['Alive'] else 'dead'})"
            for n in self.ray.nodes()
        ]
        return {"address": self.address, "nodes": nodes}


def connect(ray: Any, address: str | None) -> str:
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
