"""How the reply comes back: one prompt in flight, as its consumer reads it.

Pool threads (the process pool's reactor, a thread pool's worker) and the
consumer's own loop call ``deliver()``; the consumer awaits ``next()`` on its
own event loop. Nothing here outlives the prompt, so a pool can serve many
event loops in turn, as the ``llm`` CLI needs (it calls ``asyncio.run()``
twice). Time limits are the pool's (``Task``), so they hold even when this
loop stops running.
"""

from __future__ import annotations

import asyncio
from asyncio import events
from collections import deque
from collections.abc import Callable

from ..messages import Event, Job


class Run:
    def __init__(self, job: Job, cancel: Callable[[], None], take: Callable[[int, int], None]):
        """Made by a pool's ``submit``, on the consumer's event loop."""
        self.loop = asyncio.get_running_loop()
        self.seq = job.seq
        self.model_id = job.model_id
        self._cancel = cancel
        self.take = take
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future | None = None
        self.closed = False

    def deliver(self, event: Event) -> None:
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
        if not self.closed:
            self.closed = True
            self._cancel()

    def finished(self) -> None:
        """The consumer read a terminal event: nothing left to stop."""
        self.closed = True

    def _push(self, event: Event) -> None:
        if self.closed:
            return
        self._events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
