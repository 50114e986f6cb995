"""Where configuration is read: the ``LLM_ASYNC_POOL*`` environment variables.

Settings are read when a prompt runs, not when models are registered, so a
bad value never breaks ``llm models``; it fails the prompt with an error that
names the variable, the value and what is allowed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import PoolConfigError

POOL_KINDS = ("process", "thread")
DEFAULT_GRACE = 3.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_NICE = 5


@dataclass(frozen=True)
class PoolSettings:
    """What shapes a pool's workers; equal settings share one live pool."""

    kind: str = "process"
    workers: int = 1
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_tasks: int | None = None
    nice: int = DEFAULT_NICE


@dataclass(frozen=True)
class Settings:
    """Everything read for one prompt: the pool to use, and its limits."""

    pool: PoolSettings
    timeout: float | None = None
    grace: float = DEFAULT_GRACE


@functools.cache
def default_workers() -> int:
    return os.cpu_count() or 1


NAMES = (
    "LLM_ASYNC_POOL",
    "LLM_ASYNC_POOL_WORKERS",
    "LLM_ASYNC_POOL_IDLE_TIMEOUT",
    "LLM_ASYNC_POOL_MAX_TASKS",
    "LLM_ASYNC_POOL_TIMEOUT",
    "LLM_ASYNC_POOL_GRACE",
    "LLM_ASYNC_POOL_NICE",
)


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every ``LLM_ASYNC_POOL*`` variable (parsed once per value)."""
    env = os.environ if environ is None else environ
    return _parse(tuple(env.get(name, "") for name in NAMES))


@functools.lru_cache(maxsize=64)
def _parse(raw: tuple[str, ...]) -> Settings:
    env = dict(zip(NAMES, raw, strict=True))
    kind = env["LLM_ASYNC_POOL"].strip().lower() or "process"
    if kind not in POOL_KINDS:
        raise PoolConfigError(
            f"LLM_ASYNC_POOL={env['LLM_ASYNC_POOL']!r} is not valid: "
            f"use one of {', '.join(POOL_KINDS)} (default: process)"
        )
    pool = PoolSettings(
        kind=kind,
        workers=_number(env, "LLM_ASYNC_POOL_WORKERS", int, default_workers()),
        idle_timeout=_number(env, "LLM_ASYNC_POOL_IDLE_TIMEOUT", float, DEFAULT_IDLE_TIMEOUT),
        max_tasks=_number(env, "LLM_ASYNC_POOL_MAX_TASKS", int, None),
        nice=_number(env, "LLM_ASYNC_POOL_NICE", int, DEFAULT_NICE, zero_ok=True, most=19),
    )
    return Settings(
        pool=pool,
        timeout=_number(env, "LLM_ASYNC_POOL_TIMEOUT", float, None),
        grace=_number(env, "LLM_ASYNC_POOL_GRACE", float, DEFAULT_GRACE, zero_ok=True),
    )


def _number(env, name, kind, default, zero_ok=False, most=None):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    what = "an integer" if kind is int else "a number of seconds"
    bound = ">= 0" if zero_ok else "> 0"
    if most is not None:
        bound = f"from 0 to {most}"
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if (
        value is None
        or value != value
        or value < 0
        or (value == 0 and not zero_ok)
        or (most is not None and value > most)
    ):
        raise PoolConfigError(f"{name}={raw!r} is not valid: use {what} {bound}, or unset it")
    return value
