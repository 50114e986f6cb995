"""What ``llm async-pool status`` reports, as a dict an app can use too, and
its ``-m`` check that a worker can load and run a model."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import llm


class CheckFailed(Exception):
    """``status -m MODEL`` found a problem; the message says what."""


def status() -> dict[str, Any]:
    """Settings from the environment, which models get twins, and live workers."""
    from .loading import IMPORT_ERROR

    report: dict[str, Any] = {}
    if IMPORT_ERROR is not None:
        report["plugin_error"] = (
            f"The plugin could not load here, so no model has an async twin: "
            f"{type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}"
        )
        return report
    from . import config
    from .errors import PoolConfigError
    from .pools import live_pools
    from .pools.launch import CAN_FORK, CAN_SHARE
    from .threads import usable_cores
    from .twin import AsyncKeyTwin, AsyncTwin

    try:
        settings = config.load()
    except PoolConfigError as error:
        report["error"] = str(error)
    else:
        pool = settings.pool
        report["settings"] = {
            "pool": settings.kind,
            "workers": pool.workers,
            "usable_cores": usable_cores(),
            "threads_per_worker": pool.threads,
            "timeout": settings.timeout,
            "load_timeout": settings.load_timeout,
            "grace": settings.grace,
            "idle_timeout": pool.idle_timeout,
            "max_tasks": pool.max_tasks,
            "max_memory_mb": pool.max_memory,
            "nice": pool.nice,
            "share": pool.share and CAN_SHARE,
            "api_workers": settings.api_workers,
            "models": dict(settings.models),
            "process_pool": "available" if CAN_FORK else "not available on this platform",
        }
    twins, native = [], []
    for entry in llm.get_models_with_aliases():
        if entry.async_model is None or entry.model is None:
            continue
        is_twin = isinstance(entry.async_model, (AsyncTwin, AsyncKeyTwin))
        (twins if is_twin else native).append(entry.model.model_id)
    report["twins"] = sorted(twins)
    report["native_async"] = sorted(native)
    report["live_pools"] = []
    for pool in live_pools():
        workers = [asdict(info) for info in pool.workers()]
        report["live_pools"].append(
            {
                "pool": pool.kind,
                "size": pool.settings.workers,
                "workers": workers,
                "total_pss": sum(w["memory"]["pss"] or 0 for w in workers),
                "sharing": getattr(pool, "sharing", dict)(),
                **(getattr(pool, "describe", dict)()),
            }
        )
    return report


async def check(model_id: str) -> str:
    """Load ``model_id`` in a worker and run it up to its first chunk, then stop."""
    from . import config
    from .twin import AsyncKeyTwin, AsyncTwin

    try:
        model = llm.get_async_model(model_id)
    except llm.UnknownModelError:
        raise CheckFailed(f"Unknown model: {model_id!r} (see llm models)") from None
    if not isinstance(model, (AsyncTwin, AsyncKeyTwin)):
        raise CheckFailed(
            f"{model.model_id!r} is a native async model: it runs as its plugin wrote it, "
            "and no pool is involved"
        )
    kind = config.load().pool_for(model.sync_model).kind
    response = model.prompt("hello")
    key = model.get_key() if isinstance(model, llm.AsyncKeyModel) else None
    started = time.monotonic()
    generator = model.execute(response.prompt, True, response, None, key)
    try:
        await generator.__anext__()
        what = "produced its first chunk"
    except StopAsyncIteration:
        what = "finished without a chunk"
    except Exception as error:
        raise CheckFailed(
            f"Model {model.model_id!r} failed in the {kind} pool: {type(error).__name__}: {error}"
        ) from None
    finally:
        await generator.aclose()
    seconds = time.monotonic() - started
    where = "a worker process" if kind in ("process", "ray") else "a thread"
    return (
        f"OK: model {model.model_id!r} loaded in {where} of the {kind} pool and {what} "
        f"after {seconds:.2f}s; the prompt was then stopped."
    )
