"""One thread per process pool that waits on every worker at once.

It wakes when a process sentinel says a worker or template exited (however
it died, and whatever it did with its pipes), when a template answers on its
socket, when an event pipe it was handed has data (a cancelled prompt's last
events: ``inbox.py``), and when the pool's next timer is due (a grace-period
kill, an idle worker's retirement). The pool's callbacks run here; they must
not block.

Other threads add and remove fds through ``watch``/``unwatch``, which the
reactor applies itself between two waits, so the selector is only ever
touched by its own thread. An fd is closed only after it is unwatched
(``unwatch(fd, then=close)``), so a recycled fd number is never confused with
the old one. A failing callback is reported and the loop goes on: the
reactor must not die while the pool lives.
"""

from __future__ import annotations

import os
import selectors
import sys
import threading
import traceback
from collections.abc import Callable

Callback = Callable[[], None]


class Reactor:
    def __init__(self, name: str, tick: Callable[[], float | None]):
        self._tick = tick
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._changes: list[tuple[int, Callback | None, Callback | None]] = []
        self._stopping = False
        self._done = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def watch(self, fd: int, callback: Callback) -> None:
        self._change(fd, callback, None)

    def unwatch(self, fd: int, then: Callback | None = None) -> None:
        """Stop watching ``fd``, then call ``then`` (which may close it)."""
        self._change(fd, None, then)

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or stopped

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self.wake()

    def forget(self) -> None:
        """In a forked copy of the app, where this thread does not exist: close
        our copies of its fds."""
        for fd in (self._wake_r, self._wake_w, self._selector.fileno()):
            try:
                os.close(fd)
            except OSError:
                pass

    def _change(self, fd: int, callback: Callback | None, then: Callback | None) -> None:
        with self._lock:
            stopped = self._done
            if not stopped:
                self._changes.append((fd, callback, then))
        if stopped and then is not None:
            then()
        self.wake()

    def _apply_changes(self) -> bool:
        with self._lock:
            changes, self._changes = self._changes, []
            stopping = self._stopping
        for fd, callback, then in changes:
            try:
                if callback is None:
                    self._selector.unregister(fd)
                else:
                    self._selector.register(fd, selectors.EVENT_READ, callback)
            except (KeyError, ValueError, OSError):
                pass
            if then is not None:
                _guarded(then)
        return not stopping

    def _run(self) -> None:
        try:
            while self._apply_changes():
                timeout = _guarded(self._tick)
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        _guarded(key.data)
        finally:
            with self._lock:
                self._done = True
                leftover, self._changes = self._changes, []
            for _fd, _callback, then in leftover:
                if then is not None:
                    _guarded(then)
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass


def _guarded(function: Callable[[], float | None]) -> float | None:
    try:
        return function()
    except Exception:  # a bug of ours: report it, keep serving
        print("llm-async-procpool: error in the pool's reactor thread:", file=sys.stderr)
        traceback.print_exc()
        return 0.05
