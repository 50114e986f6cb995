"""A long queue: thousands of prompts submitted at once to a pool of 2 workers.

    python -m benchmarks.queue                    # 500, 2500 and 5000 queued
    python -m benchmarks.queue --sizes 500,5000 --rounds 3

For each queue length it measures the app's CPU time per prompt (what the
event loop and the pool spend placing, sending and reading prompts; the
workers' CPU is not counted) and the event loop's longest stall (a heartbeat
task's lateness) in two phases: while the app submits every prompt in one go
(one loop iteration runs every task's first step: that stall is the app's, and
grows with the burst), and while the queue drains (the pool's). Sizes are interleaved in rounds;
medians and ranges are printed, then the ratio of CPU per prompt at the
largest size to the smallest. Every answer is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import time

import llm

from benchmarks.models import register_plugin
from llm_async_procpool import shutdown_pools


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drain(size: int) -> tuple[float, float, float]:
    """For ``size`` prompts at once: app CPU ms per prompt, the loop's longest
    stall while the app submits them (its own burst), and while they drain."""
    model = llm.get_async_model("bench-sleep")
    await model.prompt("warm", tokens=1, work=0).text()
    beats: list[tuple[float, float]] = []  # (when it started, how late it woke)
    done = asyncio.Event()

    async def heartbeat():
        while not done.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            beats.append((started, time.perf_counter() - started - 0.001))

    async def prompt(i, submitted):
        response = model.prompt(str(i), tokens=1, work=0)
        iterator = response.__aiter__()
        first = await iterator.__anext__()  # it is placed, and has run
        submitted.append(i)
        return first + "".join([chunk async for chunk in iterator])

    beat = asyncio.ensure_future(heartbeat())
    submitted: list[int] = []
    cpu = _cpu()
    tasks = [asyncio.ensure_future(prompt(i, submitted)) for i in range(size)]
    await asyncio.sleep(0)  # every task has taken its first step: submitted
    submitted_at = time.perf_counter()
    texts = await asyncio.gather(*tasks)
    cpu = _cpu() - cpu
    done.set()
    await beat
    assert texts == [f"{i}-0 " for i in range(size)], "a prompt got another's reply"
    burst = max((late for at, late in beats if at < submitted_at), default=0.0)
    drain = max((late for at, late in beats if at >= submitted_at), default=0.0)
    return cpu / size * 1000, burst * 1000, drain * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500,2500,5000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    os.environ.update(LLM_ASYNC_POOL="process", LLM_ASYNC_POOL_WORKERS="2")
    register_plugin()
    results: dict[int, list[tuple[float, float, float]]] = {size: [] for size in sizes}
    for _ in range(args.rounds):
        for size in sizes:
            results[size].append(asyncio.run(_drain(size)))
    shutdown_pools()
    print(
        f"{'queued':>7} {'app CPU ms/prompt':>24} {'stall ms, app submits':>24}"
        f" {'stall ms, queue drains':>24}"
    )
    for size, rows in results.items():
        line = f"{size:>7}"
        for column in range(3):
            values = [row[column] for row in rows]
            line += f" {statistics.median(values):>10.3g} ({min(values):.3g}-{max(values):.3g})"
        print(line)
    small, large = min(sizes), max(sizes)
    ratio = statistics.median(r[0] for r in results[large]) / statistics.median(
        r[0] for r in results[small]
    )
    print(f"CPU per prompt at {large} / at {small}: {ratio:.2f}x (target <= 1.3x)")
    drained = max(r[2] for r in results[large])
    print(f"longest stall while {large} drain: {drained:.1f} ms (target <= 50)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
