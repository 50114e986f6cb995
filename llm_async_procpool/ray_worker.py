"""What runs in a Ray actor: the same job runner as a worker process.

``pools.ray`` makes this class a Ray actor, one per worker slot. ``run`` is a
streaming generator: the job runs in a thread of the actor through
``worker.Server`` (so ``runner.run_job``, the outbox and every fidelity and
error rule are the ones a worker process uses), and the frames it writes are
yielded back as they come, several to a yield when they come fast (the outbox
never holds a chunk longer than 2 ms). When the consumer stops, Ray cancels
the generator: its ``finally`` stops the model before its next chunk.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from . import threads
from .cells import Control, local
from .messages import KINDS, TERMINAL_KINDS, NeedModel
from .outbox import Outbox
from .worker import Models, Server

#: Most chunks in one yield (a yield may pass it by one batch). Ray buffers
#: up to ``pools.ray.BACKPRESSURE`` yields: together about one window of chunks.
MAX_CHUNKS = 256
#: Seconds a quiet model may go before the stream yields nothing, so a cancel
#: reaches the generator (Ray delivers it at a yield).
HEARTBEAT = 0.05
#: Frames after which a job's stream ends: Done, Failed, or NeedModel.
LAST = TERMINAL_KINDS | {KINDS[NeedModel]}


class RayWorker:
    def __init__(self, environ: dict[str, str], count: int):
        os.environ.update(threads.environment(environ, count))
        if not threads.user_pinned(environ):
            threads.patch_cpu_count(lambda: count)
        self._frames: queue.SimpleQueue = queue.SimpleQueue()
        self._control = Control(local())
        out = Outbox(self._put)
        budget = threads.Budget(self._control.cells, count, count)  # Ray gave it `count` CPUs
        self._server = Server(Models(), out, self._control, budget)
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {"node": context.get_node_id(), "pid": os.getpid()}

    def _put(self, frames: list[tuple[int, int, bytes, int]]) -> int:
        for frame in frames:
            self._frames.put(frame)
        return sum(len(frame[2]) for frame in frames)

    def run(self, seq: int, payload: bytes, key: str | None):
        """Yield lists of (seq, kind, payload) frames until the job's terminal one."""
        with self._lock:  # one job at a time, even if Ray were to overlap two
            self._control.cancel(0)
            self._control.reset()
            job = threading.Thread(
                target=self._server.handle, args=(seq, payload, key), name="llm-job", daemon=True
            )
            job.start()
            try:
                while True:
                    try:
                        frames = [self._frames.get(timeout=HEARTBEAT)]
                    except queue.Empty:
                        yield []  # a point where Ray can deliver a cancel
                        continue
                    chunks = frames[0][3]
                    while chunks < MAX_CHUNKS:
                        try:
                            frames.append(self._frames.get_nowait())
                        except queue.Empty:
                            break
                        chunks += frames[-1][3]
                    yield [frame[:3] for frame in frames]
                    # Ray took them: the backpressure window moves on
                    self._control.take(sum(f[3] for f in frames), sum(len(f[2]) for f in frames))
                    if any(frame[1] in LAST for frame in frames):
                        return
            finally:  # finished, or cancelled by the consumer: stop the model
                self._control.cancel(seq)
                job.join()
                while not self._frames.empty():
                    self._frames.get_nowait()
