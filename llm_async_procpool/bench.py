"""Side-by-side comparison of ways to run a sync model from async code.

Contenders, measured in interleaved rounds (A B C D E, A B C D E, ...) so a
noisy machine affects them all alike:

- ``serial``: the sync model called in a loop, in this thread (the baseline);
- ``thread``: this plugin with ``LLM_ASYNC_POOL=thread``;
- ``process``: this plugin with ``LLM_ASYNC_POOL=process``;
- ``all-models-async``: llm-all-models-async 0.1's thread-pool wrapper;
- ``ceiling``: a plain ``multiprocessing.Pool`` running the same prompts with
  no async, no streaming and no IPC per chunk: the parallelism the machine
  really gives right now.

Used by ``llm async-pool bench`` and by ``python -m benchmarks``. It imports
little at the top: the CLI imports it whenever ``llm`` starts, and must work
even where the plugin itself cannot.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import llm

from . import threads

CONTENDERS = ("serial", "thread", "process", "process-1", "all-models-async", "ceiling", "ray")
DEFAULT_CONTENDERS = ("serial", "thread", "process", "all-models-async", "ceiling")

HEARTBEAT = 0.001  # seconds the event-loop heartbeat sleeps
SETTLE = 0.3  # seconds between two contenders' samples


@dataclass
class Sample:
    contender: str
    concurrency: int
    seconds: float = 0.0
    chunks: int = 0
    first_chunk: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0  # this process and its descendants
    error: str | None = None
    repeat: int = 1  # prompts each caller sent in turn

    @property
    def prompts(self) -> int:
        return self.concurrency * self.repeat


@dataclass
class Workload:
    model_id: str
    prompt: str = "the cat sat on the mat and the dog sat on the log"
    options: dict[str, Any] = field(default_factory=dict)
    vary: bool = False  # a different prompt each time, so no cache can skip work
    #: Prompts each of the ``concurrency`` callers sends in turn in one sample:
    #: more than one for prompts of a few ms, where one prompt is all noise.
    repeat: int = 1

    def text(self) -> str:
        return f"{self.prompt} ({random.randrange(10**9)})" if self.vary else self.prompt


# ----------------------------------------------------------------- contenders
def _run_serial(model: llm.Model, workload: Workload, count: int) -> Sample:
    sample = Sample("serial", count, repeat=workload.repeat)
    started = time.perf_counter()
    for _ in range(sample.prompts):
        begun = time.perf_counter()
        first = True
        for _chunk in model.prompt(workload.text(), **workload.options):
            if first:
                sample.first_chunk.append(time.perf_counter() - begun)
                first = False
            sample.chunks += 1
    sample.seconds = time.perf_counter() - started
    return sample


async def _run_async(
    model: llm.AsyncModel, workload: Workload, count: int, name: str, lag: bool = True
) -> Sample:
    """``lag``: measure the loop's lag with a heartbeat (it wakes the loop every
    millisecond: on 2 cores, a cost to models that use both)."""
    sample = Sample(name, count, repeat=workload.repeat)
    stop = asyncio.Event()

    async def heartbeat():
        while lag and not stop.is_set():
            begun = time.perf_counter()
            await asyncio.sleep(HEARTBEAT)
            sample.lag.append(time.perf_counter() - begun - HEARTBEAT)

    async def caller():
        for _ in range(workload.repeat):
            begun = time.perf_counter()
            first = True
            async for _chunk in model.prompt(workload.text(), **workload.options):
                if first:
                    sample.first_chunk.append(time.perf_counter() - begun)
                    first = False
                sample.chunks += 1

    beat = asyncio.ensure_future(heartbeat())
    started = time.perf_counter()
    try:
        await asyncio.gather(*(caller() for _ in range(count)))
    finally:
        sample.seconds = time.perf_counter() - started
        stop.set()
        await beat
    return sample


def _ceiling_init(model_id: str, blob: bytes, share: int) -> None:
    """A ceiling worker: the same thread share as a pool worker, then the model."""
    global _ceiling_model
    os.environ.update(threads.environment(dict(os.environ), share))
    threads.limit(share)  # for libraries imported with this module, before the knobs
    found = {m.model.model_id: m.model for m in llm.get_models_with_aliases() if m.model}
    import cloudpickle

    _ceiling_model = found.get(model_id) or cloudpickle.loads(blob)


def _ceiling_run(workload: Workload) -> int:
    return sum(1 for _ in _ceiling_model.prompt(workload.text(), **workload.options))


_ceiling_model: llm.Model | None = None  # set in ceiling pool workers only


class Contenders:
    """Everything the contenders need, built once per bench run."""

    def __init__(self, model_id: str, workers: int, names: Iterable[str], lag: bool = True):
        self.sync_model = llm.get_model(model_id)
        self.lag = lag
        self.workers = workers
        self.names = list(names)
        self.ceiling = None
        if "ceiling" in self.names:
            import cloudpickle

            # spawn: independent of the pool, which may have forked from this process
            context = multiprocessing.get_context("spawn")
            self.ceiling = context.Pool(
                workers,
                initializer=_ceiling_init,
                initargs=(
                    self.sync_model.model_id,
                    cloudpickle.dumps(self.sync_model),
                    max(1, threads.usable_cores() // workers),
                ),
            )

    def close(self) -> None:
        if self.ceiling is not None:
            self.ceiling.terminate()
            self.ceiling.join()

    def async_model(self, name: str) -> llm.AsyncModel:
        if name == "all-models-async":
            import llm_all_models_async as old

            if isinstance(self.sync_model, llm.KeyModel):
                return old.AsyncKeyModelWrapper(self.sync_model)
            return old.AsyncModelWrapper(self.sync_model)
        os.environ["LLM_ASYNC_POOL"] = "process" if name == "process-1" else name
        os.environ["LLM_ASYNC_POOL_WORKERS"] = "1" if name == "process-1" else str(self.workers)
        return llm.get_async_model(self.sync_model.model_id)

    def measure(self, name: str, workload: Workload, count: int) -> Sample:
        before = cpu_seconds()
        sample = self._measure(name, workload, count)
        sample.cpu_seconds = cpu_seconds() - before
        return sample

    def _measure(self, name: str, workload: Workload, count: int) -> Sample:
        try:
            if name == "serial":
                return _run_serial(self.sync_model, workload, count)
            if name == "ceiling":
                sample = Sample(name, count, repeat=workload.repeat)
                started = time.perf_counter()
                for _ in range(workload.repeat):  # ``count`` at a time, as the callers do
                    sample.chunks += sum(self.ceiling.map(_ceiling_run, [workload] * count))
                sample.seconds = time.perf_counter() - started
                return sample
            if name == "all-models-async":
                try:
                    import llm_all_models_async  # noqa: F401
                except ImportError:
                    return Sample(name, count, error="not installed")
            model = self.async_model(name)
            return asyncio.run(_run_async(model, workload, count, name, self.lag))
        except Exception as error:
            message = " ".join(f"{type(error).__name__}: {error}".split())
            return Sample(name, count, error=message)


# ----------------------------------------------------------------- the run
def run(
    workload: Workload,
    concurrencies: list[int],
    rounds: int = 3,
    workers: int | None = None,
    contenders: Iterable[str] = DEFAULT_CONTENDERS,
    progress: Callable[[str], None] | None = None,
    lag: bool = True,
) -> dict[str, Any]:
    """Measure every contender at every concurrency, interleaved, ``rounds`` times."""
    from .pools import shutdown_pools

    saved = {k: os.environ.get(k) for k in ("LLM_ASYNC_POOL", "LLM_ASYNC_POOL_WORKERS")}
    workers = workers or os.cpu_count() or 1
    os.environ["LLM_ASYNC_POOL_WORKERS"] = str(workers)
    shutdown_pools()
    names = [n for n in CONTENDERS if n in set(contenders)]
    bench = Contenders(workload.model_id, workers, names, lag)
    try:
        starts = _start_times(bench, workload, names)
        for name in names:  # start every worker, so round 1 is warm too
            bench.measure(name, workload, workers)
        samples: list[Sample] = []
        total = rounds * len(concurrencies) * len(names)
        for r in range(rounds):
            for count in concurrencies:
                for name in names:
                    if progress:
                        progress(f"round {r + 1}/{rounds}: {name} x{count}")
                    time.sleep(SETTLE)  # let the last contender's spinning BLAS threads sleep
                    samples.append(bench.measure(name, workload, count))
                    if progress:
                        progress(f"{len(samples)}/{total}")
        memory = _memory()
    finally:
        bench.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {
        "machine": machine(),
        "workload": asdict(workload),
        "workers": workers,
        "rounds": rounds,
        "start": starts,
        "memory": memory,
        "results": summarize(samples),
    }


def _start_times(bench: Contenders, workload: Workload, names: list[str]) -> dict:
    """First prompt of a fresh pool (spawn and model load) against the next one."""
    from .pools import shutdown_pools

    times = {}
    for name in ("thread", "process"):  # process last: its pool stays up
        if name not in names:
            continue
        shutdown_pools()
        measured = []
        for _ in range(2):
            sample = bench.measure(name, workload, 1)
            measured.append(sample.first_chunk[0] if sample.first_chunk else None)
        times[name] = {"cold_first_chunk": measured[0], "warm_first_chunk": measured[1]}
    return times


def _memory() -> dict:
    from .pools import live_pools
    from .pools.base import memory

    workers = [
        {
            "pid": w.pid,
            "role": w.role,
            "rss_mb": (w.memory.rss or 0) / 2**20,
            "pss_mb": (w.memory.pss or 0) / 2**20,
        }
        for pool in live_pools()
        if pool.kind == "process"
        for w in pool.workers()
    ]
    return {"parent_rss_mb": (memory(os.getpid()).rss or 0) / 2**20, "workers": workers}


def cpu_seconds() -> float:
    """CPU time of this process and every live descendant (workers, templates)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def summarize(samples: list[Sample]) -> list[dict]:
    groups: dict[tuple[str, int], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.contender, sample.concurrency), []).append(sample)
    rows = []
    for (name, count), group in groups.items():
        errors = [s.error for s in group if s.error]
        ok = [s for s in group if not s.error]
        row: dict[str, Any] = {"contender": name, "concurrency": count}
        if not ok:
            row["error"] = errors[0]
            rows.append(row)
            continue
        rates = [s.prompts / s.seconds for s in ok]
        row.update(
            prompts_per_s=statistics.median(rates),
            spread=[min(rates), max(rates)],
            tokens_per_s=statistics.median(s.chunks / s.seconds for s in ok),
        )
        if all(s.chunks for s in ok):
            row["cpu_ms_per_token"] = statistics.median(1000 * s.cpu_seconds / s.chunks for s in ok)
        firsts = [t for s in ok for t in s.first_chunk]
        if firsts:
            row["first_chunk_ms"] = {
                "p50": _pct(firsts, 50) * 1000,
                "p95": _pct(firsts, 95) * 1000,
            }
        lags = [t for s in ok for t in s.lag]
        if lags:
            row["loop_lag_ms"] = {
                "p50": _pct(lags, 50) * 1000,
                "p99": _pct(lags, 99) * 1000,
                "max": max(lags) * 1000,
            }
        rows.append(row)
    return rows


def _pct(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def machine() -> dict:
    import platform

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "llm": _version("llm"),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
