"""llm-async-procpool: async twins for sync-only ``llm`` models, run in a process pool.

Module map, following a prompt:

- ``config``      reads the ``LLM_ASYNC_POOL*`` environment variables
- ``twin``        the async twin registered for each sync-only model
- ``wire``        turns llm prompts and conversations into ``messages`` and back
- ``messages``    every value that crosses the process boundary
- ``channel``     how those values travel on a pipe (frames)
- ``pools``       the registry of live pools: ``process``, ``thread`` and ``ray``;
  ``pools.launch`` starts processes, ``pools.reactor`` watches them,
  ``pools.templates`` forks workers from a loaded model,
  ``pools.run`` is a prompt in flight, as its consumer reads it
- ``runner``      the job runner every backend shares
- ``worker``      what runs in a worker process; ``outbox`` sends its events
  back; ``ray_worker`` is the same in a Ray actor; ``template`` loads a model once
  and forks workers that share it; ``threads`` sizes native thread pools;
  ``_forkserver`` warms the forkserver up
- ``status``, ``bench``, ``cli``   ``llm async-pool status`` and ``llm async-pool bench``
- ``errors``      what a caller can catch

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
    from .loading import AsyncKeyTwin, AsyncTwin, live_pools, make_twin, shutdown_pools

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
    for entry in model_aliases:
        current = entry.async_model
        if entry.model is None:
            continue
        if current is None or type(current).__module__ == _THREAD_TWIN_MODULE:
            twin = make_twin(entry.model)
            if twin is not None:
                entry.async_model = twin


@llm.hookimpl
def register_commands(cli):
    from .cli import register

    register(cli)
