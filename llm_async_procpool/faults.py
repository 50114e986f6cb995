"""How a model's exceptions cross the process boundary, and come back as their own class.

Worker side: ``portable_error`` makes an exception survive the trip (itself
if it pickles, else an ``ErrorCopy``); ``describe_unsendable`` names what a
model produced that cannot be sent back. App side: ``decode_event`` reads an
event, turning the error in a ``Failed`` back into the model's own class
(``rebuild_error``), or into a ``RemoteError`` that says why it could not.
"""

from __future__ import annotations

import importlib
import pickle
from typing import Any

from .errors import RemoteError, RemoteTraceback, ReplyNotSendable
from .messages import ErrorCopy, Failed


def decode_event(kind: int, payload: bytes, model_id: str) -> Any:
    """An event from a worker, as the consumer gets it: a ``Failed`` carries the
    model's own exception class where this process can import it, and an
    event that cannot be read here becomes a ``Failed`` that says so."""
    try:
        event = pickle.loads(payload)
    except Exception as error:
        return Failed(
            0,
            RemoteError(
                type(error).__name__,
                f"A reply from model {model_id!r} could not be read in this process: {error}",
            ),
        )
    if type(event) is Failed:
        event.error = rebuild_error(event.error, event.traceback)
    return event


def rebuild_error(error: BaseException | ErrorCopy, traceback_text: str) -> BaseException:
    """The model's exception, as its own class where this process can import it."""
    if isinstance(error, ErrorCopy):
        error = _from_copy(error, traceback_text)
    if traceback_text and error.__traceback__ is None and error.__cause__ is None:
        error.__cause__ = RemoteTraceback(traceback_text)  # it was unpickled
    return error


def _from_copy(copy: ErrorCopy, traceback_text: str) -> BaseException:
    try:
        cls: Any = importlib.import_module(copy.module)
        for part in copy.qualname.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"{copy.qualname} is not an exception class")
        error = cls.__new__(cls, *copy.args)
        error.args = copy.args
        error.__dict__.update(copy.attributes)
        return error
    except Exception as problem:
        return RemoteError(
            copy.qualname,
            f"{copy.message} (its class {copy.module}.{copy.qualname} could not be "
            f"rebuilt in this process: {type(problem).__name__}: {problem})",
            traceback_text,
        )


def picklable(value: Any) -> bool:
    """Does it survive a round trip by reference (the plain pickler)?"""
    try:
        pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        return False
    return True


def portable_error(error: Any, traceback_text: str) -> BaseException | ErrorCopy:
    """The error itself if it survives a pickle round trip, else an ``ErrorCopy``
    the parent can rebuild as the same class. Never raises."""
    if isinstance(error, ErrorCopy) or picklable(error):
        return error
    try:
        cls = type(error)
        args = tuple(a for a in getattr(error, "args", ()) if picklable(a))
        attributes = {k: v for k, v in vars(error).items() if picklable(v)}
        return ErrorCopy(cls.__module__, cls.__qualname__, args, attributes, _text(error))
    except Exception:
        return RemoteError(type(error).__name__, _text(error), traceback_text)


def _text(error: Any) -> str:
    try:
        return str(error)
    except Exception:
        return "(its message could not be read)"


def describe_unsendable(what: str, value: Any, model_id: str, error: Exception) -> ReplyNotSendable:
    cls = type(value)
    return ReplyNotSendable(
        f"Model {model_id!r} produced {what}, a {cls.__module__}.{cls.__qualname__}, that "
        f"cannot be sent back from the worker process ({type(error).__name__}: {error}). "
        "Yield strings or picklable values, or set LLM_ASYNC_POOL=thread to run the "
        "model in-process."
    )
