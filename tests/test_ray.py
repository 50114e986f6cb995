"""The Ray backend passes what every backend must, on a real two-node Ray
cluster on loopback (the ray_cluster fixture), with real actors."""

import asyncio
import json
import os
import subprocess
import time

import llm
import pytest
from helpers import probe

from llm_async_procpool import WorkerCrashed, live_pools

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ray_pool(ray_cluster, monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL", "ray")
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "2")
    return ray_cluster


def the_pool():
    (pool,) = [p for p in live_pools() if p.kind == "ray"]
    return pool


def test_every_ray_node_listens_on_loopback(ray_cluster):
    import ray

    nodes = ray.nodes()
    assert len(nodes) == 2
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}


async def test_a_cancel_before_the_first_chunk_of_a_loaded_model_gets_only_the_grace(
    ray_pool, monkeypatch
):
    """The load allowance protects a first load, not a warm model stuck before
    its first chunk: that actor is killed after the grace period."""
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_GRACE", "0.5")
    monkeypatch.setenv("LLM_ASYNC_POOL_LOAD_TIMEOUT", "60")
    assert await probe().prompt("warm", chunks=1).text() == "0 "
    task = asyncio.ensure_future(probe().prompt("x", chunks=3, fail="stuck").text())
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    assert await asyncio.wait_for(probe().prompt("y", chunks=2).text(), 30) == "0 1 "
    assert time.monotonic() - started < 20  # a new actor's start, not the load allowance


@pytest.mark.parametrize(
    "setting, value", [("LLM_ASYNC_POOL_RAY_GPUS", "1"), ("LLM_ASYNC_POOL_THREADS", "2")]
)
async def test_a_worker_no_node_can_run_fails_at_once_naming_the_setting(
    ray_pool, monkeypatch, setting, value
):
    from llm_async_procpool import PoolConfigError

    monkeypatch.setenv(setting, value)  # each node has 1 CPU and no GPU
    started = time.monotonic()
    with pytest.raises(PoolConfigError) as info:
        await asyncio.wait_for(probe().prompt("x").text(), 30)
    assert time.monotonic() - started < 10
    assert setting in str(info.value) and "No node of the Ray cluster" in str(info.value)


async def test_a_prompt_sent_to_an_actor_that_died_idle_is_placed_again(ray_pool):
    await asyncio.gather(*(probe().prompt(str(i), chunks=2, delay=0.05).text() for i in range(2)))
    pids = [w.pid for w in the_pool().workers() if w.pid]
    assert len(pids) == 2
    os.kill(pids[0], 9)  # it dies idle: the pool has not heard of it yet
    texts = await asyncio.wait_for(
        asyncio.gather(*(probe().prompt(str(i), chunks=2, delay=0.05).text() for i in range(2))),
        60,
    )
    assert texts == ["0 1 "] * 2


async def test_a_killed_actor_fails_its_prompt_and_the_next_succeeds(ray_pool):
    with pytest.raises(WorkerCrashed) as info:
        await probe().prompt("x", chunks=10, delay=0.01, fail="kill", fail_after=3).text()
    assert "on node" in str(info.value)
    texts = await asyncio.gather(*(probe().prompt(str(i), chunks=2).text() for i in range(3)))
    assert texts == ["0 1 "] * 3


async def test_prompts_run_on_both_nodes(ray_pool):
    responses = [probe().prompt(str(i), chunks=5, delay=0.05) for i in range(4)]
    await asyncio.gather(*(r.text() for r in responses))
    pids = {(await r.json())["pid"] for r in responses}
    nodes = {w.node for w in the_pool().workers() if w.pid in pids}
    assert len(nodes) == 2


async def test_keys_reach_the_model_and_stay_out_of_rays_logs(ray_pool, monkeypatch):
    import ray

    monkeypatch.setenv("LLM_ASYNC_POOL_MODELS", '{"probe-key": "ray"}')
    secret = "sk-ray-secret-0123456789"
    model = llm.get_async_model("probe-key")
    assert await model.prompt("hi", key=secret).text() == "got a key of length 24"
    session = ray._private.worker._global_node.get_session_dir_path()
    found = subprocess.run(["grep", "-rl", secret, session], capture_output=True, text=True)
    assert found.stdout == ""


@pytest.mark.asyncio(loop_factories=["asyncio"])  # it removes the second node for good
async def test_removing_a_node_mid_prompt_gives_worker_crashed(ray_pool):
    cluster, worker_node = ray_pool
    await asyncio.gather(*(probe().prompt(str(i), chunks=1).text() for i in range(2)))
    pool = the_pool()
    remote = [w for w in pool.workers() if w.node == worker_node.node_id]
    assert remote, "no actor on the node to remove"
    responses = [probe().prompt(str(i), chunks=200, delay=0.02) for i in range(2)]
    tasks = [asyncio.ensure_future(r.text()) for r in responses]
    await asyncio.sleep(1.0)
    await asyncio.to_thread(cluster.remove_node, worker_node)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert any(isinstance(r, WorkerCrashed) for r in results), results
    texts = await asyncio.gather(*(probe().prompt(str(i), chunks=2).text() for i in range(3)))
    assert texts == ["0 1 "] * 3
    assert json.dumps([w.node for w in pool.workers()]).count(worker_node.node_id) == 0


async def test_status_shows_the_cluster_its_nodes_and_each_actors_node(ray_pool):
    from llm_async_procpool.status import status

    await asyncio.gather(*(probe().prompt(str(i), chunks=2, delay=0.02).text() for i in range(2)))
    (report,) = [p for p in status()["live_pools"] if p["pool"] == "ray"]
    assert report["address"].startswith("127.0.0.1:")
    assert report["nodes"] and all(n.startswith("127.0.0.1 ") for n in report["nodes"])
    placed = [w for w in report["workers"] if w["node"]]  # not those still starting
    assert placed and all(w["pid"] for w in placed)
    assert any("probe" in w["models"] for w in placed)


async def test_choosing_ray_without_ray_says_how_to_install_it(monkeypatch):
    import sys

    from llm_async_procpool import PoolConfigError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    monkeypatch.setenv("LLM_ASYNC_POOL", "ray")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "421")  # not the live Ray pool
    with pytest.raises(PoolConfigError) as info:
        await probe().prompt("x").text()
    assert "pip install 'llm-async-procpool[ray]'" in str(info.value)
