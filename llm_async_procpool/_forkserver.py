"""Imported once by the forkserver, so every worker forked from it starts warm.

Importing llm and its plugins takes about a second; done here, a new or
replacement worker is ready in milliseconds. Never raises: an exception here
would take the forkserver, and every later worker, down with it.
"""

try:
    import llm

    from . import worker  # noqa: F401

    llm.load_plugins()
except BaseException:  # a broken plugin fails its own prompts, not the forkserver
    pass
