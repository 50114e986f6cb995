"""The one job runner every backend shares: a sync model's ``execute()``, chunk by chunk.

A worker process, a thread of the thread pool and a Ray actor all call
``run_job``, so a model is treated the same way whatever runs it: the same
prompt objects, the same stop and backpressure checks between two chunks, the
same state captured at the end.
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Protocol

import llm

from .cells import WINDOW, WINDOW_BYTES, Control
from .messages import Done, Failed, Job
from .wire import capture_state, decode_job


class Out(Protocol):
    """Where chunks go. ``error`` is set when a chunk could not be sent."""

    error: BaseException | None

    def put(self, chunk: Any) -> None: ...
    def flush(self, last: bool = False) -> None: ...
    def sent(self) -> tuple[int, int]: ...


class Budget(Protocol):
    def adjust(self) -> None: ...


def run_job(
    job: Job, model: llm.Model, out: Out, control: Control, budget: Budget | None = None
) -> Done | Failed:
    """Run one prompt to its terminal event; never raises.

    The error in a ``Failed`` is the very object the model raised; making it
    portable is the transport's business.
    """
    seq = job.seq
    response = generator = None
    try:
        prompt, response, conversation = decode_job(job, model)
        if isinstance(model, llm.KeyModel):
            generator = model.execute(prompt, job.stream, response, conversation, key=job.key)
        else:
            generator = model.execute(prompt, job.stream, response, conversation)
        chunks = iter(generator)
        sent, taken = out.sent, control.taken
        while True:
            if control.cancelled(seq):
                _close(generator)
                out.flush(last=True)
                return Done(seq, capture_state(response), cancelled=True)
            if out.error is not None:
                raise out.error
            sent_chunks, sent_bytes = sent()
            taken_chunks, taken_bytes = taken()
            if sent_chunks - taken_chunks >= WINDOW or sent_bytes - taken_bytes >= WINDOW_BYTES:
                out.flush()
                _wait_for_window(out, control, seq)
                continue
            if budget is not None:
                budget.adjust()
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            out.put(chunk)
        out.flush(last=True)  # it leaves with Done, in one write
        if out.error is not None:
            raise out.error
        return Done(seq, capture_state(response))
    except BaseException as error:  # the model's exception goes to the consumer
        _close(generator)
        try:
            out.flush(last=True)
        except BaseException:
            pass
        text = traceback.format_exc()
        return Failed(seq, error, _state_or_none(response), text)
    finally:
        generator = None


def _state_or_none(response: Any):
    if response is None:
        return None
    try:
        return capture_state(response)
    except Exception:
        return None


def _close(generator: Any) -> None:
    """Run the model's ``finally`` blocks; an error from them changes nothing."""
    try:
        close = getattr(generator, "close", None)
        if close is not None:
            close()
    except BaseException:
        pass


def _ahead(out: Out, control: Control, fraction: float) -> bool:
    """Has the worker sent ``fraction`` of a window more than the consumer took?"""
    sent_chunks, sent_bytes = out.sent()
    taken_chunks, taken_bytes = control.taken()
    return (
        sent_chunks - taken_chunks >= WINDOW * fraction
        or sent_bytes - taken_bytes >= WINDOW_BYTES * fraction
    )


def _wait_for_window(out: Out, control: Control, seq: int) -> None:
    """Pause until the consumer has taken half the window (or the job is stopped).

    Resuming at half keeps chunks in flight while the consumer drains the rest.
    Polling is fine-grained at first, then backs off for a consumer that left:
    a paused model uses no CPU.
    """
    paused = time.monotonic()
    delay = 0.0002
    while _ahead(out, control, 0.5) and not control.cancelled(seq):
        time.sleep(delay)
        cap = 0.001 if time.monotonic() - paused < 0.5 else 0.01
        delay = min(delay * 2, cap)
