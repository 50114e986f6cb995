"""Errors a caller of an async twin can catch."""

from __future__ import annotations

import asyncio

# On Python 3.10 asyncio.TimeoutError is not yet the builtin TimeoutError;
# a prompt timeout should be caught by either name.
_TIMEOUT_BASES = (
    (TimeoutError,)
    if asyncio.TimeoutError is TimeoutError
    else (asyncio.TimeoutError, TimeoutError)
)


class PoolConfigError(ValueError):
    """An ``LLM_ASYNC_POOL*`` variable has a value we cannot use.

    A ``ValueError`` so the ``llm`` CLI prints it as a plain ``Error:`` line.
    """


class PromptNotSendable(TypeError):
    """Part of a prompt cannot be pickled, so it cannot reach a worker process."""


class ReplyNotSendable(TypeError):
    """A chunk or a response attribute the model produced cannot be pickled, so
    it cannot come back from the worker process."""


class ModelNotLoadable(RuntimeError):
    """The worker process could not build or load the model."""


class PromptTimeout(*_TIMEOUT_BASES):
    """The prompt ran longer than ``LLM_ASYNC_POOL_TIMEOUT``."""


class WorkerCrashed(RuntimeError):
    """The worker process died while it ran the prompt (crash, kill, OOM)."""


class PoolClosed(RuntimeError):
    """The pool was shut down (interpreter exit) while the prompt waited or ran,
    or the prompt came after shutdown had begun."""


class RemoteError(Exception):
    """An exception from the model whose class could not be rebuilt here.

    Carries the original type name, message and the worker's traceback text.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self):
        return (type(self), (self.type_name, self.message, self.traceback_text))


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` so the worker's traceback shows in reports."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'
