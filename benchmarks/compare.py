"""Two checkouts of this project side by side: did a change move the figures?

    git worktree add /tmp/old <commit>
    python -m benchmarks.compare /tmp/old            # against this checkout
    python -m benchmarks.compare /tmp/old --rounds 7 --only bench-gil,markov

Each sample is a fresh Python process importing the package from one
checkout; the checkouts alternate within each round (old, new, old, new...).
A sample warms the process pool (2 workers) and then times a batch of
prompts at each concurrency, with a heartbeat on the event loop measuring
its lag. Only llm's public API and ``benchmarks/models.py`` are used, so any
two versions compare. Prints medians with their range, and new ÷ old.
``--first-chunk`` also times the warm first chunk of 300 one-token prompts,
one at a time (the median per sample).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKLOADS = {
    "bench-gil": ("gil", {"tokens": 40, "work": 20_000}),
    "bench-native": ("native", {"tokens": 40, "work": 100_000}),
    "markov": ("the cat sat on the mat and the dog sat on the log", {"length": 200, "delay": 0}),
    "bench-big": ("big", {"tokens": 10, "work": 2_000}),
}

SCRIPT = """
import asyncio, json, statistics, sys, time
sys.path.insert(0, {root!r})
import llm
from benchmarks.models import register_plugin
register_plugin()
model = llm.get_async_model({model!r})

async def one():
    return await (model.prompt({prompt!r}, **{options!r})).text()

async def heartbeat(lags, stop):
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - started - 0.001)

async def main():
    await asyncio.gather(*(one() for _ in range(4)))  # workers started and loaded
    out = {{}}
    for concurrency in {concurrency!r}:
        lags, stop = [], asyncio.Event()
        beat = asyncio.create_task(heartbeat(lags, stop))
        queue = list(range({prompts}))

        async def caller():
            while queue:
                queue.pop()
                await one()

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        took = time.perf_counter() - started
        stop.set()
        await beat
        lags.sort()
        out[concurrency] = ({prompts} / took, lags[int(len(lags) * 0.99)] * 1000)
    if {first_chunk}:
        tiny, firsts = llm.get_async_model("bench-gil"), []
        for _ in range(300):
            started = time.perf_counter()
            async for _chunk in tiny.prompt("x", tokens=1, work=0):
                firsts.append(time.perf_counter() - started)
                break
        out[0] = (statistics.median(firsts) * 1000, 0.0)
    print(json.dumps(out))

asyncio.run(main())
"""


def sample(
    tree: Path, model: str, concurrency: list[int], prompts: int, first_chunk: bool = False
) -> dict:
    prompt, options = WORKLOADS[model]
    script = SCRIPT.format(
        root=str(tree),
        model=model,
        prompt=prompt,
        options=options,
        concurrency=concurrency,
        prompts=prompts,
        first_chunk=first_chunk,
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "LLM_ASYNC_POOL": "process",
        "LLM_ASYNC_POOL_WORKERS": "2",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    if out.returncode:
        raise RuntimeError(f"{tree} {model}: {out.stderr[-2000:]}")
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the other checkout")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--only", default=",".join(WORKLOADS))
    parser.add_argument("--first-chunk", action="store_true", help="also the warm first chunk")
    args = parser.parse_args(argv)
    trees = {"old": args.old.resolve(), "new": ROOT}
    concurrency = [int(c) for c in args.concurrency.split(",")]
    print(f"old: {trees['old']}\nnew: {trees['new']}")
    print(f"{args.rounds} interleaved rounds, {args.prompts} prompts per figure, 2 workers")
    for model in args.only.split(","):
        samples: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                samples[name].append(
                    sample(tree, model, concurrency, args.prompts, args.first_chunk)
                )
        for c in concurrency:
            line = f"{model:<13} {c} at once:"
            medians = {}
            for name in trees:
                rates = [one[c][0] for one in samples[name]]
                lags = [one[c][1] for one in samples[name]]
                medians[name] = statistics.median(rates)
                line += (
                    f"  {name} {medians[name]:6.1f} p/s ({min(rates):.1f}-{max(rates):.1f}),"
                    f" lag p99 {statistics.median(lags):5.1f} ms"
                )
            print(f"{line}  new/old {medians['new'] / medians['old']:.2f}x")
        if args.first_chunk:
            line = f"{model:<13} warm first chunk p50:"
            for name in trees:
                firsts = [one[0][0] for one in samples[name]]
                line += f"  {name} {statistics.median(firsts):.3f} ms"
                line += f" ({min(firsts):.3f}-{max(firsts):.3f})"
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
