"""Imported once by the forkserver, so every process forked from it starts warm.

Importing llm and its plugins takes about a second; done here, a new or
replacement worker is ready in milliseconds. ``LLM_ASYNC_POOL_PRELOAD`` names
more modules to import here (``torch,numpy``), so workers share their pages.
The forkserver starts with every native thread pool held to one thread (see
``pools.launch``), so it stays single-threaded and safe to fork from; each
worker sets its own share later. Never raises: an exception here would take
the forkserver, and every later worker, down with it.
"""

try:
    import importlib

    import llm

    from . import worker  # noqa: F401
    from .config import preload_modules

    llm.load_plugins()
    for _name in preload_modules():
        importlib.import_module(_name)
except BaseException:  # a broken plugin fails its own prompts, not the forkserver
    pass
