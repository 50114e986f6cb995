"""How a worker's events reach the parent: the read end of its event pipe.

While a prompt runs, its consumer's own event loop reads the pipe
(``loop.add_reader``), so a chunk wakes the loop with no thread in between.
When nobody on that loop will read any more (the prompt was cancelled or
timed out, or its loop closed), the pool's reactor thread reads instead, so
the worker's last events still end its job and free it. Between prompts an
idle worker writes nothing, and nobody needs to read.

``want`` says who reads now. Each loop adds and removes its own registration
(asyncio's are not thread-safe), so a loop reconciles itself with ``want``
when poked, and a registration no longer wanted removes itself at its next
wake, without reading. The fd is closed only when no loop and no reactor
holds it, so a recycled fd number is never mistaken for this one. When the
worker has gone while a loop still holds it (a stopped loop never runs its
callbacks), ``/dev/null`` takes its number, so the pipe itself is let go at
once; the number is freed when that loop closes or is collected
(``prune``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from asyncio import events
from collections.abc import Callable

from ..channel import FrameReader
from .reactor import Reactor

Frames = list[tuple[int, int, bytes, int]]


class Inbox:
    def __init__(
        self,
        fd: int,
        on_frames: Callable[[Frames], None],
        reactor: Callable[[], Reactor | None],
    ):
        self.fd = fd
        self.reader = FrameReader(fd)
        self._on_frames = on_frames
        self._reading = threading.Lock()  # one reader at a time, frames in order
        self._lock = threading.Lock()
        self.want: asyncio.AbstractEventLoop | Reactor | None = None
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._reactor_holds = 0  # reactor registrations not yet undone
        self._closing = False
        self._reactor = reactor  # the pool's reactor, once it has one
        self.stranded = False  # no loop could watch it, and no reactor existed yet

    def read(self) -> None:
        """Read what has come and hand it on, whoever reads now."""
        with self._reading:
            self._on_frames(self.reader.read())

    # ------------------------------------------------------------ who reads
    def to_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The prompt's consumer loop reads; the reactor if that loop is closed,
        or cannot watch a pipe (Windows' proactor loop)."""
        self._drop_closed_loops()
        if self._set(loop) and not self._poke(loop):
            self.to_reactor()

    def to_reactor(self) -> None:
        """The pool's reactor reads; if it has none yet, it adopts this pipe when
        it makes one (``stranded``)."""
        reactor = self._reactor()
        self.stranded = reactor is None
        self._set(reactor)

    def release(self) -> None:
        """Nobody reads: the job has ended. A loop's registration lapses lazily,
        so the next prompt from the same loop costs no system call."""
        self.stranded = False
        self._set(None)

    def watch_loop(self) -> bool:
        """Hand over to the reactor if the reading loop has closed or stopped
        (with a prompt still running, its last events must be read, so the worker
        is freed). True while a running loop reads: check again later."""
        want = self.want
        if not isinstance(want, asyncio.AbstractEventLoop):
            return False
        if want.is_closed() or not want.is_running():
            self.to_reactor()
            return False
        return True

    def close(self) -> None:
        """Close the fd once every reader has let go (the worker has exited)."""
        with self._lock:
            self._closing = True
            old, self.want = self.want, None
            loops = list(self._loops)
        if isinstance(old, Reactor):
            old.unwatch(self.fd, self._reactor_let_go)
        for loop in loops:
            self._poke(loop)
        with self._lock:
            held = self.fd >= 0 and (self._loops or self._reactor_holds)
            if held:  # let the pipe go now; its number stays taken until freed
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, self.fd)
                os.close(devnull)
        self._close_if_free()

    def prune(self) -> bool:
        """After ``close``: free the fd once the loops that held it have closed
        or been collected. True while it is still held."""
        self._drop_closed_loops()
        self._close_if_free()
        return self.fd >= 0

    def forget(self) -> None:
        """In a forked copy of the app: close our copy of the fd, nothing else."""
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def _drop_closed_loops(self) -> None:
        with self._lock:  # a closed loop's registration went with its selector
            for loop in [held for held in self._loops if held.is_closed()]:
                self._loops.discard(loop)

    def _set(self, want: asyncio.AbstractEventLoop | Reactor | None) -> bool:
        with self._lock:
            if self._closing or self.want is want:
                return False
            old, self.want = self.want, want
            if isinstance(want, Reactor):
                self._reactor_holds += 1
        if isinstance(old, Reactor):
            old.unwatch(self.fd, self._reactor_let_go)
        if isinstance(want, Reactor):
            want.watch(self.fd, self._on_reactor)
        return True

    # ------------------------------------------------------------ on each reader
    def _poke(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Have ``loop`` match its registration to ``want``; False if it is closed."""
        if events._get_running_loop() is loop:
            self._sync(loop)
            return True
        try:
            loop.call_soon_threadsafe(self._sync, loop)
            return True
        except RuntimeError:  # closed: its selector, with our registration, is gone
            with self._lock:
                self._loops.discard(loop)
            self._close_if_free()
            return False

    def _sync(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``'s thread."""
        unable = False
        with self._lock:
            wanted = self.want is loop
            if wanted and loop not in self._loops:
                try:
                    loop.add_reader(self.fd, self._on_loop, loop)
                    self._loops.add(loop)
                except NotImplementedError:
                    unable = True
            elif not wanted and loop in self._loops:
                loop.remove_reader(self.fd)
                self._loops.discard(loop)
        if unable:
            self.to_reactor()
        self._close_if_free()

    def _on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.want is loop:
            self.read()
        else:
            self._sync(loop)

    def _on_reactor(self) -> None:
        if isinstance(self.want, Reactor):
            self.read()

    def _reactor_let_go(self) -> None:
        with self._lock:
            self._reactor_holds -= 1
        self._close_if_free()

    def _close_if_free(self) -> None:
        with self._lock:
            if not self._closing or self._loops or self._reactor_holds or self.fd < 0:
                return
            fd, self.fd = self.fd, -1
        os.close(fd)
