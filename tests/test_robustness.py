"""The contract every backend keeps (process, thread, and Ray when installed:
the ``pool_kind`` fixture): cancellation, timeouts, crashes, backpressure and
shutdown; then what only worker processes add (a hard stop, bad input,
orphans). Time bounds are generous: CI machines are noisy."""

import asyncio
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import llm
import pytest
from helpers import (
    descendants,
    pid_alive,
    probe,
    process_pool,
    started,
    wait_for_file,
    worker_pids,
)

from llm_async_procpool import (
    PoolClosed,
    PromptNotSendable,
    PromptTimeout,
    WorkerCrashed,
    live_pools,
)
from llm_async_procpool.cells import WINDOW
from llm_async_procpool.outbox import MAX_BATCH


# ------------------------------------------------------------------ cancelling
async def test_cancelled_task_stops_the_model_and_runs_its_finally(pool_kind, tmp_path):
    marker = tmp_path / "finally.json"
    response = probe().prompt("x", chunks=10_000, delay=0.01, marker=str(marker))
    await started(response)
    task = asyncio.create_task(response.text())
    await asyncio.sleep(0.05)
    stopped = time.time()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    report = await asyncio.to_thread(wait_for_file, marker)
    latency = report["at"] - stopped
    bound = 1.5 if pool_kind == "ray" else 0.5  # Ray: the next yield, or its 1 s retry
    assert latency < bound, f"model stopped {latency * 1000:.0f} ms after cancel"
    assert report["yielded"] < 1000
    assert pid_alive(report["pid"])  # stopped cooperatively, not killed


async def test_consumer_that_walks_away_stops_the_model(pool_kind, tmp_path):
    marker = tmp_path / "finally.json"
    response = probe().prompt("x", chunks=10_000, delay=0.01, marker=str(marker))
    async for _chunk in response:
        break
    stopped = time.time()
    del response, _chunk
    gc.collect()
    report = await asyncio.to_thread(wait_for_file, marker)
    # Ray delivers a cancel at the actor's next yield, or within its 1 s retry
    assert report["at"] - stopped < (1.5 if pool_kind == "ray" else 0.5)
    assert report["yielded"] < 1000


async def test_wait_for_timeout_stops_the_model(pool_kind, tmp_path):
    assert await probe().prompt("warm", chunks=1).text() == "0 "  # a worker is up
    marker = tmp_path / "finally.json"
    response = probe().prompt("x", chunks=10_000, delay=0.01, marker=str(marker))
    with pytest.raises(asyncio.TimeoutError):  # TimeoutError since Python 3.11
        await asyncio.wait_for(response.text(), 0.3)
    stopped = time.time()
    report = await asyncio.to_thread(wait_for_file, marker)
    assert report["at"] - stopped < (1.5 if pool_kind == "ray" else 0.5)


async def test_worker_takes_the_next_prompt_after_a_cancel(pool_kind, monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    first = probe().prompt("first", chunks=1)
    await first.text()
    response = probe().prompt("x", chunks=10_000, delay=0.01)
    await started(response)
    task = asyncio.create_task(response.text())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    follow = probe().prompt("y", chunks=2)
    assert await follow.text() == "0 1 "
    assert (await follow.json())["pid"] == (await first.json())["pid"]  # the same worker


# ------------------------------------------------------ hard stop and timeout
async def test_stuck_model_is_killed_after_the_grace_period(monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL_GRACE", "0.5")
    bystander = probe().prompt("b", chunks=60, delay=0.025)
    await started(bystander, 1)
    bystander_task = asyncio.create_task(bystander.text())
    stuck = probe().prompt("x", chunks=5, fail="stuck", fail_after=1)
    await started(stuck, 1)
    busy = worker_pids(process_pool(), busy=True)
    assert len(busy) == 2
    task = asyncio.create_task(stuck.text())
    await asyncio.sleep(0.05)
    task.cancel()
    cancelled_at = time.monotonic()
    while all(pid_alive(pid) for pid in busy):
        assert time.monotonic() - cancelled_at < 5, "stuck worker was not killed"
        await asyncio.sleep(0.01)
    killed_after = time.monotonic() - cancelled_at
    assert killed_after >= 0.4  # it had its grace period first
    (survivor,) = [pid for pid in busy if pid_alive(pid)]
    # the other worker's prompt is untouched
    assert await bystander_task == "".join(f"{i} " for i in range(60))
    assert (await bystander.json())["pid"] == survivor
    assert await probe().prompt("after", chunks=2).text() == "0 1 "


async def test_timeout_raises_and_stops_the_worker(pool_kind, monkeypatch, tmp_path):
    assert await probe().prompt("warm up", chunks=1).text() == "0 "
    monkeypatch.setenv("LLM_ASYNC_POOL_TIMEOUT", "0.4")
    marker = tmp_path / "finally.json"
    response = probe().prompt("x", chunks=1000, delay=0.01, marker=str(marker))
    chunks = []
    started_at = time.monotonic()
    with pytest.raises(PromptTimeout) as info:
        async for chunk in response:
            chunks.append(chunk)
    elapsed = time.monotonic() - started_at
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, asyncio.TimeoutError)
    assert "'probe'" in str(info.value) and "LLM_ASYNC_POOL_TIMEOUT=0.4" in str(info.value)
    assert 0.3 < elapsed < 3
    assert chunks  # what came before the timeout was delivered
    report = await asyncio.to_thread(wait_for_file, marker)
    assert report["yielded"] < 1000
    assert await probe().prompt("next", chunks=1).text() == "0 "


async def test_timeout_kills_a_stuck_worker(monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL_TIMEOUT", "0.3")
    monkeypatch.setenv("LLM_ASYNC_POOL_GRACE", "0.3")
    with pytest.raises(PromptTimeout):
        await probe().prompt("x", chunks=3, fail="stuck", fail_after=0).text()
    pids = worker_pids(process_pool(), busy=True)
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert await probe().prompt("next", chunks=1).text() == "0 "


# ------------------------------------------------------------------ crashes
@pytest.mark.parametrize(
    "fail, expected",
    [
        ("kill", "killed by SIGKILL (exit code -9)"),
        ("exit", "exited with code 7"),
        ("segv", "killed by SIGSEGV (exit code -11)"),
    ],
)
async def test_worker_crash_fails_the_prompt_fast_and_the_pool_recovers(pool_kind, fail, expected):
    if pool_kind == "thread":
        pytest.skip("a crash in a thread is a crash of the app itself")
    response = probe().prompt("x", chunks=10, delay=0.01, fail=fail, fail_after=3)
    chunks = []
    with pytest.raises(WorkerCrashed) as info:
        async for chunk in response:
            chunks.append(chunk)
            crash_seen = time.monotonic()
    assert time.monotonic() - crash_seen < 1.0
    if pool_kind == "process":  # every chunk the worker wrote before it died
        assert chunks == ["0 ", "1 ", "2 "]
    else:  # an actor yields from another thread: the last chunk may die with it
        assert chunks in (["0 ", "1 "], ["0 ", "1 ", "2 "])
    message = str(info.value)
    assert "'probe'" in message
    assert expected in message if pool_kind == "process" else "Ray actor" in message
    texts = await asyncio.gather(*(probe().prompt(f"{i}", chunks=2).text() for i in range(4)))
    assert texts == ["0 1 "] * 4


async def test_prompts_queued_behind_a_crash_run_normally(pool_kind, monkeypatch):
    if pool_kind == "thread":
        pytest.skip("a crash in a thread is a crash of the app itself")
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    crashing = probe().prompt("x", chunks=5, delay=0.02, fail="kill", fail_after=2)
    queued = [probe().prompt(f"q{i}", chunks=3) for i in range(3)]
    results = await asyncio.gather(
        crashing.text(), *(q.text() for q in queued), return_exceptions=True
    )
    assert isinstance(results[0], WorkerCrashed)
    assert results[1:] == ["0 1 2 "] * 3


# ------------------------------------------------------------------ backpressure
async def test_slow_consumer_pauses_the_worker(pool_kind, tmp_path):
    marker = tmp_path / "finally.json"
    response = probe().prompt("x", chunks=10_000_000, marker=str(marker))
    iterator = await started(response, 10)
    await asyncio.sleep(0.5)  # the model would yield millions of chunks by now
    del iterator, response
    gc.collect()
    report = await asyncio.to_thread(wait_for_file, marker)
    if pool_kind == "ray":  # a window ahead in the pool and in the actor, and Ray's buffer
        assert report["yielded"] <= 4 * WINDOW + 2 * MAX_BATCH
    else:
        assert report["yielded"] <= WINDOW + MAX_BATCH + 10


# ------------------------------------------------------------------ bad input
async def test_unpicklable_option_value_is_a_clear_error():
    with pytest.raises(PromptNotSendable) as info:
        await probe().prompt("x", payload=threading.Lock()).text()
    message = str(info.value)
    assert "option 'payload'" in message and "'probe'" in message
    assert "LLM_ASYNC_POOL=thread" in message
    assert await probe().prompt("x", chunks=1).text() == "0 "


async def test_large_attachment_and_large_prompt():
    big = os.urandom(50 * 1024 * 1024)
    response = probe().prompt(
        "x", attachments=[llm.Attachment(type="image/png", content=big)], chunks=1
    )
    assert (await response.json())["attachments"][0]["size"] == len(big)
    del big
    text = "word " * (2 * 1024 * 1024)  # 10 MB
    response = probe().prompt(text, chunks=1)
    assert len((await response.json())["prompt"]) == len(text)


async def test_keys_stay_out_of_errors_and_process_arguments(monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL", "process")  # auto would run a key model in a thread
    secret = "sk-very-secret-0123456789"
    model = llm.get_async_model("probe-key")
    assert await model.prompt("hi", key=secret).text() == "got a key of length 25"
    with pytest.raises(PromptNotSendable) as info:
        await model.prompt("hi", key=secret, payload=threading.Lock()).text()
    assert secret not in str(info.value)
    for pid in descendants(os.getpid()):
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert secret.encode() not in cmdline.read()
    from llm_async_procpool.wire import encode_job

    job = encode_job(model.sync_model, model.prompt("hi").prompt, True, None, secret)
    assert secret not in repr(job)


# ------------------------------------------------------------------ shutdown
ORPHAN_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys, threading, time
    import llm
    import plugin_models
    from llm_async_procpool import live_pools


    async def run(pids_file, fail, hold):
        model = llm.get_async_model("probe")
        responses = [
            model.prompt(str(i), chunks=100000, delay=0.01, fail=fail, fail_after=1)
            for i in range(3)
        ]
        tasks = [asyncio.ensure_future(r.text()) for r in responses]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until both workers are running prompts
            workers = [w for p in live_pools() for w in p.workers()]
            if sum(w.busy for w in workers) == 2:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        pids = [w.pid for w in workers]
        with open(pids_file + ".tmp", "w") as f:
            f.write(json.dumps(pids))
        os.rename(pids_file + ".tmp", pids_file)
        if hold:  # still in flight when the interpreter exits
            await asyncio.sleep(3600)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


    def main():
        llm.pm.register(plugin_models, name="procpool-test-models")
        pids_file, mode = sys.argv[1], sys.argv[2]
        fail = "stuck" if mode == "stuck" else None
        if mode == "idle":  # asyncio.run() has returned; workers are idle
            asyncio.run(run(pids_file, fail, hold=False))
            return
        loop_thread = threading.Thread(
            target=asyncio.run, args=(run(pids_file, fail, hold=True),), daemon=True
        )
        loop_thread.start()
        deadline = time.monotonic() + 30
        while not os.path.exists(pids_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        if mode == "killed":  # wait here for the test's SIGKILL
            time.sleep(60)


    if __name__ == "__main__":
        main()
    """
)


def orphan_script(tmp_path, mode, **environ):
    """The command, environment and pids file for a run of ORPHAN_SCRIPT."""
    script = tmp_path / "script.py"
    script.write_text(ORPHAN_SCRIPT)
    pids_file = tmp_path / "pids.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path]),
        "LLM_ASYNC_POOL_WORKERS": "2",
        **environ,
    }
    return [sys.executable, str(script), str(pids_file), mode], env, pids_file


@pytest.mark.parametrize("mode", ["idle", "in-flight", "stuck"])
def test_no_orphans_after_interpreter_exit(tmp_path, mode):
    command, env, pids_file = orphan_script(tmp_path, mode, LLM_ASYNC_POOL_GRACE="1")
    started_at = time.monotonic()
    result = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    pids = json.loads(pids_file.read_text())
    assert len(pids) >= 2  # workers, and the template they were forked from
    deadline = time.monotonic() + 5
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if pid_alive(pid)]
    assert time.monotonic() - started_at < 30


async def test_shutdown_fails_running_and_queued_prompts_cleanly(pool_kind, monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    responses = [probe().prompt(str(i), chunks=1000, delay=0.01) for i in range(3)]
    first = await started(responses[0], 1)
    tasks = [asyncio.ensure_future(r.text()) for r in responses[1:]]
    rest = asyncio.ensure_future(_drain(first))
    await asyncio.sleep(0.1)
    (pool,) = [p for p in live_pools() if p.kind == pool_kind and p.settings.workers == 1]
    await asyncio.to_thread(pool.shutdown)
    results = await asyncio.wait_for(asyncio.gather(rest, *tasks, return_exceptions=True), 10)
    assert [type(r) for r in results] == [PoolClosed] * 3
    # a new pool takes over for later prompts
    assert await probe().prompt("after", chunks=1).text() == "0 "


async def _drain(iterator):
    async for _ in iterator:
        pass


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    """SIGKILL (or the OOM killer) gives the parent no chance to clean up: the
    workers notice on their own, mid-prompt, and exit."""
    command, env, pids_file = orphan_script(tmp_path, "killed")
    parent = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not pids_file.exists():
            assert time.monotonic() < deadline, "the script did not start its workers"
            time.sleep(0.05)
        pids = json.loads(pids_file.read_text())
        assert len(pids) >= 2 and all(pid_alive(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 5
    while any(pid_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "workers outlived their killed parent"
        time.sleep(0.05)
