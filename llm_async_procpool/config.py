"""Where configuration is read: the ``LLM_ASYNC_POOL*`` environment variables.

Settings are read when a prompt runs, not when models are registered, so a
bad value never breaks ``llm models``; it fails the prompt with an error that
names the variable, the value and what is allowed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import llm

from .errors import PoolConfigError

KINDS = ("auto", "process", "thread", "ray")
DEFAULT_GRACE = 3.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_LOAD_TIMEOUT = 600.0
DEFAULT_NICE = 5
DEFAULT_API_WORKERS = 16
MAX_WORKERS = 512
MAX_SECONDS = 1e6  # about 11 days: past that a "timeout" is a typo
MAX_THREADS = 1024
FLOAT = r"\+?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?"


@dataclass(frozen=True)
class PoolSettings:
    """What shapes a pool's workers; equal settings share one live pool."""

    kind: str = "process"
    workers: int | None = None  # None: one per usable core, within free memory
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_tasks: int | None = None
    nice: int = DEFAULT_NICE
    threads: int | None = None  # per worker; None: auto
    share: bool = True
    ray_address: str | None = None
    ray_gpus: float = 0.0
    preload: tuple[str, ...] = ()  # modules the zygote imports
    max_memory: int | None = None  # MB of private memory a worker may grow to


@dataclass(frozen=True)
class Settings:
    """Everything read for one prompt: the pools to use, and its limits."""

    pool: PoolSettings = field(default_factory=PoolSettings)
    kind: str = "auto"
    timeout: float | None = None
    grace: float = DEFAULT_GRACE
    load_timeout: float | None = DEFAULT_LOAD_TIMEOUT
    api_workers: int = DEFAULT_API_WORKERS
    models: tuple[tuple[str, str], ...] = ()

    def pool_for(self, model: Any) -> PoolSettings:
        """The pool a model runs in: its override, else the kind, where ``auto``
        runs API-backed models in threads and the rest in worker processes."""
        return _pool_for(self, model.model_id, api_backed(model))


def api_backed(model: Any) -> bool:
    """Does the model wait on a network API? It takes a key: it is a ``KeyModel``
    (an OpenAI-compatible model with its own ``api_base`` is one, although it
    needs no key), or it declares ``needs_key``."""
    return isinstance(model, llm.KeyModel) or bool(getattr(model, "needs_key", None))


@functools.lru_cache(maxsize=256)
def _pool_for(settings: Settings, model_id: str, api: bool) -> PoolSettings:
    kind = _by_model_id(settings.models).get(model_id, settings.kind)
    if kind == "auto":
        if api:
            return replace(settings.pool, kind="thread", workers=settings.api_workers)
        kind = "process"
    return replace(settings.pool, kind=kind)


@functools.lru_cache(maxsize=16)
def _by_model_id(models: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """``LLM_ASYNC_POOL_MODELS`` keyed by model id, its aliases resolved."""
    resolved = {}
    for name, kind in models:
        model: Any = None
        for get in (llm.get_model, llm.get_async_model):
            try:
                model = get(name)
                break
            except llm.UnknownModelError:
                continue
        if model is None:
            raise PoolConfigError(
                f"LLM_ASYNC_POOL_MODELS names {name!r}, which is not an installed model "
                "or alias here (see llm models)"
            )
        resolved[model.model_id] = kind
    return resolved


NAMES = (
    "LLM_ASYNC_POOL",
    "LLM_ASYNC_POOL_WORKERS",
    "LLM_ASYNC_POOL_IDLE_TIMEOUT",
    "LLM_ASYNC_POOL_MAX_TASKS",
    "LLM_ASYNC_POOL_TIMEOUT",
    "LLM_ASYNC_POOL_GRACE",
    "LLM_ASYNC_POOL_NICE",
    "LLM_ASYNC_POOL_THREADS",
    "LLM_ASYNC_POOL_LOAD_TIMEOUT",
    "LLM_ASYNC_POOL_SHARE",
    "LLM_ASYNC_POOL_API_WORKERS",
    "LLM_ASYNC_POOL_MODELS",
    "LLM_ASYNC_POOL_PRELOAD",
    "LLM_ASYNC_POOL_RAY_ADDRESS",
    "RAY_ADDRESS",
    "LLM_ASYNC_POOL_RAY_GPUS",
    "LLM_ASYNC_POOL_MAX_MEMORY",
)
_RAW_NAMES = tuple(os.fsencode(name) for name in NAMES)


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every ``LLM_ASYNC_POOL*`` variable (parsed once per value).

    Runs for every prompt: on POSIX it reads the environment's raw bytes, which
    skips a str round trip per variable.
    """
    if environ is None:
        raw = getattr(os.environ, "_data", None)
        if os.name == "posix" and isinstance(raw, dict):
            return _parse_raw(tuple(raw.get(key, b"") for key in _RAW_NAMES))
        environ = os.environ
    return _parse(tuple(environ.get(name, "") for name in NAMES))


@functools.lru_cache(maxsize=64)
def _parse_raw(raw: tuple[bytes, ...]) -> Settings:
    return _parse(tuple(os.fsdecode(value) for value in raw))


@functools.lru_cache(maxsize=64)
def _parse(raw: tuple[str, ...]) -> Settings:
    env = dict(zip(NAMES, raw, strict=True))
    kind = _kind(env, "LLM_ASYNC_POOL")
    pool = PoolSettings(
        kind=kind if kind != "auto" else "process",
        workers=_number(env, "LLM_ASYNC_POOL_WORKERS", int, None, 0, MAX_WORKERS),
        idle_timeout=_number(
            env, "LLM_ASYNC_POOL_IDLE_TIMEOUT", float, DEFAULT_IDLE_TIMEOUT, 0.0, MAX_SECONDS
        ),
        max_tasks=_number(env, "LLM_ASYNC_POOL_MAX_TASKS", int, None, 0, 10**9),
        nice=_number(env, "LLM_ASYNC_POOL_NICE", int, DEFAULT_NICE, 0, 19, zero_ok=True),
        threads=_threads(env),
        share=_flag(env, "LLM_ASYNC_POOL_SHARE", True),
        ray_address=(
            env["LLM_ASYNC_POOL_RAY_ADDRESS"].strip() or env["RAY_ADDRESS"].strip() or None
        ),
        ray_gpus=_number(
            env, "LLM_ASYNC_POOL_RAY_GPUS", float, 0.0, 0.0, 1024, zero_ok=True, what="a number"
        ),
        preload=_preload(env["LLM_ASYNC_POOL_PRELOAD"]),
        max_memory=_number(env, "LLM_ASYNC_POOL_MAX_MEMORY", int, None, 0, 10**8),
    )
    return Settings(
        pool=pool,
        kind=kind,
        timeout=_number(env, "LLM_ASYNC_POOL_TIMEOUT", float, None, 0.0, MAX_SECONDS),
        grace=_number(env, "LLM_ASYNC_POOL_GRACE", float, DEFAULT_GRACE, 0.0, 3600.0, zero_ok=True),
        load_timeout=_number(
            env, "LLM_ASYNC_POOL_LOAD_TIMEOUT", float, DEFAULT_LOAD_TIMEOUT, 0.0, MAX_SECONDS
        ),
        api_workers=_number(
            env, "LLM_ASYNC_POOL_API_WORKERS", int, DEFAULT_API_WORKERS, 0, MAX_WORKERS
        ),
        models=_models(env),
    )


@functools.lru_cache(maxsize=16)
def _preload(raw: str) -> tuple[str, ...]:
    """``LLM_ASYNC_POOL_PRELOAD``: modules the zygote imports, so workers
    share their pages (``torch,numpy``)."""
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
            raise PoolConfigError(
                f"LLM_ASYNC_POOL_PRELOAD={raw!r} is not valid: use comma-separated "
                "module names, e.g. torch,numpy"
            )
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise PoolConfigError(
                f"LLM_ASYNC_POOL_PRELOAD names {name!r}, which is not installed here: "
                "install it, or remove it from the list"
            )
    return names


def _kind(env: dict[str, str], name: str) -> str:
    kind = env[name].strip().lower() or "auto"
    if kind not in KINDS:
        raise PoolConfigError(
            f"{name}={env[name]!r} is not valid: use one of {', '.join(KINDS)} (default: auto)"
        )
    return kind


def _threads(env: dict[str, str]) -> int | None:
    raw = env["LLM_ASYNC_POOL_THREADS"].strip().lower()
    if raw in ("", "auto"):
        return None
    return _number(env, "LLM_ASYNC_POOL_THREADS", int, None, 0, MAX_THREADS)


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env[name].strip().lower()
    if not raw:
        return default
    if raw in ("1", "on", "true", "yes"):
        return True
    if raw in ("0", "off", "false", "no"):
        return False
    raise PoolConfigError(f"{name}={env[name]!r} is not valid: use on or off")


def _models(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    raw = env["LLM_ASYNC_POOL_MODELS"].strip()
    if not raw:
        return ()
    problem = (
        f"LLM_ASYNC_POOL_MODELS={raw!r} is not valid: use a JSON object of model "
        f"ids and kinds ({', '.join(KINDS)}), e.g. "
        '\'{"gpt-3.5-turbo-instruct": "thread"}\''
    )
    try:
        mapping = json.loads(raw)
    except ValueError:
        raise PoolConfigError(problem) from None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and v in KINDS for k, v in mapping.items()
    ):
        raise PoolConfigError(problem)
    return tuple(sorted(mapping.items()))


def _number(env, name, kind, default, least, most, zero_ok=False, what=None):
    """A number above ``least`` (or equal, with ``zero_ok``), at most ``most``."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if kind is int:
        what, valid = "an integer", raw.isascii() and re.fullmatch(r"\+?[0-9]+", raw)
    else:
        what = what or "a number of seconds"
        valid = raw.isascii() and re.fullmatch(FLOAT, raw)
    value = kind(raw) if valid else None
    low_ok = value is not None and (value > least or (zero_ok and value == least))
    if value is None or not low_ok or value > most or not math.isfinite(value):
        low = f">= {least:g}" if zero_ok else f"> {least:g}"
        raise PoolConfigError(
            f"{name}={raw!r} is not valid: use {what} {low} and <= {most:g}, or unset it"
        )
    return value
