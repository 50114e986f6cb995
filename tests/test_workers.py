"""Per-worker model loading and pool size, with real worker processes."""

import asyncio
import os

import llm

from llm_async_procpool import live_pools


async def _pids(model_id, count, **options):
    model = llm.get_async_model(model_id)
    responses = [model.prompt(f"p{i}", **options) for i in range(count)]
    await asyncio.gather(*(r.text() for r in responses))
    return [await r.json() for r in responses]


async def test_pool_size_is_respected(monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "3")
    seen = await _pids("probe", 12, chunks=3, delay=0.02)
    pids = {s["pid"] for s in seen}
    assert os.getpid() not in pids
    assert len(pids) == 3
    (pool,) = [p for p in live_pools() if p.settings.workers == 3]
    assert len(pool.workers()) == 3


async def test_model_loads_once_per_worker():
    seen = await _pids("probe", 10, chunks=2, delay=0.01)
    assert {s["loads"] for s in seen} == {1}
    seen += await _pids("probe", 6, chunks=1)
    assert {s["loads"] for s in seen} == {1}


async def test_a_runtime_registered_model_is_sent_once_per_worker():
    """probe is registered with llm.pm.register, so workers cannot find it in
    their own registry: the parent sends it pickled, once per worker."""
    await _pids("probe", 4, chunks=1, delay=0.01)
    (pool,) = [p for p in live_pools() if p.kind == "process"]
    for info in pool.workers():
        assert "probe" in info.models
    seen = await _pids("probe", 4, chunks=1)
    assert {s["loads"] for s in seen} == {1}


async def test_installed_plugin_model_is_built_from_the_worker_registry():
    """llm-markov is an installed plugin: the worker builds it itself, so the
    parent's instance is never pickled."""
    import cloudpickle

    from llm_async_procpool.pools import process

    pickled = []
    real_dumps = cloudpickle.dumps

    def spy(value, *args, **kwargs):
        if isinstance(value, llm.Model):
            pickled.append(value.model_id)
        return real_dumps(value, *args, **kwargs)

    process.cloudpickle.dumps, saved = spy, process.cloudpickle.dumps
    try:
        model = llm.get_async_model("markov")
        texts = await asyncio.gather(
            *(model.prompt("a b c d", length=3, delay=0).text() for _ in range(4))
        )
    finally:
        process.cloudpickle.dumps = saved
    assert all(len(t.split()) == 3 for t in texts)
    assert "markov" not in pickled


async def test_concurrent_prompts_interleave_across_event_loops():
    """A pool outlives the event loop that started it (the CLI runs two)."""
    assert await llm.get_async_model("probe").prompt("x", chunks=1).text() == "0 "

    def in_new_loop():
        async def main():
            return await llm.get_async_model("probe").prompt("y", chunks=2).text()

        return asyncio.run(main())

    assert await asyncio.to_thread(in_new_loop) == "0 1 "
