"""Sync benchmark models, registered as an llm plugin for a run.

Each yields ``tokens`` chunks and does ``work`` units of its kind of work per
chunk, so every contender runs exactly the same computation.
"""

from __future__ import annotations

import hashlib
import os
import time

import llm


class _Bench(llm.Model):
    can_stream = True

    class Options(llm.Options):
        tokens: int = 40
        work: int = 20_000
        crash: bool = False

    def execute(self, prompt, stream, response, conversation):
        options = prompt.options
        for i in range(options.tokens):
            self.step(options.work)
            if options.crash and i == options.tokens // 2:
                os.kill(os.getpid(), 9)
            yield f"{prompt.prompt}-{i} "
        response.set_usage(input=1, output=options.tokens)


class GilBound(_Bench):
    """Pure Python: holds the GIL the whole time."""

    model_id = "bench-gil"

    @staticmethod
    def step(work):
        total = 0
        for i in range(work):
            total += i * i
        return total


BLOCK = b"x" * 65536


class NativeRelease(_Bench):
    """hashlib on 64 KiB blocks: releases the GIL while it hashes."""

    model_id = "bench-native"

    @staticmethod
    def step(work):
        for _ in range(max(1, work // 20_000)):
            hashlib.sha256(BLOCK).digest()


class Sleeper(_Bench):
    """IO-like: sleeps ``work`` microseconds per chunk."""

    model_id = "bench-sleep"

    @staticmethod
    def step(work):
        time.sleep(work / 1e6)


class Blast(_Bench):
    """No work at all: measures per-chunk overhead."""

    model_id = "bench-blast"

    @staticmethod
    def step(work):
        pass


class BigModel(_Bench):
    """Allocates about 200 MB the first time it runs, as a weights load would."""

    model_id = "bench-big"

    def __init__(self):
        self.weights = None

    def step(self, work):
        if self.weights is None:
            self.weights = bytearray(200 * 1024 * 1024)
            for offset in range(0, len(self.weights), 4096):  # touch every page
                self.weights[offset] = 1
        GilBound.step(work)


class Blas(_Bench):
    """numpy matrix products, as a torch or llama.cpp layer does them: BLAS runs
    them on its own thread pool, with the GIL released. The weights load lazily."""

    model_id = "bench-blas"

    def __init__(self):
        self.weights = None

    def step(self, work):
        import numpy

        if self.weights is None:
            rng = numpy.random.default_rng(0)
            self.weights = rng.standard_normal((512, 512), dtype=numpy.float32) / 23
            self.state = rng.standard_normal((512, 64), dtype=numpy.float32)
        for _ in range(max(1, work // 2_000)):
            self.state = numpy.tanh(self.weights @ self.state)


class GilPlain(llm.Model):
    """The GIL-bound workload with no options, so llm-all-models-async (which
    never copies a model's Options) can run it too."""

    model_id = "bench-gil-plain"
    can_stream = True

    def execute(self, prompt, stream, response, conversation):
        for i in range(40):
            GilBound.step(20_000)
            yield f"{prompt.prompt}-{i} "


class Soak(GilBound):
    """Deterministic output for the soak run: ``{prompt}-{i} `` per chunk."""

    model_id = "soak"


class Marked(llm.Model):
    """Yields every millisecond and writes the time its ``finally`` ran to the
    file named by the prompt: the cancel-latency probe."""

    model_id = "bench-marked"
    can_stream = True

    def execute(self, prompt, stream, response, conversation):
        try:
            for i in range(100_000):
                time.sleep(0.001)
                yield f"{i} "
        finally:
            with open(prompt.prompt, "w") as out:
                out.write(repr(time.time()))


MODELS = (GilBound, GilPlain, NativeRelease, Sleeper, Blast, BigModel, Blas, Soak, Marked)


@llm.hookimpl
def register_models(register):
    for model in MODELS:
        register(model())


def register_plugin() -> None:
    """Make these models visible to llm in this process (and, pickled, to workers)."""
    import sys

    module = sys.modules[__name__]
    if not llm.pm.has_plugin("procpool-bench-models"):
        llm.pm.register(module, name="procpool-bench-models")
