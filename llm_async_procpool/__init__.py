"""llm-async-procpool: async twins for sync-only ``llm`` models, run in a process pool.

Module map, following a prompt:

- ``config``      reads the ``LLM_ASYNC_POOL*`` environment variables
- ``twin``        the async twin registered for each sync-only model
- ``wire``        turns llm prompts and conversations into ``messages`` and back
- ``messages``    every value that crosses the process boundary
- ``pools``       the registry of live pools; ``process`` and ``thread`` pools
- ``pools.run``   a prompt in flight, as its consumer reads it
- ``worker``      what runs in the worker process (``_forkserver`` warms it up)
- ``status``, ``bench``, ``cli``   ``llm async-pool status`` and ``llm async-pool bench``
- ``errors``      what a caller can catch
"""

from __future__ import annotations

import llm

from .errors import (
    PoolClosed,
    PoolConfigError,
    PromptNotSendable,
    PromptTimeout,
    RemoteError,
    WorkerCrashed,
)
from .pools import live_pools, shutdown_pools
from .twin import AsyncKeyTwin, AsyncTwin, make_twin

__all__ = [
    "AsyncKeyTwin",
    "AsyncTwin",
    "PoolClosed",
    "PoolConfigError",
    "PromptNotSendable",
    "PromptTimeout",
    "RemoteError",
    "WorkerCrashed",
    "live_pools",
    "shutdown_pools",
]

#: Module of llm-all-models-async 0.1, whose thread-pool twins we replace.
_THREAD_TWIN_MODULE = "llm_all_models_async"


@llm.hookimpl(trylast=True)
def register_models(register, model_aliases):
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
