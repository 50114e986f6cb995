"""How the reply comes back: one prompt in flight, as its consumer sees it.

Pool threads (a process pool's drain thread, a thread pool's worker) call
``deliver()``; the consumer awaits ``next()`` on its own event loop. Nothing
here outlives the prompt, so a pool can serve many event loops in turn, as
the ``llm`` CLI needs (it calls ``asyncio.run()`` twice).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from ..errors import PromptTimeout
from ..messages import Event, Failed, Started


class Run:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        seq: int,
        model_id: str,
        cancel: Callable[[], None],
        take: Callable[[int], None],
        timeout: float | None = None,
    ):
        self.loop = loop
        self.seq = seq
        self.model_id = model_id
        self._cancel = cancel
        self.take = take
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future | None = None
        self._closed = False
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def deliver(self, event: Event) -> None:
        """Called from any thread."""
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
        if not self._closed:
            self._closed = True
            self._cancel()

    def finished(self) -> None:
        """The consumer read a terminal event: nothing left to stop."""
        self._disarm()
        self._closed = True

    def _push(self, event: Event) -> None:
        if self._closed:
            return
        if type(event) is Started:
            self._arm()
            return
        self._events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _arm(self) -> None:
        """(Re)start the timeout: at dispatch, and again once a model is loaded."""
        if self._timeout is not None:
            self._disarm()
            self._timer = self.loop.call_later(self._timeout, self._expire, self._timeout)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, timeout: float) -> None:
        self._timer = None
        error = PromptTimeout(
            f"Model {self.model_id!r} did not finish within "
            f"LLM_ASYNC_POOL_TIMEOUT={timeout:g} seconds; its worker was stopped"
        )
        self._push(Failed(self.seq, error))
        self.close()
