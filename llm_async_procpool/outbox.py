"""How a worker's events leave it: chunks batched into frames, then one
terminal event.

Batching is what makes a fast stream cheap (one pipe write per batch, not per
chunk); the hold bounds keep it from adding latency. Whatever a model yields
or leaves in its response, the terminal event is sendable: what cannot be
pickled is replaced by a clear error naming it.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

from . import channel
from .errors import RemoteError
from .faults import describe_unsendable, portable_error
from .messages import KINDS, Chunks, Done, Failed, NeedModel, ResponseState

#: A chunk never waits in the outbox longer than this, in seconds.
MAX_HOLD = 0.002
#: Largest batch of chunks in one pipe write.
MAX_BATCH = 1024
#: Chunks closer together than this, in seconds, are a fast stream: batch them.
#: (A job's first chunk always goes at once.)
FAST_GAP = 0.001
#: Seconds after the last chunk that the flusher keeps checking without being woken.
FLUSHER_AWAKE = 0.05
#: A batch of text this long goes at once (and so counts against the bytes window).
MAX_BATCH_TEXT = 1 << 16

#: A frame on its way out: (seq, kind, pickled payload, how many chunks it carries).
Frame = tuple[int, int, bytes, int]


class Outbox:
    """Batches a fast stream's chunks so it costs one pipe write per batch.

    A chunk that comes more than ``FAST_GAP`` after the previous one goes at
    once: for a slow model a write per chunk is cheap, and batching would only
    add latency. In a fast stream a chunk waits for its batch, at most
    ``MAX_HOLD``; a flusher thread covers a model that stalls mid-batch.

    A chunk that cannot be pickled is never dropped silently: the chunks
    before it are sent, and ``error`` fails the job, naming the chunk.
    """

    def __init__(self, sink: Callable[[list[Frame]], int]):
        self._sink = sink  # sends frames (seq, kind, payload, chunks in it); returns their size
        self._held: list[Frame] = []  # the last batch, to leave with the terminal event
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._batch: list[Any] = []
        self._seq = 0
        self._model_id = ""
        self._first = 0.0
        self._last_put = 0.0
        self._chunks = 0
        self._bytes = 0
        self._text = 0  # characters of str chunks in the batch
        self.error: BaseException | None = None
        self._flusher_running = False  # started on first need: a template forks threadless
        self._flusher_asleep = False

    def start(self, seq: int, model_id: str) -> None:
        with self._lock:
            self._seq, self._model_id = seq, model_id
            self._chunks = self._bytes = 0
            self._last_put = 0.0  # a job's first chunk always goes at once
            self.error = None

    def sent(self) -> tuple[int, int]:
        return self._chunks, self._bytes

    def put(self, chunk: Any) -> None:
        now = time.perf_counter()
        with self._lock:
            if self.error is not None:
                return
            batch = self._batch
            batch.append(chunk)
            self._chunks += 1
            if type(chunk) is str:
                self._text += len(chunk)
            if len(batch) == 1:
                if now - self._last_put >= FAST_GAP:
                    self._flush_locked()
                else:
                    self._first = now
                    if not self._flusher_running:
                        self._flusher_running = True
                        threading.Thread(
                            target=self._flusher, name="outbox-flusher", daemon=True
                        ).start()
                    elif self._flusher_asleep:
                        self._wake.notify()
            elif (
                now - self._first >= MAX_HOLD / 2
                or len(batch) >= MAX_BATCH
                or self._text >= MAX_BATCH_TEXT
            ):
                self._flush_locked()
            self._last_put = now

    def flush(self, last: bool = False) -> None:
        """Send the batch now; or, when it is the job's ``last``, pickle it now (so
        a chunk that cannot be sent is known) and send it with the terminal event."""
        with self._lock:
            if self._batch:
                self._flush_locked(hold=last)

    def send(self, event: Done | Failed | NeedModel) -> None:
        """Send a terminal event, in one write with the last batch; whatever the
        event holds, something readable arrives."""
        payload = _terminal_payload(event, self._model_id)
        with self._lock:
            frames, self._held = self._held, []
            self._sink([*frames, (event.seq, KINDS[type(event)], payload, 0)])

    def _flush_locked(self, hold: bool = False) -> None:
        batch, self._batch = self._batch, []
        self._text = 0
        try:
            payload = channel.dumps(Chunks(self._seq, batch))
        except Exception:
            self._fail_batch(batch)
            return
        frame = (self._seq, KINDS[Chunks], payload, len(batch))
        if hold:
            self._held.append(frame)
            self._bytes += len(payload) + channel.HEADER.size
        else:
            self._bytes += self._sink([frame])

    def _fail_batch(self, batch: list[Any]) -> None:
        """Send the chunks before the first unpicklable one, then fail the job."""
        good: list[Any] = []
        for position, item in enumerate(batch):
            try:
                channel.dumps(item)
            except Exception as error:
                number = self._chunks - len(batch) + position + 1
                self.error = describe_unsendable(f"chunk {number}", item, self._model_id, error)
                break
            good.append(item)
        if good:
            payload = channel.dumps(Chunks(self._seq, good))
            self._bytes += self._sink([(self._seq, KINDS[Chunks], payload, len(good))])

    def _flusher(self) -> None:
        """Flush a batch the model left waiting. While chunks keep coming it
        checks every ``MAX_HOLD``, so ``put`` need not wake it for each batch;
        after a quiet spell it sleeps until ``put`` wakes it."""
        with self._wake:
            while True:
                try:
                    now = time.perf_counter()
                    if self._batch:
                        due = self._first + MAX_HOLD - now
                        if due > 0:
                            self._wake.wait(due)
                        else:
                            self._flush_locked()
                    elif now - self._last_put < FLUSHER_AWAKE:
                        self._wake.wait(MAX_HOLD)
                    else:
                        self._flusher_asleep = True
                        self._wake.wait()
                        self._flusher_asleep = False
                except Exception as error:  # never die: the next batch needs us
                    self.error = self.error or error


def _terminal_payload(event: Done | Failed | NeedModel, model_id: str) -> bytes:
    """Pickle a terminal event, degrading what cannot cross to a clear error."""
    if type(event) is Failed:
        event.error = portable_error(event.error, event.traceback)
    try:
        return channel.dumps(event)
    except Exception as error:
        problem: Exception = error
    if type(event) is Failed:  # keep the model's error; drop the state that failed
        fallback = Failed(event.seq, event.error, None, event.traceback)
    else:
        name, value, problem = _first_unsendable(getattr(event, "state", None)) or (
            "state",
            None,
            problem,
        )
        reason = describe_unsendable(f"response.{name}", value, model_id, problem)
        fallback = Failed(event.seq, reason, None, "")
    try:
        return channel.dumps(fallback)
    except Exception:
        error = getattr(event, "error", None)
        last = RemoteError(type(error).__name__, _safe_text(error, problem))
        return pickle.dumps(Failed(event.seq, last, None, getattr(event, "traceback", "")))


def _first_unsendable(state: ResponseState | None) -> tuple[str, Any, Exception] | None:
    if state is None:
        return None
    for name, value in vars(state).items():
        try:
            channel.dumps(value)
        except Exception as error:
            return name, value, error
    return None


def _safe_text(error: Any, problem: Exception) -> str:
    try:
        text = str(error)
    except Exception:
        text = "(its message could not be read)"
    return f"{text} [it could not be sent back from the worker: {type(problem).__name__}]"
