"""How ``messages`` values travel on a pipe: framed, pickled bytes.

A frame is a 17-byte header (payload length, job sequence number, kind) and a
pickled payload. The kind tells the reader what the payload is before it is
unpickled, so an event the parent cannot unpickle still ends its job when it
was the job's terminal event.

Workers write and read with blocking calls. The parent reads event pipes with
``FrameReader``, which never blocks, so one thread can serve every worker.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

import cloudpickle

HEADER = struct.Struct("<QQB")
JOB = 0  # kinds of a frame from the app: a pickled ``Job``,
CONTEXT = 5  # or a pickled ``Context``
READ_SIZE = 1 << 18


def dumps(value: Any) -> bytes:
    """Pickle with the fast C pickler; fall back to cloudpickle for what it
    cannot do, or does by reference to ``__main__`` (which the other side
    may not have)."""
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        if b"__main__" not in data:
            return data
    except Exception:
        pass
    return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def write_frame(fd: int, seq: int, kind: int, payload: bytes) -> int:
    """Write one whole frame (blocking); returns its size."""
    return write_frames(fd, [(seq, kind, payload, 0)])


def write_frames(fd: int, frames: list[tuple[int, int, bytes, int]]) -> int:
    """Write frames in one system call where the pipe takes them (blocking)."""
    parts: list[bytes] = []
    for seq, kind, payload, _chunks in frames:
        parts += (HEADER.pack(len(payload), seq, kind), payload)
    total = sum(map(len, parts))
    written = os.writev(fd, parts)
    if written < total:  # a pipe takes big frames in parts
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]
    return total


def read_frame(fd: int) -> tuple[int, int, bytes] | None:
    """Read one frame (blocking); None at end of file."""
    header = _read_exactly(fd, HEADER.size)
    if header is None:
        return None
    size, seq, kind = HEADER.unpack(header)
    payload = _read_exactly(fd, size)
    if payload is None:
        return None
    return seq, kind, payload


def _read_exactly(fd: int, size: int) -> bytes | None:
    if size == 0:
        return b""
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        count = os.readv(fd, [view[done:]])
        if count == 0:
            return None
        done += count
    return bytes(buffer)


class FrameReader:
    """Reassembles frames from a non-blocking pipe, whatever the read sizes."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)
        self._buffer = bytearray()
        self.eof = False

    def read(self) -> list[tuple[int, int, bytes, int]]:
        """Frames complete so far, as (seq, kind, payload, frame size)."""
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                self.eof = True
                break
            if not data:
                self.eof = True
                break
            self._buffer += data
            if len(data) < READ_SIZE:
                break
        return self._frames()

    def _frames(self) -> list[tuple[int, int, bytes, int]]:
        frames = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= HEADER.size:
            size, seq, kind = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + size
            if end > len(buffer):
                break
            payload = bytes(buffer[start + HEADER.size : end])
            frames.append((seq, kind, payload, end - start))
            start = end
        if start:
            del buffer[:start]
        return frames
