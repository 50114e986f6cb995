"""The parts of the data path on their own: framing, the outbox, the inbox,
the reactor, time limits and the wire. Fast, and without worker processes."""

import asyncio
import os
import pickle
import threading
import time
from types import SimpleNamespace

import llm
import pytest

from llm_async_procpool import channel, outbox
from llm_async_procpool.messages import KINDS, Chunks, Done, ResponseState
from llm_async_procpool.pools.base import STOPPED_LOOP, Task
from llm_async_procpool.pools.inbox import Inbox
from llm_async_procpool.pools.reactor import Reactor


# ------------------------------------------------------------ framing
@pytest.mark.parametrize("read_size", [1, 7, 17, 100, 1 << 18])
def test_frames_are_reassembled_whatever_the_read_sizes(monkeypatch, read_size):
    monkeypatch.setattr(channel, "READ_SIZE", read_size)
    read_end, write_end = os.pipe()
    reader = channel.FrameReader(read_end)
    payloads = [b"", b"x", os.urandom(5000), b"y" * 100]
    channel.write_frames(write_end, [(i + 1, 1, p, 0) for i, p in enumerate(payloads)])
    got = []
    while len(got) < len(payloads):
        got += reader.read()
    assert [(seq, kind, payload) for seq, kind, payload, _ in got] == [
        (i + 1, 1, p) for i, p in enumerate(payloads)
    ]
    assert [size for *_, size in got] == [channel.HEADER.size + len(p) for p in payloads]
    os.close(write_end)
    assert reader.read() == [] and reader.eof
    os.close(read_end)


def test_a_blocking_reader_sees_end_of_file_mid_frame_as_the_end():
    read_end, write_end = os.pipe()
    os.write(write_end, channel.HEADER.pack(10, 1, 0) + b"abc")
    os.close(write_end)
    assert channel.read_frame(read_end) is None
    os.close(read_end)


# ------------------------------------------------------------ the outbox
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _outbox(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(outbox.time, "perf_counter", clock)
    sent = []

    def sink(frames):
        sent.append([(seq, kind, pickle.loads(p) if p else None) for seq, kind, p, _ in frames])
        return sum(len(f[2]) for f in frames)

    box = outbox.Outbox(sink)
    box.start(7, "model")
    return box, clock, sent


def test_a_first_chunk_and_a_slow_stream_go_at_once(monkeypatch):
    box, clock, sent = _outbox(monkeypatch)
    box.put("a")
    clock.now += 0.01  # slower than FAST_GAP
    box.put("b")
    assert [[event.items for _seq, _kind, event in frames] for frames in sent] == [[["a"]], [["b"]]]


def test_a_fast_stream_is_batched_and_its_last_batch_leaves_with_done(monkeypatch):
    box, clock, sent = _outbox(monkeypatch)
    box._flusher_running = True  # no real flusher: this test is the clock
    box.put("a")  # the job's first chunk: at once
    for chunk in "bcd":
        clock.now += outbox.FAST_GAP / 10
        box.put(chunk)
    assert len(sent) == 1  # b, c, d wait for their batch
    box.flush(last=True)
    box.send(Done(7, ResponseState()))
    (*_, last) = sent
    assert [kind for _seq, kind, _event in last] == [KINDS[Chunks], KINDS[Done]]
    assert last[0][2].items == ["b", "c", "d"]
    assert box.sent()[0] == 4


def test_a_batch_older_than_half_the_hold_goes_with_the_next_chunk(monkeypatch):
    box, clock, sent = _outbox(monkeypatch)
    box._flusher_running = True
    box.put("a")
    clock.now += outbox.FAST_GAP / 10
    box.put("b")
    clock.now += outbox.MAX_HOLD  # the batch is old now
    box.put("c")
    assert [event.items for frames in sent for _s, _k, event in frames] == [["a"], ["b", "c"]]


def test_an_unpicklable_chunk_is_named_and_nothing_before_it_is_lost(monkeypatch):
    box, clock, sent = _outbox(monkeypatch)
    box._flusher_running = True
    box.put("a")
    clock.now += outbox.FAST_GAP / 10
    box.put("b")
    clock.now += outbox.FAST_GAP / 10
    box.put(threading.Lock())
    box.flush()
    assert [event.items for frames in sent for _s, _k, event in frames] == [["a"], ["b"]]
    assert "chunk 3" in str(box.error) and "_thread.lock" in str(box.error)


# ------------------------------------------------------------ the inbox and the reactor
def test_the_reactor_applies_changes_on_its_own_thread_and_survives_a_failing_callback(capfd):
    calls = []
    reactor = Reactor("test-reactor", lambda: 0.05)
    read_end, write_end = os.pipe()
    try:

        def on_readable():
            calls.append(os.read(read_end, 10))
            raise RuntimeError("a bug of ours")

        reactor.watch(read_end, on_readable)
        os.write(write_end, b"x")
        deadline = time.monotonic() + 5
        while not calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        closed = threading.Event()
        reactor.unwatch(read_end, closed.set)  # "then" runs once it is unwatched
        assert closed.wait(5)
        assert reactor.thread.is_alive()
        assert "a bug of ours" in capfd.readouterr().err
    finally:
        reactor.stop()
        reactor.thread.join(5)
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_an_inbox_reads_on_the_consumer_loop_and_frees_its_fd_after_that_loop_closes(loop_kind):
    """Closed while a stopped loop still holds it: the pipe is let go at once
    (the number stays taken), and the number is freed once the loop closes."""
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    read_end, write_end = os.pipe()
    got = []
    inbox = Inbox(read_end, got.extend, lambda: None)

    async def receive():
        inbox.to_loop(asyncio.get_running_loop())
        channel.write_frame(write_end, 3, 1, b"hello")
        while not got:
            await asyncio.sleep(0.01)

    loop.run_until_complete(asyncio.wait_for(receive(), 5))  # the loop stops, and is kept
    assert [(seq, payload) for seq, _kind, payload, _size in got] == [(3, b"hello")]
    inbox.close()  # the worker has gone
    with pytest.raises(BrokenPipeError):  # the pipe itself is let go: no reader is left
        os.write(write_end, b"?")
    assert inbox.fd == read_end and os.readlink(f"/proc/self/fd/{read_end}") == "/dev/null"
    assert inbox.prune()  # still held by that loop
    loop.close()
    assert not inbox.prune() and inbox.fd == -1
    os.close(write_end)


# ------------------------------------------------------------ time limits
def _task(timeout=None, load_timeout=600.0, grace=3.0):
    settings = SimpleNamespace(timeout=timeout, load_timeout=load_timeout, grace=grace)
    job = SimpleNamespace(seq=1, model_id="m", model_key="m", conversation=None)
    task = Task(job, None, settings)
    task.run = SimpleNamespace(loop=asyncio.new_event_loop())
    return task


def test_a_cold_worker_gets_the_load_allowance_until_its_first_event_then_the_timeout():
    task = _task(timeout=2.0, load_timeout=100.0)
    task.begin(object(), cold=True)
    assert task.loading() and task.deadline == pytest.approx(task.started + 100.0)
    assert task.stop_allowance() > 90  # a cancel does not throw away the load
    assert task.hear() and not task.hear()
    assert task.deadline == pytest.approx(time.monotonic() + 2.0, abs=0.5)
    assert task.stop_allowance() == 3.0
    assert "LLM_ASYNC_POOL_TIMEOUT=2" in str(task.overdue(task.deadline + 1))
    task.run.loop.close()


def test_a_stopped_loop_overdues_its_prompt_after_the_bound():
    task = _task()
    task.begin(object(), cold=False)
    now = time.monotonic()
    assert task.overdue(now) is None  # stopped (not running): the clock starts
    assert task.overdue(now + STOPPED_LOOP - 1) is None
    assert "had not run for" in str(task.overdue(now + STOPPED_LOOP))
    task.run.loop.close()


# ------------------------------------------------------------ the wire
def test_a_tool_result_whose_exception_cannot_be_pickled_still_travels():
    from llm_async_procpool import wire

    class Unpicklable(Exception):
        def __init__(self):
            super().__init__("no")
            self.lock = threading.Lock()

    model = llm.get_model("probe")
    result = llm.ToolResult(name="t", output="o", tool_call_id="1", exception=Unpicklable())
    prompt = llm.Prompt("x", model, tool_results=[result], options=model.Options())
    job = wire.encode_job(model, prompt, True, None, None)
    (sent,) = pickle.loads(wire.dumps_job(job)).prompt.tool_results
    assert str(sent.exception) == "Unpicklable: no"
