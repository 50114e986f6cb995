"""Where the async twin is made: an ``llm.AsyncModel`` that runs a sync model in a pool.

The twin looks like the sync model to every caller (id, capabilities, the
``Options`` class, ``str()``, any extra attribute), so options are validated
in the parent with the model's own class. Its ``execute()`` ships the prompt
to a pool and replays what comes back onto the ``AsyncResponse``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncGenerator
from typing import Any

import llm

from . import config
from .errors import PoolClosed
from .messages import Chunks, Done
from .pools import get_pool
from .wire import apply_state, encode_job

MIRRORED = (
    "model_id",
    "can_stream",
    "attachment_types",
    "supports_schema",
    "supports_tools",
    "supports_conversation",
    "needs_key",
    "key_env_var",
    "key",
)


class _Twin:
    sync_model: llm.Model

    def __init__(self, sync_model: llm.Model):
        self.sync_model = sync_model
        for name in MIRRORED:
            if hasattr(sync_model, name):  # older llm releases lack some
                setattr(self, name, getattr(sync_model, name))
        self.Options = sync_model.Options

    def __str__(self) -> str:
        return str(self.sync_model)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the twin lacks: plugin-specific ones.
        if name.startswith("__") or name == "sync_model":
            raise AttributeError(name)
        return getattr(self.sync_model, name)

    @property
    def supported_server_side_tools(self):
        return getattr(self.sync_model, "supported_server_side_tools", ())

    async def execute(
        self,
        prompt: llm.Prompt,
        stream: bool,
        response: llm.AsyncResponse,
        conversation: llm.AsyncConversation | None = None,
        key: str | None = None,
    ) -> AsyncGenerator[Any, None]:
        settings = config.load()
        pool = get_pool(settings.pool_for(self.sync_model))
        # A plain Model may read an explicit key from its response, as llm allows.
        key = key if key is not None else getattr(response, "_key", None)
        job = encode_job(self.sync_model, prompt, stream, conversation, key)
        # Hold the response weakly: the response holds this generator, so a strong
        # reference would make a cycle, and a consumer that drops the response
        # would keep its worker busy until a garbage-collection pass.
        response_ref = weakref.ref(response)
        del response, conversation, prompt
        run = await pool.submit(self.sync_model, job, settings)
        try:
            while True:
                event = await run.next()
                if type(event) is Chunks:
                    for item in event.items:
                        yield item
                    run.take(len(event.items), event.nbytes)  # per batch: approximate
                    continue
                run.finished()
                response = response_ref()
                if event.state is not None and response is not None:
                    apply_state(event.state, response)
                del response
                if type(event) is Done:
                    if event.cancelled:  # stopped, but not by this consumer
                        raise PoolClosed(
                            f"Model {self.model_id!r} was stopped before it finished: "
                            "the pool shut down"
                        )
                    return
                raise event.error
        finally:
            run.close()


class AsyncTwin(_Twin, llm.AsyncModel):
    """Async twin of an ``llm.Model``."""

    execute = _Twin.execute


class AsyncKeyTwin(_Twin, llm.AsyncKeyModel):
    """Async twin of an ``llm.KeyModel``; the parent resolves the key."""

    execute = _Twin.execute


def prepare_pool(models: list[llm.Model]) -> None:
    """An async app is looking models up (a server listing them, a handler
    about to prompt): start the process pool's zygote now, in the background,
    so that its first prompt does not wait for it. Never fails the lookup."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return  # not an async app (the llm CLI, a sync script): nothing to prepare
    try:
        settings = config.load()
        local = [m for m in models if not config.api_backed(m)]
        if not local or settings.models:  # (per-model pools: resolving them looks models up)
            return
        pool_settings = settings.pool_for(local[0])
        if pool_settings.kind == "process":
            get_pool(pool_settings).prepare()
    except Exception:  # a bad setting, a pool shutting down: the prompt will say
        pass


def make_twin(model: llm.Model) -> llm.AsyncModel | None:
    if isinstance(model, llm.KeyModel):
        return AsyncKeyTwin(model)
    if isinstance(model, llm.Model):
        return AsyncTwin(model)
    return None
