"""What runs in a worker process: its set-up, its model cache and its serve loop.

A worker is forked from the pool's zygote (``zygote.py``) or from a model's
template (``template.py``). It reads frames from its job pipe until the app
closes it: a ``Context`` (the app's directory and environment changed), or a
``Job``, which it runs with ``runner.run_job``, writing events to its event
pipe through an ``Outbox``. Nothing a model does (an unpicklable chunk, reply
or exception, an exception whose ``__str__`` raises) may stop the loop: every
job ends with exactly one terminal event.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from typing import Any

import cloudpickle
import llm

from . import channel, child, threads
from .cells import Control
from .errors import ModelNotLoadable
from .messages import (
    EXIT_CODES,
    EXIT_EVENT_PIPE,
    EXIT_JOB_PIPE,
    Boot,
    Context,
    Failed,
    Job,
    NeedModel,
)
from .outbox import Frame, Outbox
from .runner import run_job


class Models:
    """The models this process has built, by ``Job.model_key``: each at most once,
    from the plugin registry installed here, or sent pickled by the parent."""

    def __init__(self, inherited: bool = False):
        self.inherited = inherited  # forked from the app: it holds the app's own classes
        self.built: dict[str, llm.Model] = {}
        self.registry: dict[str, llm.Model] | None = None

    def get(self, job: Job) -> llm.Model | None:
        model = self.built.get(job.model_key)
        if model is None:
            if job.model_blob is not None:
                model = cloudpickle.loads(job.model_blob)
            else:
                if self.registry is None:
                    self.registry = registry()
                found = self.registry.get(job.model_id)
                if found is not None and self._same_class(found, job):
                    model = found
            if model is not None:
                for key in [k for k in self.built if k.split("\0")[0] == job.model_id]:
                    del self.built[key]  # an older version of this model id
                self.built[job.model_key] = model
        return model

    def _same_class(self, found: llm.Model, job: Job) -> bool:
        """Is our registry's model the parent's? A forked process holds the
        parent's very class objects; a fresh one imported the installed code."""
        if self.inherited:
            return id(type(found)) == job.class_id
        return class_name(found) == job.model_class


class Server:
    """Runs one job from its frame to its terminal event, whatever the model does."""

    def __init__(self, models: Models, out: Outbox, control: Control, budget: Any):
        self.models, self.out, self.control, self.budget = models, out, control, budget

    def handle(self, seq: int, payload: bytes, key: str | None = None) -> None:
        """Send exactly one of Done, Failed or NeedModel for this job; never raises.

        ``key``, when given, travels apart from the pickled job (see ``pools.ray``).
        """
        try:
            self._handle(seq, payload, key)
        except BaseException as error:  # a last guard: the caller goes on serving
            self.out.send(Failed(seq, error, None, traceback.format_exc()))

    def _handle(self, seq: int, payload: bytes, key: str | None) -> None:
        try:
            job = pickle.loads(payload)
            del payload
            if key is not None:
                job.key = key
            model = self.models.get(job)
        except BaseException as error:
            text = traceback.format_exc()
            self.out.send(Failed(seq, _not_loadable(error), None, text))
            return
        if model is None:
            self.out.send(NeedModel(seq))
            return
        self.out.start(seq, job.model_id)
        self.out.send(run_job(job, model, self.out, self.control, self.budget))


class Worker(Server):
    """A worker process: its pipes, its cells, and its serve loop."""

    def __init__(self, boot: Boot, cells: Any, index: int, jobs: int, events: int, models: Models):
        self.jobs, self.events = jobs, events
        self.threads = boot.threads
        budget = None
        if not threads.user_pinned(boot.environ):
            budget = threads.Budget(cells, boot.cores, boot.fixed_threads)
        super().__init__(models, Outbox(self._write), Control(cells, index), budget)

    def setup(self, boot: Boot) -> None:
        """Take this worker's thread share; watch the app."""
        os.environ.update(threads.environment(boot.environ, boot.threads))
        if self.budget is not None:
            threads.patch_cpu_count(self.budget.share)
        sys.setswitchinterval(0.001)  # lets the outbox flusher in within MAX_HOLD
        child.watch_parent(boot.parent)

    def _write(self, frames: list[Frame]) -> int:
        try:
            return channel.write_frames(self.events, frames)
        except BrokenPipeError:  # the app closed the pipe: nobody is left to serve
            os._exit(0)
        except OSError as error:
            lost(EXIT_EVENT_PIPE, error)

    def serve(self) -> None:
        """Run jobs until the app closes the job pipe."""
        while True:
            try:
                frame = channel.read_frame(self.jobs)
            except OSError as error:
                lost(EXIT_JOB_PIPE, error)
            if frame is None:
                return
            seq, kind, payload = frame
            del frame
            if kind == channel.CONTEXT:
                enter(pickle.loads(payload), self.threads)
            else:
                self.handle(seq, payload)


def enter(context: Context, share: int) -> None:
    """Take on the app's directory and environment, changing only what changed
    (another thread may read the environment meanwhile)."""
    try:
        os.chdir(context.cwd)
    except OSError:
        pass
    wanted = threads.environment(context.environ, share)
    for name in [name for name in os.environ if name not in wanted]:
        del os.environ[name]
    for name, value in wanted.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def lost(code: int, error: OSError) -> None:
    """A pipe failed under us: say so, and exit with a code the pool explains."""
    print(
        f"llm-async-procpool: worker {os.getpid()} {EXIT_CODES[code]}: {error}",
        file=sys.stderr,
    )
    os._exit(code)


def class_name(model: Any) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def registry() -> dict[str, llm.Model]:
    """Sync models from the plugins installed here, one plugin at a time, so a
    plugin whose models fail to build here breaks only its own models."""
    found: dict[str, llm.Model] = {}

    def register(model, async_model=None, aliases=None):
        if model is not None:
            found.setdefault(model.model_id, model)

    try:
        llm.load_plugins()
        impls = llm.pm.hook.register_models.get_hookimpls()
    except Exception:
        return found
    for impl in impls:
        if impl.plugin_name == "async_procpool" or "model_aliases" in impl.argnames:
            continue  # hooks that adjust others' registrations, ours among them
        try:
            impl.function(register=register)
        except Exception:
            pass
    return found


def _not_loadable(error: BaseException) -> BaseException:
    if isinstance(error, (ImportError, AttributeError)) and not isinstance(error, ModelNotLoadable):
        return ModelNotLoadable(
            f"The worker process could not load the model: {type(error).__name__}: {error}. "
            "A worker imports the model's module afresh, so a model defined where the "
            "worker cannot import it (a notebook cell, or a script's module that is not "
            "on the worker's path) cannot be rebuilt there. Define it in an importable "
            "module or an installed plugin, or set LLM_ASYNC_POOL=thread."
        )
    return error


# ----------------------------------------------------------------- set-up
def main(boot: Boot, cells: Any, index: int, jobs: int, events: int, models: Models) -> None:
    """A worker forked from the zygote or a template: serve until told to stop."""
    child.die_with_parent()
    worker = Worker(boot, cells, index, jobs, events, models)
    worker.setup(boot)
    worker.serve()
