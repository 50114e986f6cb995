"""How the pool starts its processes, watches them and stops them.

    pool (this module)                  zygote (zygote.py)           template (template.py)
    Zygote(boot)   --fork or exec-->    loads llm; Ready
    Forker.fork(Fork, fds, then) -->    forks a worker or a          forks workers the
                                        template candidate           same way
    then(Handle)  <--------------------  Forked(pid) + status pipe

Every child has a ``Handle``: its pid; a sentinel, the status pipe its
forker writes the child's exit code to when it reaps it (empty if the forker
itself died); and a kill that cannot hit a recycled pid (through a pidfd on
Linux; elsewhere by pid, checked first against the sentinel: the pid is not
free until its forker has reaped it and said so).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import threads, zygote
from ..forks import STATUS, receive
from ..messages import EXIT_CODES, Boot, Fork, Forked

#: The zygote needs fork and fd passing on Unix sockets: Linux, macOS, the BSDs.
CAN_FORK = hasattr(os, "fork") and hasattr(socket, "send_fds") and hasattr(socket, "AF_UNIX")
#: Templates also need to know a child's threads and descriptors (Linux /proc).
CAN_SHARE = CAN_FORK and sys.platform.startswith("linux")
BOOTSTRAP = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from llm_async_procpool import zygote; zygote.main({fd})"
)


def fork_safe() -> bool:
    """Is it safe to fork this process right now? (See ``threads.forkable``.)"""
    return threading.active_count() == 1 and threads.forkable()


class Pipes:
    """A worker's job and event pipes: our ends, and the child's (sent to its forker)."""

    def __init__(self):
        self.child_jobs, self.jobs = os.pipe()
        self.events, self.child_events = os.pipe()

    def child_ends(self) -> list[int]:
        return [self.child_jobs, self.child_events]

    def close_child_ends(self) -> None:
        for fd in (self.child_jobs, self.child_events):
            _close(fd)
        self.child_jobs = self.child_events = -1

    def close(self) -> None:
        self.close_child_ends()
        for fd in (self.jobs, self.events):
            _close(fd)
        self.jobs = self.events = -1


class Handle:
    """A child of the zygote or of a template, as the pool sees it."""

    def __init__(self, pid: int, status: int):
        self.pid = pid
        self.sentinel = status  # readable once it has exited
        self.pidfd = -1
        if hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(pid)
            except OSError:  # already gone: the sentinel says so
                pass
        self._code: int | None = None
        self._read = False

    def ended(self) -> bool:
        return self._read or _readable(self.sentinel, 0)

    def exit_code(self, timeout: float = 1.0) -> int | None:
        """Its exit code (negative: the signal that killed it); None if its
        forker died before it could say."""
        if not self._read and self.sentinel >= 0 and _readable(self.sentinel, timeout):
            try:
                data = os.read(self.sentinel, STATUS.size)
            except OSError:
                data = b""
            if len(data) == STATUS.size:
                (self._code,) = STATUS.unpack(data)
            self._read = True
        return self._code

    def kill(self) -> None:
        try:
            if self.pidfd >= 0:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            elif not self.ended():
                os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self.sentinel, self.pidfd):
            _close(fd)
        self.sentinel = self.pidfd = -1

    forget = close  # in a forked copy of the app: only our copies of its fds go


class Forker:
    """Our end of a process that forks children on request: the zygote or a template.

    Its answers come in the order of the requests; the pool's reactor calls
    ``receive`` when the socket is readable.
    """

    def __init__(self, sock: socket.socket, pid: int):
        self.sock = sock
        self.fd = sock.fileno()
        self.pid = pid
        self.pending: deque[Callable[[Handle | None], None]] = deque()
        self.ended = False  # its socket closed: it died, or it no longer forks
        self.problem = ""  # what it said went wrong, if anything

    def fork(self, request: Fork, fds: list[int], then: Callable[[Handle | None], None]) -> None:
        """Ask for a child; ``then`` gets its Handle, or None if none will come."""
        self.pending.append(then)
        try:
            socket.send_fds(self.sock, [pickle.dumps(request)], fds)
        except OSError:
            pass  # it is dying: its end of file fails the request

    def receive(self) -> list[Any]:
        """Read what has come; answers to ``fork`` go to their callers, the
        other messages are returned. At end of file every open request fails."""
        messages = []
        while not self.ended:
            try:
                data, fds = receive(self.sock, wait=False)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data, fds = b"", []
            if not data:
                self.ended = True
                while self.pending:
                    self.pending.popleft()(None)
                break
            message = pickle.loads(data)
            if type(message) is Forked and self.pending:
                then = self.pending.popleft()
                if message.pid > 0:
                    then(Handle(message.pid, fds[0]))
                else:
                    for fd in fds:
                        _close(fd)
                    then(None)
            else:
                messages.append(message)
        return messages

    def close(self) -> None:
        """It exits when its socket closes; its children follow."""
        try:
            self.sock.close()
        except OSError:
            pass

    forget = close


class Zygote(Forker):
    """The pool's zygote: forked from the app while that is safe, else executed."""

    def __init__(self, boot: Boot, cells_fd: int, cells: Any):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.popen: subprocess.Popen | None = None
        self.forked = fork_safe()
        try:
            if self.forked:
                boot.inherited = True
                pid = os.fork()
                if pid == 0:
                    ours.close()
                    zygote.start_forked(boot, theirs, cells)
            else:
                root = os.path.dirname(os.path.dirname(os.path.dirname(zygote.__file__)))
                self.popen = subprocess.Popen(
                    [sys.executable, "-c", BOOTSTRAP.format(root=root, fd=theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    env=threads.environment(dict(os.environ), 1),
                    stdin=subprocess.DEVNULL,
                )
                pid = self.popen.pid
                socket.send_fds(ours, [pickle.dumps(boot)], [cells_fd])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        super().__init__(ours, pid)

    def close(self) -> None:
        """It exits when its socket closes; wait for that (briefly), so no zombie is left."""
        super().close()
        self.reap(1.0)

    def reap(self, timeout: float = 0.0) -> int | None:
        """Its exit code, once it has exited (collected, so no zombie is left)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.popen is not None:
                    code = self.popen.poll()
                    if code is not None:
                        return code
                else:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                    if pid:
                        return os.waitstatus_to_exitcode(status)
            except (ChildProcessError, OSError):
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    def kill(self) -> None:
        try:
            if self.popen is not None:
                self.popen.kill()
            elif not self.ended:
                os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass


def wait_all(handles: list[Handle], deadline: float) -> None:
    """Wait until every process has exited, or the deadline passes."""
    pending = [h.sentinel for h in handles if h.sentinel >= 0 and not h.ended()]
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            ready, _, _ = select.select(pending, [], [], left)
        except (OSError, ValueError):
            return
        pending = [fd for fd in pending if fd not in ready]


def describe_exit(code: int | None) -> str:
    """An exit code in words, for a crash report."""
    if code is None:
        return "ended when the process it was forked from ended"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    if code in EXIT_CODES:
        return f"{EXIT_CODES[code]} (exit code {code})"
    return f"exited with code {code}"


def _readable(fd: int, timeout: float) -> bool:
    if fd < 0:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    except (OSError, ValueError):
        return True
    return bool(ready)


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
