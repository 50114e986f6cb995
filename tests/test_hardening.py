"""What a hostile model or caller does, and what must happen instead: no lost
chunks, no hangs, no orphans. Real worker processes throughout; each test
that could hang on a broken pool has its own bound."""

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
    SCRIPT_HEAD,
    descendants,
    pid_alive,
    probe,
    process_pool,
    run_script,
    started,
    wait_for_file,
    worker_pids,
)

from llm_async_procpool import (
    ModelNotLoadable,
    PoolClosed,
    RemoteError,
    ReplyNotSendable,
    WorkerCrashed,
    live_pools,
)


# ------------------------------------------------------------------ data loss
@pytest.mark.timeout(30)
async def test_an_unpicklable_chunk_fails_the_prompt_and_loses_nothing_silently():
    response = probe().prompt("x", chunks=6, odd_at=3)
    chunks = []
    with pytest.raises(ReplyNotSendable) as info:
        async for chunk in response:
            chunks.append(chunk)
    assert chunks == ["0 ", "1 ", "2 "]  # everything before it, nothing after
    message = str(info.value)
    assert "chunk 4" in message and "_thread.lock" in message and "'probe'" in message
    # the worker's flusher survived: a stalled batch still leaves within ~2 ms
    response = probe().prompt("y", chunks=6, pause_after=4, pause=1.0)
    arrivals = []
    async for _chunk in response:
        arrivals.append(time.monotonic())
    assert arrivals[4] - arrivals[0] < 0.3


@pytest.mark.parametrize("kind", ["process", "thread"])
async def test_a_model_registered_again_under_its_id_runs_its_new_version(kind, monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL", kind)

    def plugin(version):
        class Versioned(llm.Model):
            model_id = "versioned"

            def execute(self, prompt, stream, response, conversation):
                yield f"version {version}"

        class Plugin:
            @llm.hookimpl
            def register_models(self, register):
                register(Versioned())

        return Plugin()

    first = plugin(1)
    llm.pm.register(first, name="versioned")
    try:
        assert await llm.get_async_model("versioned").prompt("x").text() == "version 1"
        llm.pm.unregister(name="versioned")
        llm.pm.register(plugin(2), name="versioned")
        assert llm.get_model("versioned").prompt("x").text() == "version 2"
        assert await llm.get_async_model("versioned").prompt("x").text() == "version 2"
    finally:
        llm.pm.unregister(name="versioned")


# ------------------------------------------------------------------ hangs
@pytest.mark.timeout(30)
async def test_an_unpicklable_reply_ends_the_prompt_with_a_clear_error():
    response = probe().prompt("x", chunks=2, odd_json="lock")
    with pytest.raises(ReplyNotSendable) as info:
        await asyncio.wait_for(response.text(), 10)
    assert "response.response_json" in str(info.value) and "lock" in str(info.value)
    assert await probe().prompt("y", chunks=1).text() == "0 "  # the worker serves on
    # what cloudpickle can carry (a lambda, say) arrives as it is
    response = probe().prompt("x", chunks=2, odd_json="lambda")
    assert await asyncio.wait_for(response.text(), 10) == "0 1 "
    assert callable((await response.json())["callback"])


@pytest.mark.timeout(30)
async def test_an_exception_that_cannot_be_pickled_or_printed_still_ends_the_prompt():
    response = probe().prompt("x", chunks=3, fail="bad_str", fail_after=1)
    with pytest.raises(Exception) as info:
        await asyncio.wait_for(response.text(), 10)
    assert type(info.value).__name__ in ("BadStr", "RemoteError")
    assert await probe().prompt("y", chunks=1).text() == "0 "


@pytest.mark.timeout(30)
async def test_an_unpicklable_chunk_still_batched_when_the_model_raises():
    response = probe().prompt("x", chunks=6, odd_at=2, fail="value", fail_after=3)
    with pytest.raises((ReplyNotSendable, ValueError)):
        await asyncio.wait_for(response.text(), 10)
    assert await probe().prompt("y", chunks=1).text() == "0 "


def test_a_reply_holding_a_class_from_main_arrives(tmp_path):
    """The notebook case: the model and the class it puts in response_json live
    in __main__, which a worker does not have."""
    result, _ = run_script(
        tmp_path,
        """
        class Thing:
            def __init__(self, name):
                self.name = name

        class MainModel(llm.Model):
            model_id = "main-model"

            def execute(self, prompt, stream, response, conversation):
                response.response_json = {"thing": Thing("made in " + str(os.getpid()))}
                yield "ok"

        class Plugin:
            @llm.hookimpl
            def register_models(self, register):
                register(MainModel())

        async def main():
            response = llm.get_async_model("main-model").prompt("x")
            text = await asyncio.wait_for(response.text(), 20)
            thing = (await response.json())["thing"]
            print(text, thing.name != "made in " + str(os.getpid()))

        if __name__ == "__main__":
            llm.pm.register(Plugin(), name="main-plugin")
            asyncio.run(main())
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "True"]


def test_interpreter_exit_is_bounded_while_threads_keep_prompting(tmp_path):
    result, took = run_script(
        tmp_path,
        """
        def stuck():
            asyncio.run(probe().prompt("s", chunks=5, fail="stuck", fail_after=1).text())

        def keep_prompting():
            while True:
                try:
                    asyncio.run(probe().prompt("k", chunks=1).text())
                except Exception as error:
                    print(type(error).__name__, flush=True)
                    return

        if __name__ == "__main__":
            llm.pm.register(plugin_models, name="procpool-test-models")
            threading.Thread(target=stuck, daemon=True).start()
            from llm_async_procpool import live_pools
            while not any(w.busy for p in live_pools() for w in p.workers()):
                time.sleep(0.05)  # the stuck prompt runs in a worker now
            threading.Thread(target=keep_prompting, daemon=True).start()
            time.sleep(0.5)
        """,
        LLM_ASYNC_POOL_GRACE="1",
    )
    assert result.returncode == 0, result.stderr
    assert took < 20
    assert "PoolClosed" in result.stdout


def test_a_prompt_from_a_thread_after_main_returned_gets_pool_closed(tmp_path):
    result, took = run_script(
        tmp_path,
        """
        def late():
            time.sleep(0.5)
            try:
                asyncio.run(probe().prompt("late", chunks=1).text())
                print("ran")
            except PoolClosed as error:
                print("PoolClosed:", error)

        from llm_async_procpool import PoolClosed

        if __name__ == "__main__":
            llm.pm.register(plugin_models, name="procpool-test-models")
            llm.get_async_models()  # plugins load now, not in the late thread
            threading.Thread(target=late).start()  # not a daemon: exit waits for it
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PoolClosed: The interpreter is shutting down")
    assert took < 20


@pytest.mark.timeout(60)
async def test_closing_a_loop_mid_spawn_returns_the_capacity(monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "301")  # a fresh pool

    def abandon():
        loop = asyncio.new_event_loop()
        task = loop.create_task(probe().prompt("abandoned", chunks=3).text())
        loop.run_until_complete(asyncio.sleep(0.005))  # the pool is starting a worker
        loop.close()  # without finishing or cancelling the task
        return task

    for _ in range(3):
        await asyncio.to_thread(abandon)
    texts = await asyncio.wait_for(
        asyncio.gather(*(probe().prompt(str(i), chunks=2).text() for i in range(3))), 20
    )
    assert texts == ["0 1 "] * 3


async def test_the_reactor_survives_an_error_in_its_own_work(monkeypatch, capfd):
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "302")
    assert await probe().prompt("x", chunks=1).text() == "0 "
    pool = process_pool(idle_timeout=302)
    real_tick = pool._tick
    failed = []

    def tick():
        if not failed:
            failed.append(True)
            raise RuntimeError("a bug in the tick")
        return real_tick()

    monkeypatch.setattr(pool._reactor, "_tick", tick)
    pool._reactor.wake()
    await asyncio.sleep(0.2)
    assert failed and pool._reactor.thread.is_alive()
    assert await asyncio.wait_for(probe().prompt("y", chunks=2).text(), 10) == "0 1 "
    assert "a bug in the tick" in capfd.readouterr().err


@pytest.mark.timeout(60)
async def test_a_worker_death_is_seen_even_when_a_helper_holds_its_pipes():
    response = probe().prompt("x", chunks=5, delay=0.01, fail="fork_then_exit", fail_after=2)
    started_at = time.monotonic()
    with pytest.raises(WorkerCrashed) as info:
        await asyncio.wait_for(response.text(), 20)
    assert time.monotonic() - started_at < 3
    assert "exited with code 3" in str(info.value)
    assert await asyncio.wait_for(probe().prompt("y", chunks=1).text(), 10) == "0 "


# ------------------------------------------------------------------ wrong errors, orphans
@pytest.mark.timeout(120)
async def test_a_grace_kill_never_fails_an_innocent_queued_prompt(monkeypatch):
    """A cancelled model whose finally takes about the grace period races the
    kill; the prompt queued behind it must never see WorkerCrashed."""
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_GRACE", "0.02")
    outcomes = []
    for i in range(150):
        doomed = probe().prompt(f"d{i}", chunks=1000, delay=0.002, finally_sleep=0.02)
        iterator = await started(doomed, 1)
        task = asyncio.ensure_future(_drain(iterator))
        innocent = asyncio.ensure_future(probe().prompt(f"i{i}", chunks=1).text())
        await asyncio.sleep(0)
        task.cancel()
        try:
            outcomes.append(await asyncio.wait_for(innocent, 10))
        except WorkerCrashed as error:
            outcomes.append(str(error))
    assert outcomes == ["0 "] * 150


async def _drain(iterator):
    async for _ in iterator:
        pass


ORPHAN_BODY = """
async def run(pids_file, fail):
    model = probe()
    tasks = [
        asyncio.ensure_future(model.prompt(str(i), chunks=1000, delay=0.01, fail=fail,
                                           fail_after=1).text())
        for i in range(2)
    ]
    await asyncio.sleep(2.0)
    with open(pids_file + ".tmp", "w") as f:
        f.write(json.dumps([p for p in descendants_of(os.getpid())]))
    os.rename(pids_file + ".tmp", pids_file)
    await asyncio.sleep(3600)

def descendants_of(root):
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from helpers import descendants
    return descendants(root)

if __name__ == "__main__":
    llm.pm.register(plugin_models, name="procpool-test-models")
    asyncio.run(run(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.timeout(90)
def test_every_process_ends_within_2s_of_the_parent_even_in_a_c_call(tmp_path):
    """SIGKILL the parent while both workers sit in a C call that holds the GIL:
    workers, templates and the forkserver must all go, GIL or not."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT_HEAD + textwrap.dedent(ORPHAN_BODY))
    pids_file = tmp_path / "pids.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path]),
        "TESTS_DIR": os.path.dirname(__file__),
        "LLM_ASYNC_POOL_WORKERS": "2",
    }
    parent = subprocess.Popen(
        [sys.executable, str(script), str(pids_file), "gil_sleep"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not pids_file.exists():
            assert time.monotonic() < deadline, "the script did not start its workers"
            time.sleep(0.05)
        pids = json.loads(pids_file.read_text())
        assert len(pids) >= 2 and all(pid_alive(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait(10)
    killed_at = time.monotonic()
    while any(pid_alive(pid) for pid in pids):
        assert time.monotonic() - killed_at < 2, [p for p in pids if pid_alive(p)]
        time.sleep(0.02)


@pytest.mark.timeout(60)
async def test_a_model_that_closes_its_pipes_is_killed_not_forgotten():
    response = probe().prompt("x", chunks=5, fail="close_fds", fail_after=1)
    with pytest.raises(WorkerCrashed) as info:
        await asyncio.wait_for(response.text(), 10)
    pid = int(str(info.value).split("pid ")[1].split(")")[0])
    deadline = time.monotonic() + 2
    while pid_alive(pid):
        assert time.monotonic() < deadline, "a worker the pool gave up on still runs"
        await asyncio.sleep(0.02)
    assert await asyncio.wait_for(probe().prompt("y", chunks=1).text(), 10) == "0 "


# ------------------------------------------------------------------ resources
@pytest.mark.timeout(60)
async def test_backpressure_bounds_bytes_as_well_as_chunks(tmp_path):
    marker = tmp_path / "finally.json"
    response = probe().prompt("x", chunks=500, size=2**20, marker=str(marker))
    iterator = await started(response, 2)
    await asyncio.sleep(1.0)  # a stalled consumer; unbounded, 500 MB would pile up
    del iterator, response
    gc.collect()
    report = await asyncio.to_thread(wait_for_file, marker)
    assert report["yielded"] <= 16 + 2 + 4  # the 16 MB window, plus what was taken


@pytest.mark.timeout(60)
async def test_pools_for_settings_no_longer_used_do_not_pile_up(monkeypatch):
    before = threading.active_count()
    for i in range(3):  # each a pool of its own, with a zygote of its own
        monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", f"0.{3 + i}")
        assert await probe().prompt("x", chunks=1).text() == "0 "
    assert threading.active_count() > before
    await asyncio.sleep(4)  # every one of them idle, long enough to retire
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "0.3")
    assert await probe().prompt("x", chunks=1).text() == "0 "
    assert len([p for p in live_pools() if p.kind == "process"]) <= 2
    assert threading.active_count() <= before + 3


@pytest.mark.timeout(30)
async def test_a_dropped_response_frees_its_worker_without_a_gc_pass(tmp_path):
    marker = tmp_path / "finally.json"
    gc.disable()
    try:
        response = probe().prompt("x", chunks=100_000, delay=0.005, marker=str(marker))
        async for _chunk in response:
            break
        dropped = time.time()
        del response, _chunk
        report = await asyncio.to_thread(wait_for_file, marker, 5)
    finally:
        gc.enable()
    assert report["at"] - dropped < 0.5


# ------------------------------------------------------------------ clear errors
@pytest.mark.timeout(60)
async def test_a_model_module_the_worker_cannot_import_is_explained(tmp_path, monkeypatch):
    module = tmp_path / "vanishing_model.py"
    module.write_text(
        textwrap.dedent(
            """
            import llm

            class Vanishing(llm.Model):
                model_id = "vanishing"

                def execute(self, prompt, stream, response, conversation):
                    yield "here"

            @llm.hookimpl
            def register_models(register):
                register(Vanishing())
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_model

    llm.pm.register(vanishing_model, name="vanishing")
    try:
        monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "303")  # fresh workers
        monkeypatch.setenv("LLM_ASYNC_POOL_SHARE", "off")
        module.unlink()  # gone before any worker imports it
        with pytest.raises(ModelNotLoadable) as info:
            await asyncio.wait_for(llm.get_async_model("vanishing").prompt("x").text(), 20)
        message = str(info.value)
        assert "could not load the model" in message and "vanishing_model" in message
        assert "importable module" in message
    finally:
        llm.pm.unregister(name="vanishing")
        sys.modules.pop("vanishing_model", None)


def test_a_broken_plugin_in_the_worker_breaks_only_its_own_models(tmp_path):
    result, _ = run_script(
        tmp_path,
        """
        PARENT = os.getpid()

        class Broken:
            @llm.hookimpl
            def register_models(self, register):
                if os.getpid() != PARENT:
                    raise RuntimeError("this plugin cannot build its models here")

        # At top level, so the forkserver (which imports this script) and every
        # worker started from it have the broken plugin too.
        if not llm.pm.has_plugin("broken-plugin"):
            llm.pm.register(Broken(), name="broken-plugin")

        async def main():
            import cloudpickle
            from llm_async_procpool import wire

            pickled = []
            real = cloudpickle.dumps
            wire.cloudpickle.dumps = lambda v, *a, **k: pickled.append(v) or real(v, *a, **k)
            text = await asyncio.wait_for(
                llm.get_async_model("markov").prompt("a b c", length=3, delay=0).text(), 30
            )
            print(len(text.split()), len(pickled))

        if __name__ == "__main__":
            asyncio.run(main())
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "0"]  # built from the worker's own registry


@pytest.mark.timeout(60)
async def test_a_zygote_that_cannot_start_fails_the_prompt_and_says_where_to_look(
    tmp_path, monkeypatch
):
    """The pool's zygote dies before it is ready (here: a broken sitecustomize
    in a fresh interpreter): the prompt fails at once, saying so, and the next
    pool, with the environment mended, works."""
    (tmp_path / "sitecustomize.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "304")
    other = threading.Event()  # with a second thread, the zygote starts fresh
    threading.Thread(target=other.wait, daemon=True).start()
    with pytest.raises(WorkerCrashed) as info:
        await asyncio.wait_for(probe().prompt("x").text(), 30)
    other.set()
    assert "Could not start a worker process" in str(info.value)
    assert "zygote" in str(info.value) and "exited with code" in str(info.value)
    assert "stderr" in str(info.value)
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "305")
    monkeypatch.delenv("PYTHONPATH")
    with pytest.raises(WorkerCrashed) as info:
        await asyncio.wait_for(probe().prompt("x", fail="exit", fail_after=1).text(), 30)
    assert "exited with code 7" in str(info.value)


def test_remote_error_is_exported():
    assert issubclass(RemoteError, Exception) and issubclass(PoolClosed, RuntimeError)
    assert worker_pids and descendants  # helpers used across the suite
