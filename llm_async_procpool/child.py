"""What every process of ours does when it starts: the zygote, templates, workers.

They live inside someone else's application, so each one makes itself a quiet
guest first: it gives the app's signals and file descriptors back, runs at a
lower priority than the app's event loop, and never outlives the app.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import stat
import sys
import threading
import time

#: Seconds between checks that the app is still alive (the fallback lifeline).
PARENT_CHECK = 0.5
PR_SET_PDEATHSIG = 1
#: Fd types that are safe to keep open in a process forked from the app.
KEEP_TYPES = (stat.S_ISREG, stat.S_ISDIR, stat.S_ISCHR, stat.S_ISBLK)


def detach_from_app(keep: set[int]) -> None:
    """In a process forked from the app: let go of the app's signals and fds.

    ``gc.freeze()`` first: the app's objects stay alive, never collected, so
    no finalizer of theirs closes a descriptor here.
    """
    gc.freeze()
    signal.set_wakeup_fd(-1)  # the app's event loop's, which this process never runs
    for number in signal.valid_signals():
        try:
            if callable(signal.getsignal(number)):
                signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError, TypeError):
            pass
    release_inherited_fds(keep)


def release_inherited_fds(keep: set[int]) -> None:
    """Let go of the app's pipes and sockets without freeing their numbers.

    A pipe or socket of the app held open here would keep its other end from
    ever seeing end of file (a subprocess's pipe, a client's connection), so
    it must go. Closing it would free its number while a library still holds
    that number: libuv re-creates its signal pipe at the numbers it
    remembers in every forked child, and a log handler keeps writing to its
    fd. So each is replaced by ``/dev/null`` at the same number, which stays
    taken. Regular files, directories and devices stay open: the app's log
    file keeps working here, and nothing waits for their end of file.
    """
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in open_fds():
            if fd <= 2 or fd in keep or fd == devnull:
                continue
            if shared_kind(fd) is not None:
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def open_fds() -> list[int]:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return sorted(int(name) for name in os.listdir(folder))
        except (OSError, ValueError):
            continue
    return list(range(3, 1024))


def shared_kind(fd: int) -> str | None:
    """What ``fd`` is, if two processes holding it would each take the other's
    data from it (a pipe, a socket, an eventfd...); None for a file, a
    directory or a device, or if it is not open."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return None
    if any(check(mode) for check in KEEP_TYPES):
        return None
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    try:  # Linux names the rest: anon_inode:[eventfd], anon_inode:[pidfd]...
        return os.readlink(f"/proc/self/fd/{fd}").replace("anon_inode:", "")
    except OSError:
        return "a special file"


def quiet(nice: int) -> None:
    """Ctrl+C is the app's to handle; the app's event loop wins the CPU."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice and hasattr(os, "nice"):
        os.nice(nice)


def die_with_parent() -> None:
    """Be killed by the kernel when the thread that forked us dies (Linux).

    Needs no thread and no GIL, so it works even while a model sits in a C
    call. Workers and templates are forked by the main thread of the zygote or
    of a template, so they follow that process.
    """
    if not sys.platform.startswith("linux"):
        return
    expected = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != expected:  # it died before the call took effect
        os._exit(0)


def watch_parent(parent: int) -> None:
    """A fallback lifeline: exit soon after the app dies, where the kernel's
    parent-death signal cannot tell (another platform)."""

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK)
            if not alive(parent):
                os._exit(0)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead process not yet reaped is a zombie
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
