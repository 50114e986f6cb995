"""llm-async-procpool: async twins for sync-only ``llm`` models, run in a process pool.

Module map, following a prompt (the design: docs/how-it-works.md):

- ``config``       where configuration is read: the ``LLM_ASYNC_POOL*`` variables
- ``twin``         where the async twin is made: one for each sync-only model
- ``wire``         llm's prompt and conversation into ``messages``, and back
- ``messages``     every value that crosses a process boundary; ``channel``
  frames them on pipes; ``cells`` is what a worker reads between two chunks
  (stop, backpressure), in shared memory
- ``pools``        the registry of live pools (and what a fork of the app forgets)

  - ``base``       the interface, the ``Task`` record of a prompt, time limits
  - ``process``    where a prompt crosses into a worker process, and how its
    events come back; ``placement`` decides where each prompt goes (pure);
    ``slots`` is a worker's state; ``supply`` is where workers come from
    (the zygote, templates); ``templates`` is a model's template;
    ``launch`` starts processes and watches them; ``inbox`` says who reads a
    worker's events; ``reactor`` is the pool's thread; ``run`` is a prompt as
    its consumer reads it
  - ``thread``, ``ray`` (with ``ray_cluster``): the other two pools

- in the processes: ``zygote`` forks workers and templates (``forks``);
  ``template`` loads a model once; ``worker`` serves prompts with ``runner``
  (the job runner every backend shares) and ``outbox`` (how events leave);
  ``child`` is what each does first; ``ray_worker`` runs in a Ray actor;
  ``threads`` sizes native thread pools (``llama`` finds llama.cpp's
  contexts); ``faults`` carries exceptions across
- ``status``, ``cli``, ``bench``, ``bench_report``: ``llm async-pool status|bench``
- ``errors``       what a caller can catch; ``loading``: the plugin's own import

This module is the plugin's entry point. If the plugin cannot work here (a
dependency or an llm API is missing), it registers nothing, ``llm`` and its
other plugins keep working, and ``llm async-pool status`` says why.
"""

from __future__ import annotations

import llm

from .errors import (
    ModelNotLoadable,
    PoolClosed,
    PoolConfigError,
    PromptNotSendable,
    PromptTimeout,
    RemoteError,
    ReplyNotSendable,
    WorkerCrashed,
)
from .loading import IMPORT_ERROR

if IMPORT_ERROR is None:
    from .loading import (
        AsyncKeyTwin,
        AsyncTwin,
        live_pools,
        make_twin,
        prepare_pool,
        shutdown_pools,
    )

__all__ = [
    "AsyncKeyTwin",
    "AsyncTwin",
    "ModelNotLoadable",
    "PoolClosed",
    "PoolConfigError",
    "PromptNotSendable",
    "PromptTimeout",
    "RemoteError",
    "ReplyNotSendable",
    "WorkerCrashed",
    "live_pools",
    "shutdown_pools",
]

#: Module of llm-all-models-async 0.1, whose thread-pool twins we replace.
_THREAD_TWIN_MODULE = "llm_all_models_async"


@llm.hookimpl(trylast=True)
def register_models(register, model_aliases):
    if IMPORT_ERROR is not None:
        return
    twinned = []
    for entry in model_aliases:
        current = entry.async_model
        if entry.model is None:
            continue
        if current is None or type(current).__module__ == _THREAD_TWIN_MODULE:
            twin = make_twin(entry.model)
            if twin is not None:
                entry.async_model = twin
                twinned.append(entry.model)
    if twinned:
        prepare_pool(twinned)


@llm.hookimpl
def register_commands(cli):
    from .cli import register

    register(cli)
