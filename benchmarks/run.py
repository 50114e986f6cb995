"""The full benchmark: every workload, plus blast throughput and first-chunk latency.

    python -m benchmarks                # about 10 minutes on 2 cores
    python -m benchmarks --quick        # a smoke run

Writes benchmarks/results/<time>.{json,md,png} and benchmarks/latest.*, and
prints each target from the README with the figure measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import llm

from benchmarks.models import register_plugin
from llm_async_procpool import bench, bench_report, config, shutdown_pools
from llm_async_procpool.messages import Chunks
from llm_async_procpool.pools import get_pool
from llm_async_procpool.wire import encode_job

HERE = Path(__file__).parent

WORKLOADS = [
    bench.Workload("bench-gil", "gil", {"tokens": 40, "work": 20_000}),
    bench.Workload("bench-gil-plain", "gil"),
    bench.Workload("bench-native", "native", {"tokens": 40, "work": 100_000}),
    bench.Workload("bench-sleep", "sleep", {"tokens": 20, "work": 2_000}),
    bench.Workload(
        "markov", "the cat sat on the mat and the dog sat on the log", {"length": 200, "delay": 0}
    ),
    bench.Workload("bench-big", "big", {"tokens": 10, "work": 2_000}, repeat=25),
]


class _NativeBlast(llm.AsyncModel):
    """A native async model with no work: llm's own per-chunk ceiling."""

    model_id = "native-blast"

    async def execute(self, prompt, stream, response, conversation):
        for _ in range(int(prompt.prompt)):
            yield "x"


async def _blast(kind: str, tokens: int) -> float:
    """Chunks per second reaching the consumer from one prompt with no model work.

    ``transport`` reads the pool's events directly; ``process`` and ``thread``
    go through llm's AsyncResponse, as every caller does; ``llm native async``
    is what AsyncResponse allows any async model.
    """
    count = 0
    started = time.perf_counter()
    if kind == "llm native async":
        async for _chunk in _NativeBlast().prompt(str(tokens)):
            count += 1
    elif kind == "transport":
        settings = config.load()
        model = llm.get_model("bench-blast")
        prompt = model.prompt("b", tokens=tokens, work=0).prompt
        job = encode_job(model, prompt, True, None, None)
        run = await get_pool(settings.pool_for(model)).submit(model, job, settings)
        while type(event := await run.next()) is Chunks:
            count += len(event.items)
            run.take(len(event.items), event.nbytes)
        run.finished()
    else:
        model = llm.get_async_model("bench-blast")
        async for _chunk in model.prompt("b", tokens=tokens, work=0):
            count += 1
    return count / (time.perf_counter() - started)


def blast(rounds: int, tokens: int) -> dict:
    kinds = ("transport", "process", "llm native async", "thread")
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind in kinds:
            os.environ["LLM_ASYNC_POOL"] = "thread" if kind == "thread" else "process"
            rates[kind].append(asyncio.run(_blast(kind, tokens)))
    return {kind: _spread(values) for kind, values in rates.items()}


async def _first_chunks(model, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        async for _chunk in model.prompt("l", tokens=1, work=0):
            times.append(time.perf_counter() - started)
    return times


def first_chunk_latency(rounds: int, count: int) -> dict:
    """Warm time to first chunk, in-process sync call against each pool."""
    sync_model = llm.get_model("bench-blast")
    times: dict[str, list[float]] = {"in-process sync": [], "process": [], "thread": []}
    for _ in range(rounds):
        for _ in range(count):
            started = time.perf_counter()
            for _chunk in sync_model.prompt("l", tokens=1, work=0):
                times["in-process sync"].append(time.perf_counter() - started)
        for kind in ("process", "thread"):
            os.environ["LLM_ASYNC_POOL"] = kind
            model = llm.get_async_model("bench-blast")
            times[kind] += asyncio.run(_first_chunks(model, count))
    return {
        kind: {"p50_ms": statistics.median(v) * 1000, "p95_ms": bench._pct(v, 95) * 1000}
        for kind, v in times.items()
    }


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def targets(reports: list[dict], extra: dict, workers: int) -> list[tuple[str, str, bool]]:
    """Each README target (issue 12's among them), with this run's figure and
    whether it is met."""
    by_model = {r["workload"]["model_id"]: r for r in reports}
    found = []

    def row(model_id, contender, count):
        for r in by_model.get(model_id, {}).get("results", []):
            if r["contender"] == contender and r["concurrency"] == count and "error" not in r:
                return r
        return None

    def ratios(model_id, against, counts):
        pairs = [(row(model_id, "process", c), row(model_id, against, c)) for c in counts]
        return [p["prompts_per_s"] / a["prompts_per_s"] for p, a in pairs if p and a]

    def add(name, values, bound, unit="x", most=False):
        if values:
            figure = ", ".join(f"{v:.2f}{unit}" for v in values)
            found.append((name, figure, max(values) <= bound if most else min(values) >= bound))

    if "bench-gil" in by_model:
        counts = sorted(
            {r["concurrency"] for r in by_model["bench-gil"]["results"]} - set(range(workers))
        )
        add(
            "GIL-bound throughput >= 0.95 x raw ceiling (concurrency >= workers)",
            ratios("bench-gil", "ceiling", counts),
            0.95,
        )
        eight = row("bench-gil", "process", 8)
        if eight:
            add(
                "event-loop lag p99 <= 2 ms with 8 GIL-bound prompts",
                [eight["loop_lag_ms"]["p99"]],
                2.0,
                " ms",
                most=True,
            )
    add("bench-big, 1 at a time: process >= 0.9 x thread", ratios("bench-big", "thread", [1]), 0.9)
    for model_id in ("bench-native", "bench-sleep"):
        if model_id in by_model:
            counts = sorted({r["concurrency"] for r in by_model[model_id]["results"]})
            add(
                f"{model_id}: process >= 0.9 x thread at every concurrency",
                ratios(model_id, "thread", counts),
                0.9,
            )
    blasts = extra["blast"]
    chunks = blasts["transport"]["median"]
    found.append(
        (
            "blast from one worker >= 200,000 chunks/s (pool transport)",
            f"{chunks:,.0f} chunks/s",
            chunks >= 200_000,
        )
    )
    through, native = blasts["process"]["median"], blasts["llm native async"]["median"]
    found.append(
        (
            "blast through llm's AsyncResponse >= 0.9 x a native async model",
            f"{through:,.0f} against {native:,.0f} chunks/s ({through / native:.2f}x)",
            through >= 0.9 * native,
        )
    )
    latency = extra["first_chunk"]
    added = latency["process"]["p50_ms"] - latency["in-process sync"]["p50_ms"]
    thread = latency["thread"]["p50_ms"] - latency["in-process sync"]["p50_ms"]
    found.append(
        (
            "warm first chunk adds <= 0.3 ms at p50 over in-process sync",
            f"{added:.3f} ms (thread mode: {thread:.3f} ms)",
            added <= 0.3,
        )
    )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, small sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", help="comma-separated model ids to run")
    args = parser.parse_args(argv)
    register_plugin()
    rounds = 1 if args.quick else args.rounds
    counts = [1, 2] if args.quick else [int(c) for c in args.concurrency.split(",")]
    workloads = [w for w in WORKLOADS if not args.only or w.model_id in args.only.split(",")]
    show = bench_report.progress_bar()
    reports = []
    for workload in workloads:
        report = bench.run(workload, counts, rounds, args.workers, bench.DEFAULT_CONTENDERS, show)
        reports.append(report)
        print(
            f"\n{bench_report.title(report['workload'])}, {args.workers} workers, {rounds} rounds:"
        )
        print(bench_report.table(report))
    os.environ["LLM_ASYNC_POOL_WORKERS"] = str(args.workers)
    extra = {
        "blast": blast(rounds=3 if args.quick else 7, tokens=50_000 if args.quick else 300_000),
        "first_chunk": first_chunk_latency(
            rounds=1 if args.quick else 5, count=50 if args.quick else 200
        ),
    }
    shutdown_pools()
    print(f"\nblast, chunks/s from one worker: {json.dumps(extra['blast'])}")
    print(f"warm first chunk: {json.dumps(extra['first_chunk'])}")
    results = targets(reports, extra, args.workers)
    print("\nTargets:")
    for name, figure, met in results:
        print(f"  [{'met' if met else 'MISSED'}] {name}: {figure}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    payload = {
        "machine": bench.machine(),
        "workloads": reports,
        "extra": extra,
        "targets": [{"target": n, "measured": f, "met": m} for n, f, m in results],
    }
    (out / f"{stamp}.json").write_text(json.dumps(payload, indent=2))
    bench_report.save(reports, None, str(out / f"{stamp}.md"))
    with open(out / f"{stamp}.md", "a") as md:
        md.write("### Targets\n\n| target | measured | met |\n|---|---|---|\n")
        for name, figure, met in results:
            md.write(f"| {name} | {figure} | {'yes' if met else 'no'} |\n")
    plotted = bench_report.can_plot()
    if plotted:
        bench_report.plot(reports, str(out / f"{stamp}.png"))
    if not args.quick:
        for suffix in ("json", "md") + (("png",) if plotted else ()):
            shutil.copy(out / f"{stamp}.{suffix}", HERE / f"latest.{suffix}")
    print(f"\nwrote {out / stamp}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
