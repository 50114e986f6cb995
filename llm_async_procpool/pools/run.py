"""How the reply comes back: one prompt in flight, as its consumer sees it.

Pool threads (the process pool's reactor, a thread pool's worker) call
``deliver()``; the consumer awaits ``next()`` on its own event loop. Nothing
here outlives the prompt, so a pool can serve many event loops in turn, as
the ``llm`` CLI needs (it calls ``asyncio.run()`` twice).

The timeout starts when a worker takes the prompt (``Dispatched``). A worker
that has not run this model before must load it first, inside the model's
first ``execute()``: until the first chunk comes, the load allowance
(``LLM_ASYNC_POOL_LOAD_TIMEOUT``) applies instead.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import events
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Settings
from ..errors import PromptTimeout
from ..messages import Event, Failed, Job


@dataclass
class Dispatched:
    """Parent-side only: a worker took the prompt. ``cold``: it loads the model first."""

    cold: bool = False


def stop_allowance(settings: Settings, loading: bool, since: float) -> float:
    """Seconds a cancelled prompt's worker gets to stop before it is killed.

    The grace period; but a model's first load (``loading``, under way since
    ``since`` on the monotonic clock) may use the rest of the load allowance,
    so a cancel does not throw away a load the next prompt needs.
    """
    allowance = settings.grace
    if loading and settings.load_timeout is not None:
        allowance = max(allowance, since + settings.load_timeout - time.monotonic())
    return allowance


class Run:
    def __init__(
        self,
        job: Job,
        settings: Settings,
        cancel: Callable[[], None],
        take: Callable[[int, int], None],
    ):
        """Made by a pool's ``submit``, on the consumer's event loop."""
        self.loop = asyncio.get_running_loop()
        self.seq = job.seq
        self.model_id = job.model_id
        self._cancel = cancel
        self.take = take
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future | None = None
        self.closed = False
        self._timeout = settings.timeout
        self._load_timeout = settings.load_timeout
        self._loading = False
        self._heard = False  # an event of the job has come
        self._timer: asyncio.TimerHandle | None = None

    def deliver(self, event: Event | Dispatched) -> None:
        """Called from any thread; on the consumer's own loop it takes effect at once."""
        if events._get_running_loop() is self.loop:
            self._push(event)
            return
        try:
            self.loop.call_soon_threadsafe(self._push, event)
        except RuntimeError:  # the consumer's loop is closed: nobody will read
            self.close()

    async def next(self) -> Event:
        while not self._events:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._events.popleft()

    def close(self) -> None:
        """The consumer is done; stop the worker if it is still generating."""
        self._disarm()
        if not self.closed:
            self.closed = True
            self._cancel()

    def finished(self) -> None:
        """The consumer read a terminal event: nothing left to stop."""
        self._disarm()
        self.closed = True

    def _push(self, event: Event | Dispatched) -> None:
        if self.closed:
            return
        if type(event) is Dispatched:
            cold = event.cold and not self._heard  # it may come after a first chunk
            self._loading = cold
            self._arm(self._load_timeout if cold else self._timeout, cold)
            return
        self._heard = True
        if self._loading:  # the model is loaded: the prompt's own clock starts
            self._loading = False
            self._arm(self._timeout, False)
        self._events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _arm(self, seconds: float | None, loading: bool) -> None:
        self._disarm()
        if seconds is not None:
            self._timer = self.loop.call_later(seconds, self._expire, seconds, loading)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, seconds: float, loading: bool) -> None:
        self._timer = None
        self._loading = False
        if loading:
            what = f"did not finish loading within LLM_ASYNC_POOL_LOAD_TIMEOUT={seconds:g} seconds"
        else:
            what = f"did not finish within LLM_ASYNC_POOL_TIMEOUT={seconds:g} seconds"
        error = PromptTimeout(f"Model {self.model_id!r} {what}; its worker was stopped")
        self._push(Failed(self.seq, error))
        self.close()
