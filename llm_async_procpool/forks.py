"""How the zygote and templates fork children on request (in their own process).

Both end in ``serve``: they wait on their socket for a ``Fork`` with the
child's fds attached, fork, and answer ``Forked(pid)`` with the read end of
a status pipe. When a child exits they reap it and write its exit code to
that pipe, as the standard library's forkserver does. The pool watches the
pipe: it becomes readable when the child ends, holding its code, or empty if
the forking process itself died.

The loop is single-threaded, so forking from it is safe. It exits when its
socket closes (the pool is done with it, or the app is gone), and its
children follow (``child.die_with_parent``).
"""

from __future__ import annotations

import array
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from .messages import Fork, Forked

STATUS = struct.Struct("<i")
MESSAGE_SIZE = 1 << 16
MAX_FDS = 4


def receive(sock: socket.socket, wait: bool = True) -> tuple[bytes, list[int]]:
    """One message and the fds that came with it; ``b""`` at end of file.
    (``socket.recv_fds`` ignores its flags before Python 3.12.)"""
    fds = array.array("i")
    data, ancillary, _flags, _address = sock.recvmsg(
        MESSAGE_SIZE, socket.CMSG_LEN(MAX_FDS * fds.itemsize), 0 if wait else socket.MSG_DONTWAIT
    )
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return data, list(fds)


def send(sock: socket.socket, value: Any, fds: list[int] | None = None) -> None:
    """One message to the pool; exit if the pool has gone."""
    try:
        socket.send_fds(sock, [pickle.dumps(value)], fds or [])
    except OSError:
        os._exit(0)


def serve(sock: socket.socket, make_child: Callable[[Fork, list[int]], None]) -> NoReturn:
    """Fork a child for each ``Fork`` on ``sock``, forever; ``make_child`` runs
    in the child with the fds that came with the request."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    status: dict[int, int] = {}  # child pid -> write end of its status pipe
    while True:
        for key, _ in selector.select():
            if key.fileobj is not sock:
                _drain(wake_r)
                _reap(status)
                continue
            try:
                data, fds = receive(sock)
            except OSError:
                data, fds = b"", []
            if not data:
                os._exit(0)  # the pool is done with us; our children follow
            request = pickle.loads(data)
            read_end, write_end = os.pipe()
            try:
                pid = os.fork()
            except OSError:  # out of processes or memory: the pool reports it
                pid = -1
            if pid == 0:
                ours = (wake_r, wake_w, read_end, write_end, *status.values())
                _become_child(selector, sock, ours, make_child, request, fds)
            for fd in fds:
                os.close(fd)
            if pid > 0:
                status[pid] = write_end
            else:
                os.close(write_end)
            send(sock, Forked(pid), [read_end])
            os.close(read_end)


def _become_child(
    selector: selectors.BaseSelector,
    sock: socket.socket,
    ours: tuple[int, ...],
    make_child: Callable[[Fork, list[int]], None],
    request: Fork,
    fds: list[int],
) -> NoReturn:
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        selector.close()
        sock.close()
        for fd in ours:
            os.close(fd)
        make_child(request, fds)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _reap(status: dict[int, int]) -> None:
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, STATUS.pack(os.waitstatus_to_exitcode(code)))
            except OSError:
                pass
            os.close(fd)
