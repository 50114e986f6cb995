"""Real local models: thread budgets, one shared copy of the weights, one first
load, and the load allowance. probe-weights loads a numpy array as its
"weights" inside its first execute(), as local model plugins do."""

import asyncio
import ctypes.util
import json
import os
import time

import llm
import pytest
from helpers import process_pool, run_script, worker_pids

from llm_async_procpool import PromptTimeout
from llm_async_procpool.pools.base import memory
from llm_async_procpool.threads import usable_cores

CORES = usable_cores()


def weights():
    return llm.get_async_model("probe-weights")


async def reports(count, **options):
    """Thread reports from ``count`` prompts running at the same time."""
    responses = [weights().prompt(str(i), report_threads=True, **options) for i in range(count)]
    texts = await asyncio.wait_for(asyncio.gather(*(r.text() for r in responses)), 60)
    return [json.loads(text.split(" ", 3)[-1]) for text in texts]


@pytest.mark.parametrize("workers", [1, 2, 4])
async def test_each_worker_gets_its_share_of_the_cores(monkeypatch, workers):
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", str(workers))
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", f"{400 + workers}")
    share = max(1, CORES // workers)
    # every worker busy at once: each gets cores // busy BLAS threads
    seen = await reports(workers, pause=0.3)
    assert len({r["pid"] for r in seen}) == workers
    for report in seen:
        assert report["env"]["OMP_NUM_THREADS"] == str(share)
        assert report["env"]["OPENBLAS_NUM_THREADS"] == str(share)
        assert report["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
        assert report["cpu_count"] == report["mp_cpu_count"] == share
        assert report["blas"] == [max(1, CORES // workers)]
    # alone, a worker may use every core (LLM_ASYNC_POOL_THREADS=auto)
    (alone,) = await reports(1)
    assert alone["blas"] == [CORES]


async def test_a_fixed_thread_count_is_kept(monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL_THREADS", "3")
    (report,) = await reports(1)
    assert report["env"]["OMP_NUM_THREADS"] == "3" and report["cpu_count"] == 3
    assert report["blas"] == [3]


async def test_the_users_own_thread_settings_win(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "411")
    (report,) = await reports(1)
    assert report["env"]["OMP_NUM_THREADS"] == "3"
    assert report["env"]["OPENBLAS_NUM_THREADS"] is None  # not set by us either
    assert report["cpu_count"] == os.cpu_count()


def _pss(pid):
    return memory(pid).pss


async def test_workers_share_one_copy_of_the_weights(monkeypatch):
    """The template loads 200 MB of weights once; both workers are forked from
    it, so together they hold about one copy, not two."""
    megabytes = 200
    monkeypatch.setenv("PROBE_WEIGHTS_MB", str(megabytes))
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "2")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "412")
    texts = await asyncio.gather(*(weights().prompt(str(i), pause=0.2).text() for i in range(4)))
    assert len({t.split()[2] for t in texts}) == 2  # answered by two workers
    pool = process_pool(idle_timeout=412)
    workers = worker_pids(pool)
    (template,) = [w.pid for w in pool.workers() if w.role == "template"]
    one_copy = megabytes * 2**20
    print("PSS MB:", {pid: _pss(pid) // 2**20 for pid in [*workers, template]})
    assert sum(_pss(pid) for pid in workers) < 1.4 * one_copy
    assert sum(_pss(pid) for pid in [*workers, template]) < 1.4 * one_copy + 100 * 2**20
    assert pool.sharing()["probe-weights"].startswith("shared from template pid")


@pytest.mark.parametrize("share", ["on", "off"])
async def test_four_first_prompts_load_the_model_once_at_a_time(monkeypatch, tmp_path, share):
    log = tmp_path / "loads.log"
    monkeypatch.setenv("PROBE_LOAD_LOG", str(log))
    monkeypatch.setenv("PROBE_LOAD_SECONDS", "0.3")
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "2")
    monkeypatch.setenv("LLM_ASYNC_POOL_SHARE", share)
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "413")
    texts = await asyncio.gather(*(weights().prompt(str(i)).text() for i in range(4)))
    assert all(t.startswith("loaded in") for t in texts)
    loads = [json.loads(line) for line in log.read_text().splitlines()]
    if share == "on":
        assert len(loads) == 1  # in the template; the workers inherit it
    else:  # one per worker, and the second starts only after the first ended
        assert len(loads) == 2
        first, second = sorted(loads, key=lambda load: load[1])
        assert second[1] >= first[2]


async def test_thread_mode_loads_each_instance_once_and_the_first_alone(monkeypatch, tmp_path):
    log = tmp_path / "loads.log"
    monkeypatch.setenv("PROBE_LOAD_LOG", str(log))
    monkeypatch.setenv("PROBE_LOAD_SECONDS", "0.3")
    monkeypatch.setenv("LLM_ASYNC_POOL", "thread")
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "2")
    await asyncio.gather(*(weights().prompt(str(i), pause=0.1).text() for i in range(4)))
    await asyncio.gather(*(weights().prompt(str(i)).text() for i in range(4)))
    loads = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda x: x[1])
    assert len(loads) == 2  # two instances (two threads), each loaded once
    assert loads[1][1] >= loads[0][2]  # the second only after the first had loaded


@pytest.mark.parametrize("share", ["on", "off"])
async def test_a_slow_first_load_gets_the_load_allowance(monkeypatch, share):
    monkeypatch.setenv("PROBE_LOAD_SECONDS", "1.5")
    monkeypatch.setenv("LLM_ASYNC_POOL_TIMEOUT", "0.5")
    monkeypatch.setenv("LLM_ASYNC_POOL_LOAD_TIMEOUT", "20")
    monkeypatch.setenv("LLM_ASYNC_POOL_SHARE", share)
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "414")
    text = await asyncio.wait_for(weights().prompt("x").text(), 30)
    assert text.startswith("loaded in")


@pytest.mark.parametrize("share", ["on", "off"])
async def test_a_load_past_its_allowance_times_out(monkeypatch, share):
    monkeypatch.setenv("PROBE_LOAD_SECONDS", "3")
    monkeypatch.setenv("LLM_ASYNC_POOL_LOAD_TIMEOUT", "0.5")
    monkeypatch.setenv("LLM_ASYNC_POOL_SHARE", share)
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "415")
    started = time.monotonic()
    with pytest.raises(PromptTimeout) as info:
        await asyncio.wait_for(weights().prompt("x").text(), 30)
    assert time.monotonic() - started < 2.5
    assert "LLM_ASYNC_POOL_LOAD_TIMEOUT=0.5" in str(info.value)


async def test_a_cancel_during_a_cold_load_keeps_the_loaded_worker(monkeypatch, tmp_path):
    log = tmp_path / "loads.log"
    monkeypatch.setenv("PROBE_LOAD_LOG", str(log))
    monkeypatch.setenv("PROBE_LOAD_SECONDS", "0.6")
    monkeypatch.setenv("LLM_ASYNC_POOL_SHARE", "off")
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_GRACE", "0.1")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "416")
    task = asyncio.ensure_future(weights().prompt("x").text())
    await asyncio.sleep(0.3)  # loading now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.6)  # past the grace period: a plain kill would have hit
    text = await asyncio.wait_for(weights().prompt("y").text(), 10)
    (load,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert text == f"loaded in {load[0]} "  # the same worker, loaded once


async def test_the_default_pool_size_keeps_half_the_memory_free(monkeypatch):
    """With LLM_ASYNC_POOL_WORKERS unset, a second worker starts only if, after
    it, half the machine's memory stays available, judged by what a loaded
    worker needed. Here the machine claims to be nearly full."""
    from llm_async_procpool.pools import sizing

    monkeypatch.delenv("LLM_ASYNC_POOL_WORKERS")
    monkeypatch.setenv("LLM_ASYNC_POOL_SHARE", "off")  # a worker that loads for itself
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "417")
    first = await weights().prompt("first").text()
    pool = process_pool(idle_timeout=417)
    deadline = time.monotonic() + 10
    while not pool.sizing.worker_cost:  # measured once the worker has loaded
        assert time.monotonic() < deadline, "the loaded worker's memory was not measured"
        await asyncio.sleep(0.05)
    monkeypatch.setattr(sizing, "available_memory", lambda: 2**20)
    texts = await asyncio.gather(*(weights().prompt(str(i), pause=0.1).text() for i in range(4)))
    assert set(texts) == {first}  # all on the one worker: no room for a second
    assert len(worker_pids(pool)) == 1
    monkeypatch.setattr(sizing, "available_memory", lambda: 2**50)
    seen = set()
    deadline = time.monotonic() + 30
    while len(seen) < 2:
        assert time.monotonic() < deadline, "no second worker although there is room"
        texts = await asyncio.gather(
            *(weights().prompt(str(i), pause=0.2).text() for i in range(4))
        )
        seen |= set(texts)


def test_a_native_library_imported_later_gets_the_share_too(monkeypatch):
    """A plugin imports torch lazily, after numpy's BLAS already has its share:
    the budget must apply the share again, though the share did not change."""
    import sys
    import types

    from llm_async_procpool import threads
    from llm_async_procpool.cells import BUSY

    applied = []
    monkeypatch.setattr(threads, "limit", applied.append)
    for name in threads.NATIVE:
        monkeypatch.delitem(sys.modules, name, raising=False)
    cells = [0] * (BUSY + 1)
    cells[BUSY] = 1
    budget = threads.Budget(cells, cores=2, fixed=None)
    budget.adjust()
    assert applied == []  # nothing native loaded yet
    monkeypatch.setitem(sys.modules, "numpy", types.ModuleType("numpy"))
    budget.adjust()
    budget.adjust()
    assert applied == [2]
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    budget.adjust()
    assert applied == [2, 2]
    cells[BUSY] = 2
    budget.adjust()
    assert applied == [2, 2, 1]


@pytest.mark.skipif(not ctypes.util.find_library("gomp"), reason="needs GNU OpenMP (libgomp)")
def test_an_app_with_an_openmp_pool_gets_workers_that_do_not_hang(tmp_path):
    """An app that ran torch has OpenMP's pool thread. After any fork OpenBLAS's
    threads are stopped but still counted, so the OpenMP thread passed for one
    of them: the pool forked the app, and the worker hung in its first parallel
    region, for good."""
    result, _ = run_script(
        tmp_path,
        """
        import numpy
        from llm_async_procpool import threads

        if __name__ == "__main__":
            llm.pm.register(plugin_models, name="procpool-test-models")
            pid = os.fork()  # OpenBLAS stops its threads until its next call
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            plugin_models.openmp_parallel()
            print(threads.threads_now() - 1, threads.openblas_threads(), flush=True)
            response = llm.get_async_model("probe-openmp").prompt("x")
            print(asyncio.run(asyncio.wait_for(response.text(), 20)))
        """,
        timeout=90,
    )
    lines = result.stdout.splitlines()
    assert lines, result.stderr[-2000:]
    extra, openblas = map(int, lines[0].split())
    if not 0 < extra <= openblas:
        pytest.skip(f"no stopped OpenBLAS threads to mistake ({extra} extra, {openblas} counted)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert lines[1].startswith("parallel in ")


@pytest.mark.skipif(not ctypes.util.find_library("gomp"), reason="needs GNU OpenMP (libgomp)")
def test_an_app_that_ran_openmp_forks_its_zygote_and_its_workers_run_openmp(tmp_path):
    """An app with a llama.cpp or torch plugin has numpy's OpenBLAS threads and,
    once it ran a model, OpenMP's pool. The pool ends the OpenMP pool (it
    starts again when needed) and forks its zygote from the app, instead of
    executing a fresh one that imports llm and every plugin again."""
    result, _ = run_script(
        tmp_path,
        """
        import numpy
        from llm_async_procpool import live_pools, threads

        if __name__ == "__main__":
            llm.pm.register(plugin_models, name="procpool-test-models")
            plugin_models.openmp_parallel()
            print(threads.threads_now() - 1 > threads.openblas_threads(), flush=True)
            response = llm.get_async_model("probe-openmp").prompt("x")
            print(asyncio.run(asyncio.wait_for(response.text(), 20)), flush=True)
            (zygote,) = [w.pid for p in live_pools() for w in p.workers() if w.role == "zygote"]
            with open(f"/proc/{zygote}/cmdline", "rb") as cmdline:
                print(b"zygote.main" in cmdline.read())
            plugin_models.openmp_parallel()  # the app's own OpenMP works on
            print("app parallel again")
        """,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    had_openmp_threads, answer, executed, again = result.stdout.splitlines()
    assert had_openmp_threads == "True"
    assert answer.startswith("parallel in ")
    assert executed == "False"  # forked from the app
    assert again == "app parallel again"


async def test_a_model_that_loads_with_openmp_threads_is_shared_from_its_template(monkeypatch):
    """A load that ran an OpenMP parallel region (as torch and llama.cpp do)
    leaves GNU OpenMP's pool behind; the template ends it before it forks, so
    the model is shared, and workers forked from it run parallel regions."""
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "2")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "427")
    model = llm.get_async_model("probe-openmp")
    texts = await asyncio.wait_for(
        asyncio.gather(*(model.prompt(str(i)).text() for i in range(4))), 30
    )
    assert all(text.startswith("parallel in ") for text in texts)
    sharing = process_pool(idle_timeout=427).sharing()["probe-openmp"]
    assert sharing.startswith("shared from template pid"), sharing


def test_preloaded_modules_are_in_every_worker_from_the_start(tmp_path):
    """LLM_ASYNC_POOL_PRELOAD: the forkserver imports them once, so a worker it
    forks has them before any model code runs."""
    result, _ = run_script(
        tmp_path,
        """
        class Seen(llm.Model):
            model_id = "seen"

            def execute(self, prompt, stream, response, conversation):
                yield str(sorted(m for m in ("wave", "colorsys") if m in sys.modules))

        class Plugin:
            @llm.hookimpl
            def register_models(self, register):
                register(Seen())

        if __name__ == "__main__":
            llm.pm.register(Plugin(), name="seen-plugin")
            threading.Thread(target=time.sleep, args=(30,), daemon=True).start()  # so no fork
            response = llm.get_async_model("seen").prompt("x")
            print(asyncio.run(asyncio.wait_for(response.text(), 30)))
        """,
        LLM_ASYNC_POOL_PRELOAD="wave",
        LLM_ASYNC_POOL_SHARE="off",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['wave']"


async def test_a_llama_cpp_template_stops_its_warm_up_once_the_context_is_built(monkeypatch):
    """Building the context is the load: the template's warm-up ends at its first
    eval, so the first prompt does not wait for a warm-up prompt on one thread.
    The worker forked from it has evaluated only its own prompt's tokens."""
    from llm_async_procpool.status import status

    fakes = os.path.join(os.path.dirname(__file__), "fakes")
    monkeypatch.syspath_prepend(fakes)  # before the pool (and its zygote) starts
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "417")
    model = llm.get_async_model("probe-llama")
    first = await model.prompt("one two three", evaluated=True).text()
    second = await model.prompt("four five", evaluated=True).text()
    assert first.split()[1] == "3"  # the warm-up's "hello" was never evaluated
    assert second.split()[1] == "5"  # and the context goes on evaluating as usual
    (report,) = [p for p in status()["live_pools"] if p["size"] == 1 and p["pool"] == "process"]
    assert report["sharing"]["probe-llama"].startswith("shared from template"), report


@pytest.mark.parametrize("share", ["on", "off"])
async def test_a_llama_cpp_context_gets_every_core_alone_and_its_share_when_busy(
    monkeypatch, share
):
    """llama-cpp-python sizes a context's threads when the model is built; the
    budget resizes live contexts (here a stand-in with a settable count) as it
    does torch's and BLAS's pools: all cores alone, cores // N with N busy."""
    fakes = os.path.join(os.path.dirname(__file__), "fakes")
    monkeypatch.syspath_prepend(fakes)  # before the pool (and its zygote) starts
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "2")
    monkeypatch.setenv("LLM_ASYNC_POOL_SHARE", share)
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "418" if share == "on" else "419")
    model = llm.get_async_model("probe-llama")

    async def counts(how_many, pause):
        texts = await asyncio.gather(
            *(model.prompt(str(i), pause=pause).text() for i in range(how_many))
        )
        return [(int(t.split()[0]), tuple(json.loads(t.split(" ", 1)[1]))) for t in texts]

    (alone,) = await counts(1, 0.0)
    assert alone[1] == (max(CORES // 2, 1), CORES)  # generation, batch: every core
    both = await counts(2, 0.3)
    assert len({pid for pid, _ in both}) == 2
    share_each = max(1, CORES // 2)
    assert {threads for _, threads in both} == {(max(share_each // 2, 1), share_each)}
    (alone,) = await counts(1, 0.0)
    assert alone[1] == (max(CORES // 2, 1), CORES)
