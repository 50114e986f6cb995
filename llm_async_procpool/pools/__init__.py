"""The one registry of live pools, keyed by the settings that shape them.

``llm.get_async_model()`` builds new model objects on every call, so pools
cannot live on a twin: they live here, one per distinct ``PoolSettings``.
A pool with nothing to do and no workers left is dropped, so pools for
settings no prompt uses any more do not pile up. At interpreter exit every
pool is shut down before ``concurrent.futures`` and ``multiprocessing`` join
their threads and children; from then on a prompt fails at once with
``PoolClosed``.

A process forked from the app (a server's worker, a ``multiprocessing``
child) starts with an empty registry: it forgets the pools it inherited
without touching them, closing only its copies of their descriptors, so the
parent's workers and prompts never see it. Its first prompt starts its own.
"""

from __future__ import annotations

import os
import threading

from ..config import PoolSettings
from ..errors import PoolClosed
from .base import Pool, WorkerInfo

__all__ = ["Pool", "WorkerInfo", "get_pool", "live_pools", "shutdown_pools"]

_live: dict[PoolSettings, Pool] = {}
_lock = threading.Lock()
_state = {"exit_hook": False, "exiting": False}


def get_pool(settings: PoolSettings) -> Pool:
    with _lock:
        if _state["exiting"]:
            raise PoolClosed("The pools are shutting down: the interpreter is exiting")
        if not _state["exit_hook"]:
            _install_exit_hook()
            _state["exit_hook"] = True
        for key in [k for k, p in _live.items() if k != settings and (p.closed or p.idle())]:
            _live.pop(key).shutdown(0)
        pool = _live.get(settings)
        if pool is None or pool.closed:
            pool = _live[settings] = _make(settings)
        return pool


def _forget_inherited() -> None:
    """In the child of a fork (registered with ``os.register_at_fork``)."""
    global _lock
    pools = list(_live.values())
    _live.clear()
    _lock = threading.Lock()  # another thread may have held it at the fork
    _state["exiting"] = False  # the exit hook itself was inherited
    for pool in pools:
        try:
            pool.forget()
        except Exception:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited)


def _make(settings: PoolSettings) -> Pool:
    if settings.kind == "thread":
        from .thread import ThreadPool

        return ThreadPool(settings)
    if settings.kind == "ray":
        from .ray import RayPool

        return RayPool(settings)
    from .process import ProcessPool

    return ProcessPool(settings)


def live_pools() -> list[Pool]:
    with _lock:
        return [pool for pool in _live.values() if not pool.closed]


def shutdown_pools(timeout: float = 5.0, keep: PoolSettings | None = None) -> None:
    """Stop every live pool (but the one for ``keep``); prompts start fresh ones."""
    with _lock:
        pools = [pool for settings, pool in _live.items() if settings != keep]
        for pool in pools:
            del _live[pool.settings]
    for pool in pools:
        pool.shutdown(timeout)


def _at_exit() -> None:
    with _lock:
        _state["exiting"] = True
    shutdown_pools()


def _install_exit_hook() -> None:
    # Must run before concurrent.futures' and multiprocessing's own exit hooks,
    # which would wait on our threads and children. threading's exit hooks run
    # first, last-in first-out, so import those modules (registering theirs)
    # before registering ours.
    try:
        import concurrent.futures.thread  # noqa: F401
        import multiprocessing.util  # noqa: F401

        threading._register_atexit(_at_exit)
    except RuntimeError:  # "can't register atexit after shutdown"
        _state["exiting"] = True
        raise PoolClosed(
            "The interpreter is shutting down: no new prompt can start "
            "(this thread ran a prompt after the main thread had finished)"
        ) from None
