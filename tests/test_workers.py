"""Per-worker model loading and pool size, with real worker processes."""

import asyncio
import os
import time

import llm
import pytest
from helpers import pid_alive, probe, run_script, worker_pids

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
    assert len(worker_pids(pool)) == 3


async def test_model_loads_once_per_worker(pool_kind):
    seen = await _pids("probe", 10, chunks=2, delay=0.01)
    assert {s["loads"] for s in seen} == {1}
    seen += await _pids("probe", 6, chunks=1)
    assert {s["loads"] for s in seen} == {1}


async def test_a_runtime_registered_model_is_loaded_once_per_worker(monkeypatch):
    """probe is registered with llm.pm.register, so workers forked from a fresh
    zygote cannot find it in their own registry: the parent sends it pickled,
    and each worker loads it once."""
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "306")  # a pool of its own
    await _pids("probe", 4, chunks=1, delay=0.01)
    (pool,) = [p for p in live_pools() if p.settings.idle_timeout == 306]
    for info in pool.workers():
        assert "probe" in info.models or info.role != "worker"
    seen = await _pids("probe", 4, chunks=1)
    assert {s["loads"] for s in seen} == {1}


async def test_installed_plugin_model_is_built_from_the_worker_registry(monkeypatch):
    """llm-markov is an installed plugin: fresh workers build it themselves, so
    the parent's instance is never pickled. probe, registered at runtime, is
    (once per worker that loads it), which shows the spy sees what is pickled."""
    import cloudpickle

    from llm_async_procpool import wire

    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "2")
    monkeypatch.setenv("LLM_ASYNC_POOL_MAX_TASKS", "1000")  # a pool of fresh workers
    pickled = []
    real_dumps = cloudpickle.dumps

    def spy(value, *args, **kwargs):
        if isinstance(value, llm.Model):
            pickled.append(value.model_id)
        return real_dumps(value, *args, **kwargs)

    monkeypatch.setattr(wire.cloudpickle, "dumps", spy)
    markov, probe = llm.get_async_model("markov"), llm.get_async_model("probe")
    texts = await asyncio.gather(
        *(markov.prompt("a b c d", length=3, delay=0).text() for _ in range(4))
    )
    assert all(len(t.split()) == 3 for t in texts)
    await asyncio.gather(*(probe.prompt("x", chunks=1, delay=0.05).text() for _ in range(2)))
    assert "markov" not in pickled
    # both workers hold markov already, so each loads probe itself: once each
    assert pickled.count("probe") == 2


async def test_concurrent_prompts_interleave_across_event_loops():
    """A pool outlives the event loop that started it (the CLI runs two)."""
    assert await llm.get_async_model("probe").prompt("x", chunks=1).text() == "0 "

    def in_new_loop():
        async def main():
            return await llm.get_async_model("probe").prompt("y", chunks=2).text()

        return asyncio.run(main())

    assert await asyncio.to_thread(in_new_loop) == "0 1 "


async def test_a_chunk_is_not_held_back_when_the_model_pauses():
    """Fast chunks are batched, but a batch goes out within about 2 ms even if
    the model then stalls (here for a second) before its next yield."""
    model = llm.get_async_model("probe")
    assert await model.prompt("warm", chunks=1).text() == "0 "
    response = model.prompt("x", chunks=6, pause_after=4, pause=1.0)
    arrivals = []
    async for chunk in response:
        arrivals.append((chunk, time.monotonic()))
    first = arrivals[0][1]
    assert [c for c, _ in arrivals] == [f"{i} " for i in range(6)]
    assert arrivals[4][1] - first < 0.3, "chunk 4 waited for the model's pause"
    assert arrivals[5][1] - first > 0.9


async def test_idle_workers_exit_and_come_back(monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "0.5")
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    model = llm.get_async_model("probe")
    first = await model.prompt("a", chunks=1).json()
    (pool,) = [p for p in live_pools() if p.settings.idle_timeout == 0.5]
    deadline = time.monotonic() + 5
    while worker_pids(pool):
        assert time.monotonic() < deadline, "idle worker did not exit"
        await asyncio.sleep(0.05)
    assert not pid_alive(first["pid"])
    second = await model.prompt("b", chunks=1).json()
    assert second["pid"] != first["pid"]


async def test_max_tasks_recycles_workers(monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL_MAX_TASKS", "2")
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    model = llm.get_async_model("probe")
    pids = [(await model.prompt(str(i), chunks=1).json())["pid"] for i in range(6)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
    deadline = time.monotonic() + 5
    while pid_alive(pids[0]) or pid_alive(pids[2]):
        assert time.monotonic() < deadline, "recycled workers did not exit"
        await asyncio.sleep(0.05)


async def test_workers_run_at_the_configured_niceness(monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL_NICE", "7")
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    pid = (await llm.get_async_model("probe").prompt("x", chunks=1).json())["pid"]
    assert os.getpriority(os.PRIO_PROCESS, pid) - os.getpriority(os.PRIO_PROCESS, 0) == 7


async def test_two_loops_in_two_threads_share_one_worker(monkeypatch):
    """Each prompt's events are read on its own consumer's loop; with one
    worker, consecutive prompts hand its pipe from loop to loop."""
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "307")  # a pool of its own

    def prompts(name):
        async def main():
            model = llm.get_async_model("probe")
            return [await model.prompt(f"{name}{i}", chunks=1 + i % 3).text() for i in range(30)]

        return asyncio.run(main())

    results = await asyncio.wait_for(
        asyncio.gather(asyncio.to_thread(prompts, "a"), asyncio.to_thread(prompts, "b")), 60
    )
    expected = ["".join(f"{c} " for c in range(1 + i % 3)) for i in range(30)]
    assert results == [expected, expected]


@pytest.mark.parametrize("ending", ["closed", "stopped"])
async def test_a_loop_that_ends_mid_prompt_frees_its_worker(monkeypatch, ending):
    """Nobody cancels the prompt and its loop reads no more (closed, or stopped
    and left open): the reactor takes over the worker's pipe, so the worker's
    Done still frees it."""
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "308" if ending == "closed" else "311")
    assert await probe().prompt("warm", chunks=1).text() == "0 "

    def abandon():
        async def first_chunk(response):
            async for _chunk in response:
                return

        loop = asyncio.new_event_loop()
        response = probe().prompt("left", chunks=4, delay=0.1)
        loop.run_until_complete(first_chunk(response))
        if ending == "closed":  # the worker is still generating; nobody cancels it
            loop.close()
        return loop

    left = await asyncio.to_thread(abandon)
    started_at = time.monotonic()
    assert await asyncio.wait_for(probe().prompt("next", chunks=2).text(), 15) == "0 1 "
    assert time.monotonic() - started_at < 5
    left.close()


def test_recycled_workers_across_loops_leak_no_fds(monkeypatch):
    """A worker per prompt, prompts from loop after loop: each event pipe is
    closed once no loop holds it, and a recycled fd number serves again."""
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_MAX_TASKS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "309")  # a pool of its own

    async def some(count):
        return [await probe().prompt(str(i), chunks=2).text() for i in range(count)]

    assert asyncio.run(some(2)) == ["0 1 "] * 2
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(6):
        assert asyncio.run(some(3)) == ["0 1 "] * 3
    time.sleep(0.5)  # the last recycled worker's exit is settled
    assert len(os.listdir("/proc/self/fd")) <= before + 2


def test_a_loop_that_cannot_watch_pipes_is_served_by_the_reactor(monkeypatch):
    """Windows' proactor loop has no add_reader: the reactor reads for it."""
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "310")  # a pool of its own

    class NoReaders(asyncio.SelectorEventLoop):
        def add_reader(self, *args):
            raise NotImplementedError

    async def main():
        return [await probe().prompt(str(i), chunks=3).text() for i in range(3)]

    loop = NoReaders()
    try:
        texts = loop.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        loop.close()
    assert texts == ["0 1 2 "] * 3


def test_a_loop_that_cannot_watch_pipes_works_on_a_fresh_process_first_prompt(tmp_path):
    """In a fresh single-threaded process the first worker is forked before the
    pool has a reactor; the reactor, made right after, takes the pipe."""
    result, took = run_script(
        tmp_path,
        """
        class NoReaders(asyncio.SelectorEventLoop):
            def add_reader(self, *args):
                raise NotImplementedError

        async def main():
            return [await probe().prompt(str(i), chunks=3).text() for i in range(3)]

        if __name__ == "__main__":
            llm.pm.register(plugin_models, name="procpool-test-models")
            loop = NoReaders()
            try:
                print(loop.run_until_complete(asyncio.wait_for(main(), 15)))
            finally:
                loop.close()
        """,
        LLM_ASYNC_POOL_SHARE="off",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['0 1 2 ', '0 1 2 ', '0 1 2 ']"
    assert took < 30


async def test_a_worker_grown_past_max_memory_is_retired_between_prompts(monkeypatch):
    """LLM_ASYNC_POOL_MAX_MEMORY: a model that keeps 40 MB more per prompt gets
    a fresh worker once its worker holds more than 100 MB of its own."""
    from llm_async_procpool.status import status

    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_MAX_MEMORY", "100")
    model = probe()
    pids, growths = [], []
    for _ in range(6):
        response = model.prompt("x", chunks=1, leak=40)
        await response.text()
        pids.append((await response.json())["pid"])
        (pool,) = [p for p in live_pools() if p.settings.max_memory == 100]
        (report,) = [p for p in status()["live_pools"] if p["size"] == 1 and p["pool"] == "process"]
        if len(set(pids)) == 1:  # until the first worker is retired, its growth shows
            # (it may be retired already: the check runs off the loop, after the prompt)
            workers = [w for w in report["workers"] if w["role"] == "worker"]
            growths += [w["growth"] for w in workers if w["growth"] is not None]
        await asyncio.sleep(0.3)
    assert any(g >= 30 * 2**20 for g in growths), growths  # 40 MB kept per prompt
    assert len(set(pids)) >= 2, pids  # retired once past the limit, replaced
    assert pids.count(pids[0]) <= 3  # 40, 80, 120 MB kept: not a fourth prompt
    assert pool is not None


@pytest.mark.parametrize("kind", ["process", "thread"])
async def test_a_conversation_goes_back_to_the_worker_that_served_its_last_turn(monkeypatch, kind):
    """Conversation affinity: each turn of a conversation lands where its
    previous turn ran (where a model's cache may hold its prefix), while that
    worker is idle; a busy one is never waited for."""
    monkeypatch.setenv("LLM_ASYNC_POOL", kind)
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "2")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "320")
    model = probe()
    chats = [model.conversation() for _ in range(2)]
    where = {0: [], 1: []}

    async def turn(i):
        response = chats[i].prompt(f"chat {i}", chunks=2, delay=0.02)
        await response.text()
        seen = await response.json()
        where[i].append((seen["pid"], seen["instance"]))

    await asyncio.gather(turn(0), turn(1))  # both workers busy: each chat gets one
    assert where[0][0] != where[1][0]
    for _ in range(4):
        for i in (1, 0):  # one at a time, alternating: either worker is idle
            await turn(i)
    assert len(set(where[0])) == 1 and len(set(where[1])) == 1, where
    # with its worker busy, a turn goes to the other at once
    blocker = asyncio.ensure_future(chats[1].prompt("long", chunks=20, delay=0.05).text())
    await asyncio.sleep(0.3)
    started = time.monotonic()
    response = chats[1].prompt("meanwhile", chunks=1)
    await response.text()
    assert time.monotonic() - started < 0.8
    seen = await response.json()
    assert (seen["pid"], seen["instance"]) == where[0][0]
    await blocker


@pytest.mark.parametrize("kind", ["process", "thread"])
async def test_two_chats_begun_one_at_a_time_keep_a_worker_each(monkeypatch, kind):
    """A conversation's first turn takes an idle worker that holds no
    conversation, not the one another chat just used: two chats taking turns
    one prompt at a time (people chatting with a server) keep a worker each."""
    monkeypatch.setenv("LLM_ASYNC_POOL", kind)
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "2")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "322")
    model = probe()
    await asyncio.gather(*(model.prompt("warm", chunks=2, delay=0.1).text() for _ in range(2)))
    chats = [model.conversation() for _ in range(2)]
    where = {0: [], 1: []}
    for _ in range(3):
        for i in (0, 1):
            response = chats[i].prompt(f"chat {i}", chunks=1)
            await response.text()
            seen = await response.json()
            where[i].append((seen["pid"], seen["instance"]))
    assert len(set(where[0])) == 1 and len(set(where[1])) == 1, where
    assert where[0][0] != where[1][0], where


async def test_an_async_app_looking_a_model_up_starts_the_zygote_before_its_first_prompt(
    monkeypatch,
):
    """The zygote (llm and every plugin imported: a second or more when it starts
    fresh) starts when an async app looks models up, as a server listing them
    does, so the first prompt does not wait for it. A lookup with no event loop
    running (the llm CLI, a sync script) starts nothing."""
    monkeypatch.setenv("LLM_ASYNC_POOL", "process")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "421")  # a pool of its own

    def zygotes():
        pools = [p for p in live_pools() if p.settings.idle_timeout == 421]
        return [w.pid for p in pools for w in p.workers() if w.role == "zygote"]

    await asyncio.to_thread(llm.get_async_model, "probe")  # no loop in that thread
    assert zygotes() == []
    model = llm.get_async_model("probe")
    (zygote,) = zygotes()
    assert pid_alive(zygote)
    assert (await model.prompt("x", chunks=1).json())["pid"] != zygote
    assert zygotes() == [zygote]  # the prompt's worker came from it
