"""The one registry of live pools, keyed by the settings that shape them.

``llm.get_async_model()`` builds new model objects on every call, so pools
cannot live on a twin: they live here, one per distinct ``PoolSettings``, and are
shut down at interpreter exit before ``concurrent.futures`` joins its threads.
"""

from __future__ import annotations

import threading

from ..config import PoolSettings
from .base import Pool, WorkerInfo

__all__ = ["Pool", "WorkerInfo", "get_pool", "live_pools", "shutdown_pools"]

_live: dict[PoolSettings, Pool] = {}
_lock = threading.Lock()
_exit_hook_installed = False


def get_pool(settings: PoolSettings) -> Pool:
    global _exit_hook_installed
    with _lock:
        pool = _live.get(settings)
        if pool is None or pool.closed:
            if settings.kind == "process":
                from .process import ProcessPool as kind
            else:
                from .thread import ThreadPool as kind
            pool = _live[settings] = kind(settings)
            if not _exit_hook_installed:
                _install_exit_hook()
                _exit_hook_installed = True
        return pool


def live_pools() -> list[Pool]:
    with _lock:
        return list(_live.values())


def shutdown_pools(timeout: float = 5.0, keep: PoolSettings | None = None) -> None:
    """Stop every live pool (but the one for ``keep``); prompts start fresh ones."""
    with _lock:
        pools = [pool for settings, pool in _live.items() if settings != keep]
        for pool in pools:
            del _live[pool.settings]
    for pool in pools:
        pool.shutdown(timeout)


def _install_exit_hook() -> None:
    # Must run before concurrent.futures' own exit hooks, which would wait
    # forever on each serve() task. Exit hooks run last-in, first-out, so
    # import those modules (registering theirs) before registering ours.
    import concurrent.futures.process
    import concurrent.futures.thread  # noqa: F401

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(shutdown_pools)
    else:  # pragma: no cover - CPython has had it since 3.9
        import atexit

        atexit.register(shutdown_pools)
