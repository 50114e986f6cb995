"""llama.cpp's contexts (llama-cpp-python's ``Llama``), found without the plugin's help.

``watch()`` runs in the zygote before any model code: as ``llama_cpp`` is
imported, it wraps ``Llama`` so that each context built is recorded on the
class itself, where every process forked afterwards (a template's workers)
finds it. Two uses:

- the thread budget resizes live contexts (``Contexts``): llama-cpp-python
  fixes a context's thread counts when it is built, from the CPU count, and
  ``llama_set_n_threads`` changes them. Each gets llama-cpp-python's own
  defaults for the share: half of it (at least one) for generation, all of it
  for a prompt's batch;
- a template's warm-up ends at the context's first ``eval`` (``Loaded``):
  building the context is the load, and the warm-up prompt it would then
  evaluate on one thread is time the first prompt waits for.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import weakref
from typing import Any


class Loaded(BaseException):
    """Raised at a context's first ``eval`` in a template's warm-up: the model is
    built. (A ``BaseException``: a plugin's ``except Exception`` lets it pass.)"""


class Contexts:
    """The llama.cpp contexts this process holds, as the thread budget sees them."""

    def __init__(self):
        self.seen = 0  # contexts built when the share was last applied

    @property
    def new(self) -> bool:
        built = _built()
        return built is not None and built.count != self.seen

    def resize(self, share: int) -> None:
        built = _built()
        if built is None:
            return
        self.seen = built.count
        generation = max(share // 2, 1)
        for llama in list(built.instances):
            try:
                llama._ctx.set_n_threads(generation, share)
            except Exception:  # not a llama-cpp-python we know, or a closed context
                continue
            llama.n_threads, llama.n_threads_batch = generation, share
            llama.context_params.n_threads = generation
            llama.context_params.n_threads_batch = share


def warming_up(on: bool) -> None:
    """In a template, around its warm-up: end it at a context's first ``eval``."""
    built = _built()
    if built is not None:
        built.warming_up = on
    for finder in sys.meta_path:
        if isinstance(finder, _Finder):
            finder.warming_up = on


def watch() -> None:
    """Record every llama.cpp context this process (and its forks) will build."""
    if "llama_cpp" in sys.modules:
        _record(sys.modules["llama_cpp"], False)
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


class _Built:
    """Kept on ``llama_cpp.Llama``: its live instances, and how many were built."""

    def __init__(self, warming_up: bool):
        self.instances: weakref.WeakSet = weakref.WeakSet()
        self.count = 0
        self.warming_up = warming_up


def _built() -> _Built | None:
    llama_cpp = sys.modules.get("llama_cpp")
    return getattr(getattr(llama_cpp, "Llama", None), "_llm_async_pool_built", None)


def _record(module: Any, warming_up: bool) -> None:
    cls = getattr(module, "Llama", None)
    if not isinstance(cls, type) or "_llm_async_pool_built" in cls.__dict__:
        return
    built, build, evaluate = _Built(warming_up), cls.__init__, getattr(cls, "eval", None)

    def __init__(llama: Any, *args: Any, **kwargs: Any) -> None:
        build(llama, *args, **kwargs)
        built.instances.add(llama)
        built.count += 1

    def eval(llama: Any, *args: Any, **kwargs: Any) -> Any:
        if built.warming_up:
            raise Loaded()
        return evaluate(llama, *args, **kwargs)

    cls.__init__ = __init__
    if callable(evaluate):
        cls.eval = eval
    cls._llm_async_pool_built = built


class _Finder(importlib.abc.MetaPathFinder):
    """Lets ``llama_cpp`` import as usual, then records the contexts it builds."""

    def __init__(self):
        self.warming_up = False

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "llama_cpp":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            _record(module, self.warming_up)

        spec.loader.exec_module = exec_module
        return spec
