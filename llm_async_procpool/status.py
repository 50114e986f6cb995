"""What ``llm async-pool status`` reports, as a dict an app can use too."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import llm

from . import config
from .errors import PoolConfigError
from .pools import live_pools
from .twin import AsyncKeyTwin, AsyncTwin


def status() -> dict[str, Any]:
    """Settings from the environment, which models get twins, and live workers."""
    report: dict[str, Any] = {}
    try:
        settings = config.load()
    except PoolConfigError as error:
        report["error"] = str(error)
    else:
        from .pools.process import START_METHOD

        report["settings"] = {
            "pool": settings.pool.kind,
            "workers": settings.pool.workers,
            "timeout": settings.timeout,
            "grace": settings.grace,
            "idle_timeout": settings.pool.idle_timeout,
            "max_tasks": settings.pool.max_tasks,
            "nice": settings.pool.nice,
            "start_method": START_METHOD if settings.pool.kind == "process" else None,
        }
    twins, native = [], []
    for entry in llm.get_models_with_aliases():
        if entry.async_model is None or entry.model is None:
            continue
        is_twin = isinstance(entry.async_model, (AsyncTwin, AsyncKeyTwin))
        (twins if is_twin else native).append(entry.model.model_id)
    report["twins"] = sorted(twins)
    report["native_async"] = sorted(native)
    report["live_pools"] = [
        {
            "pool": pool.kind,
            "size": pool.settings.workers,
            "workers": [asdict(info) for info in pool.workers()],
        }
        for pool in live_pools()
    ]
    return report
