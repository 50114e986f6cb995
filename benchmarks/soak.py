"""Soak: many prompts at once, some cancelled at random, some crashing their worker.

    python -m benchmarks.soak --prompts 10000 --concurrency 16 --cancel 0.1 --crash 0.01

Checks that every completed prompt's text is exactly what the deterministic
model produces, that every crash is reported as WorkerCrashed, and that the
number of child processes, the parent's open file descriptors and its RSS come
back to their starting values. Ends with a one-line summary; exits 1 on a
failed check.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import time

import llm

from benchmarks.models import register_plugin
from llm_async_procpool import WorkerCrashed, live_pools, shutdown_pools


def descendants(pid: int) -> list[int]:
    """Live descendants: workers are children of the forkserver, not of us."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def snapshot() -> dict:
    gc.collect()
    return {
        "processes": len(descendants(os.getpid())),
        "fds": open_fds(),
        "rss_mb": rss_mb(),
    }


async def soak(args) -> int:
    model = llm.get_async_model("soak")
    rng = random.Random(args.seed)
    semaphore = asyncio.Semaphore(args.concurrency)
    counts = {"completed": 0, "cancelled": 0, "crashed": 0, "wrong": 0, "errors": 0}
    errors: list[str] = []

    async def one(i: int, fate: str) -> None:
        async with semaphore:
            response = model.prompt(
                f"p{i}", tokens=args.tokens, work=args.work, crash=fate == "crash"
            )
            expected = "".join(f"p{i}-{k} " for k in range(args.tokens))
            task = asyncio.ensure_future(response.text())
            if fate == "cancel":
                await asyncio.sleep(rng.random() * args.cancel_window)
                task.cancel()
            try:
                text = await task
            except asyncio.CancelledError:
                counts["cancelled"] += 1
                return
            except WorkerCrashed:
                counts["crashed" if fate == "crash" else "errors"] += 1
                if fate != "crash":
                    errors.append(f"prompt {i}: unexpected crash")
                return
            except Exception as error:
                counts["errors"] += 1
                errors.append(f"prompt {i}: {type(error).__name__}: {error}")
                return
            if fate == "crash":
                errors.append(f"prompt {i}: should have crashed")
            if text == expected:
                counts["completed"] += 1
            else:
                counts["wrong"] += 1
                errors.append(f"prompt {i}: wrong text {text[:60]!r}")

    # Warm up: start every worker, so the baseline includes them.
    await asyncio.gather(*(one(-1 - i, "ok") for i in range(args.concurrency)))
    before = snapshot()
    counts.update(dict.fromkeys(counts, 0))
    fates = []
    for _ in range(args.prompts):
        roll = rng.random()
        fates.append(
            "crash" if roll < args.crash else "cancel" if roll < args.crash + args.cancel else "ok"
        )
    started = time.monotonic()
    done = 0
    step = max(1, args.prompts // 20)
    for start in range(0, args.prompts, step):
        batch = range(start, min(start + step, args.prompts))
        await asyncio.gather(*(one(i, fates[i]) for i in batch))
        done += len(batch)
        print(
            f"\r{done}/{args.prompts} prompts, {time.monotonic() - started:.0f}s",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    elapsed = time.monotonic() - started
    final = dict(counts)  # the settling prompts below are not counted
    # Let replaced workers settle and stopped ones exit, then compare.
    await asyncio.gather(*(one(-100 - i, "ok") for i in range(args.concurrency)))
    deadline = time.monotonic() + 10
    while True:
        after = snapshot()
        if (
            after["processes"] <= before["processes"] and after["fds"] <= before["fds"]
        ) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    checks = {
        "processes": after["processes"] <= before["processes"],
        "fds": after["fds"] <= before["fds"],
        "rss": after["rss_mb"] <= before["rss_mb"] * 1.10 + 8,
        "texts": final["wrong"] == 0 and final["errors"] == 0,
        "crashes": final["crashed"] == fates.count("crash"),
    }
    for line in errors[:10]:
        print(line, file=sys.stderr)
    workers = sum(len(p.workers()) for p in live_pools())
    ok = all(checks.values())
    print(
        f"soak {'PASS' if ok else 'FAIL'}: {args.prompts} prompts at concurrency "
        f"{args.concurrency} in {elapsed:.1f}s ({args.prompts / elapsed:.0f}/s); "
        f"completed {final['completed']}, cancelled {final['cancelled']}, "
        f"crashed {final['crashed']}/{fates.count('crash')}, wrong {final['wrong']}, "
        f"errors {final['errors']}; "
        f"processes {before['processes']}->{after['processes']}, "
        f"fds {before['fds']}->{after['fds']}, "
        f"rss {before['rss_mb']:.0f}->{after['rss_mb']:.0f} MB, workers {workers}"
        + ("" if ok else f"; failed: {[k for k, v in checks.items() if not v]}")
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cancel", type=float, default=0.1, help="share cancelled")
    parser.add_argument("--crash", type=float, default=0.01, help="share crashing")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--work", type=int, default=200, help="loop iterations per token")
    parser.add_argument("--cancel-window", type=float, default=0.01, help="seconds")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    register_plugin()
    try:
        return asyncio.run(soak(args))
    finally:
        shutdown_pools()


if __name__ == "__main__":
    sys.exit(main())
