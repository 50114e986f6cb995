"""Ray against the process pool, on a two-node Ray cluster on this machine.

    python -m benchmarks.ray_bench            # about 5 minutes on 2 cores

Starts a ``ray.cluster_utils.Cluster`` (a head and one more node, 1 CPU each)
on loopback only, then measures side by side, in interleaved rounds:
prompts/s and first chunk with the GIL-bound workload (2 workers or 2 actors:
both are limited by this machine's 2 cores), the blast rate of one stream
through llm's AsyncResponse, the time from cancel to the model's ``finally``,
and Ray's start-up time. Writes benchmarks/ray-latest.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def loopback_only() -> None:
    """Keep every Ray process on 127.0.0.1 and off cloud metadata and ray.io."""
    home = tempfile.mkdtemp(prefix="ray-home-")
    Path(home, "ray_bootstrap_config.yaml").write_text("{}")
    os.environ.update(
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_USAGE_STATS_REPORT_URL="http://127.0.0.1:9/",
        HOME=home,
        PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    )


def start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    args = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "node_ip_address": "127.0.0.1"}
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    cluster.add_node(**args)
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, time.perf_counter() - started


async def blast(tokens: int) -> float:
    import llm

    count = 0
    started = time.perf_counter()
    async for _chunk in llm.get_async_model("bench-blast").prompt("b", tokens=tokens, work=0):
        count += 1
    return count / (time.perf_counter() - started)


async def cancel_latency() -> float:
    """Seconds from task.cancel() to the model's finally, in its worker."""
    import llm

    marker = Path(tempfile.mkdtemp()) / "finally"
    response = llm.get_async_model("bench-marked").prompt(str(marker))
    iterator = response.__aiter__()
    await iterator.__anext__()
    task = asyncio.ensure_future(response.text())
    await asyncio.sleep(0.05)
    cancelled = time.time()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    deadline = time.monotonic() + 10
    while not (marker.exists() and marker.read_text()):
        assert time.monotonic() < deadline, "the model's finally never ran"
        await asyncio.sleep(0.001)
    return float(marker.read_text()) - cancelled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,2,4,8")
    args = parser.parse_args(argv)
    loopback_only()
    from benchmarks.models import register_plugin
    from llm_async_procpool import bench, bench_report, shutdown_pools

    register_plugin()
    cluster, startup = start_cluster()
    try:
        workload = bench.Workload("bench-gil", "gil", {"tokens": 40, "work": 20_000})
        counts = [int(c) for c in args.concurrency.split(",")]
        report = bench.run(
            workload, counts, args.rounds, 2, ("process", "ray"), bench_report.progress_bar()
        )
        extra: dict = {"ray_startup_s": startup, "blast": {}, "cancel_ms": {}}
        os.environ["LLM_ASYNC_POOL_WORKERS"] = "2"
        for _ in range(args.rounds):
            for kind in ("process", "ray"):
                os.environ["LLM_ASYNC_POOL"] = kind
                extra["blast"].setdefault(kind, []).append(asyncio.run(blast(100_000)))
                for _ in range(5):
                    latency = asyncio.run(cancel_latency()) * 1000
                    extra["cancel_ms"].setdefault(kind, []).append(latency)
        shutdown_pools()
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    summary = {
        "blast_chunks_per_s": {k: statistics.median(v) for k, v in extra["blast"].items()},
        "cancel_to_finally_ms_p50": {
            k: statistics.median(v) for k, v in extra["cancel_ms"].items()
        },
        "cancel_to_finally_ms_max": {k: max(v) for k, v in extra["cancel_ms"].items()},
        "ray_startup_s": startup,
    }
    print("\nbench-gil, 2 workers (process) against 2 actors on 2 nodes (ray):")
    print(bench_report.table(report))
    print(json.dumps(summary, indent=2))
    (HERE / "ray-latest.json").write_text(
        json.dumps({"report": report, **extra, **summary}, indent=2)
    )
    (HERE / "ray-latest.md").write_text(
        f"Machine: {bench.machine()}\n\n### bench-gil {workload.options}\n\n"
        + bench_report.markdown(report)
        + f"\n\n```\n{json.dumps(summary, indent=2)}\n```\n"
    )
    print(f"wrote {HERE / 'ray-latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
