"""The pool inside real applications: apps that fork, run uvloop, log to files,
change directory; models that open sockets while they load; loops that stop.

Each test runs a real app shape in a fresh interpreter (a single-threaded
app forks its zygote, an app with threads executes one) and checks that
every prompt gets its own reply."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest
from helpers import SCRIPT_HEAD, descendants, pid_alive, run_script

pytestmark = pytest.mark.timeout(120)

#: Prompts that check their own replies: each sends its marker and its chunk
#: count, and fails loudly if the reply belongs to another prompt.
CHECKED = """
async def checked(name, chunks=3, delay=0.0):
    response = probe().prompt(name, chunks=chunks, delay=delay)
    text = await asyncio.wait_for(response.text(), 30)
    seen = await response.json()
    assert seen["prompt"] == name, (name, seen["prompt"])
    assert text == "".join(f"{i} " for i in range(chunks)), (name, text)
    return seen["pid"]

async def many(prefix, count, delay=0.0):
    return await asyncio.gather(
        *(checked(f"{prefix}{i}", 1 + i % 4, delay) for i in range(count))
    )
"""

THREADED = "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"


@pytest.fixture(params=["single-threaded", "threaded"])
def app_shape(request):
    """Code that makes the app single-threaded (its zygote is forked from it)
    or gives it a thread (its zygote is executed fresh)."""
    return "" if request.param == "single-threaded" else THREADED


def script(tmp_path, body, **environ):
    result, _took = run_script(tmp_path, CHECKED + textwrap.dedent(body), **environ)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# ------------------------------------------------------------ apps that fork
@pytest.mark.parametrize("child_prompts", [True, False])
def test_a_forked_child_and_its_parent_each_get_their_own_replies(
    tmp_path, app_shape, child_prompts
):
    """The child inherits the parent's pool after the parent's first prompt.
    It forgets it without touching it: its prompts start a pool of its own,
    and its exit (atexit hooks included) leaves the parent's stream running."""
    out = script(
        tmp_path,
        f"""
        async def parent_side():
            stream = asyncio.ensure_future(checked("long", chunks=40, delay=0.05))
            pids = await many("parent", 40)
            return await stream, pids

        if __name__ == "__main__":
            llm.pm.register(plugin_models, name="procpool-test-models")
            {app_shape.strip()}
            first = asyncio.run(checked("first"))
            pid = os.fork()
            if pid == 0:
                if {child_prompts}:
                    pids = asyncio.run(many("child", 40))
                    assert first not in pids, "the child used its parent's worker"
                sys.exit(0)  # a normal exit: the inherited exit hooks run
            asyncio.run(parent_side())
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            print("ok")
        """,
    )
    assert out.split() == ["ok"]


def test_a_multiprocessing_fork_child_prompts_with_a_pool_of_its_own(tmp_path):
    out = script(
        tmp_path,
        """
        import multiprocessing

        def child(queue):
            queue.put(asyncio.run(many("mp-child", 12)))

        async def parent_side(queue, process):
            stream = asyncio.ensure_future(checked("long", chunks=30, delay=0.05))
            while process.is_alive():
                await asyncio.sleep(0.05)
            return await stream, queue.get(timeout=5)

        if __name__ == "__main__":
            llm.pm.register(plugin_models, name="procpool-test-models")
            parent_pid = asyncio.run(checked("first"))
            queue = multiprocessing.get_context("fork").Queue()
            process = multiprocessing.get_context("fork").Process(target=child, args=(queue,))
            process.start()
            long_pid, child_pids = asyncio.run(parent_side(queue, process))
            assert process.exitcode == 0
            assert parent_pid not in child_pids
            print("ok")
        """,
    )
    assert out.split() == ["ok"]


APP = """
import asyncio, json, os, sys
import llm
import plugin_models

if not llm.pm.has_plugin("procpool-test-models"):
    llm.pm.register(plugin_models, name="procpool-test-models")

# at import, before gunicorn forks its workers (--preload)
PRELOADED = asyncio.run(llm.get_async_model("probe").prompt("preload", chunks=1).text())

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    name = scope["query_string"].decode()
    chunks = 1 + int(name.rsplit("-", 1)[1]) % 4
    response = llm.get_async_model("probe").prompt(name, chunks=chunks)
    text = await response.text()
    seen = await response.json()
    body = json.dumps(
        {"prompt": seen["prompt"], "text": text, "pid": os.getpid(),
         "loop": type(asyncio.get_running_loop()).__module__}
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
"""


def _free_port():
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def test_gunicorn_preload_with_uvicorn_workers_answers_every_request_with_its_own_reply(
    tmp_path,
):
    """A real server: gunicorn --preload imports the app (which prompts), then
    forks two uvicorn workers (uvloop) that prompt per request."""
    (tmp_path / "app.py").write_text(APP)
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.dirname(__file__), *sys.path]),
        "LLM_ASYNC_POOL_WORKERS": "2",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "-w",
            "2",
            "-k",
            "uvicorn.workers.UvicornWorker",
            "-b",
            f"127.0.0.1:{port}",
            "app:app",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_port(port, server)
        replies: list[dict] = []
        errors: list[str] = []

        def fetch(i):
            name = f"req-{i}"
            try:
                url = f"http://127.0.0.1:{port}/?{name}"
                with urllib.request.urlopen(url, timeout=30) as reply:
                    data = json.loads(reply.read())
                expected = "".join(f"{c} " for c in range(1 + i % 4))
                if data["prompt"] != name or data["text"] != expected:
                    errors.append(f"{name} got {data}")
                replies.append(data)
            except Exception as error:
                errors.append(f"{name}: {type(error).__name__}: {error}")

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(60)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors[:5]
        assert len(replies) == 60
        assert len({r["pid"] for r in replies}) == 2  # both workers served
        assert {r["loop"] for r in replies} == {"uvloop"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert "Traceback" not in output, output


def _wait_for_port(port, server, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited: {server.communicate()[0]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server did not start listening")


# ------------------------------------------------------------ event loops and descriptors
def test_a_single_threaded_uvloop_app_gets_its_replies(tmp_path):
    """libuv re-creates its signal pipe, at the numbers it remembers, in every
    forked child: they must never be numbers of ours."""
    out = script(
        tmp_path,
        """
        import uvloop

        async def main():
            await many("uv", 20)
            return type(asyncio.get_running_loop()).__module__

        if __name__ == "__main__":
            llm.pm.register(plugin_models, name="procpool-test-models")
            print(uvloop.run(main()))
        """,
    )
    assert out.split() == ["uvloop"]


def test_an_app_that_logs_to_a_file_keeps_its_log_and_the_models_files_apart(tmp_path, app_shape):
    """The app's log file stays open in its workers: a model that logs, then
    writes a file of its own, finds each line where it belongs."""
    out = script(
        tmp_path,
        f"""
        import logging

        class Caching(llm.Model):
            model_id = "caching"

            def execute(self, prompt, stream, response, conversation):
                logging.getLogger("model").warning("cache miss for %s", prompt.prompt)
                path = os.path.join(os.environ["CACHE_DIR"], prompt.prompt + ".cache")
                with open(path, "w") as cache:
                    cache.write("cached " + prompt.prompt)
                logging.getLogger("model").warning("cached %s", prompt.prompt)
                yield "done " + prompt.prompt

        class Plugin:
            @llm.hookimpl
            def register_models(self, register):
                register(Caching())

        async def main():
            model = llm.get_async_model("caching")
            return await asyncio.gather(*(model.prompt(f"p{{i}}").text() for i in range(8)))

        if __name__ == "__main__":
            logging.basicConfig(filename=os.environ["LOG_FILE"], level=logging.WARNING)
            llm.pm.register(Plugin(), name="caching-plugin")
            {app_shape.strip()}
            print(json.dumps(asyncio.run(main())))
        """,
        CACHE_DIR=str(tmp_path),
        LOG_FILE=str(tmp_path / "app.log"),
    )
    assert json.loads(out) == [f"done p{i}" for i in range(8)]
    for i in range(8):
        assert (tmp_path / f"p{i}.cache").read_text() == f"cached p{i}"
    log = [line for line in (tmp_path / "app.log").read_text().splitlines() if "hello" not in line]
    # (a template's warm-up prompt is "hello": it ran the model once, as documented)
    if app_shape:  # a zygote executed fresh has not run the app's logging set-up
        assert log == []
    else:  # forked from the app: its log handler works in the workers too
        assert sorted(log) == sorted(
            [f"WARNING:model:cache miss for p{i}" for i in range(8)]
            + [f"WARNING:model:cached p{i}" for i in range(8)]
        )


# ------------------------------------------------------------ what a model does while it loads
@pytest.fixture
def echo_server():
    """A loopback server that answers each line with the same line, a little
    later, on every connection: a local daemon a model keeps a connection to."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(connection):
        with connection, connection.makefile("rwb") as stream:
            for line in stream:
                time.sleep(0.005)
                stream.write(line)
                stream.flush()

    def accept():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


async def test_a_model_that_opens_a_socket_while_it_loads_is_not_shared(monkeypatch, echo_server):
    """Workers forked from a template that holds a connection would share it,
    and read each other's replies: such a template is not shared."""
    import asyncio

    import llm

    from llm_async_procpool import live_pools

    monkeypatch.setenv("PROBE_SERVER_PORT", str(echo_server))
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "431")
    model = llm.get_async_model("probe-connected")
    names = [f"question {i}" for i in range(30)]
    replies = await asyncio.wait_for(
        asyncio.gather(*(model.prompt(name).text() for name in names)), 60
    )
    assert replies == names
    (pool,) = [p for p in live_pools() if p.settings.idle_timeout == 431]
    assert pool.sharing()["probe-connected"].startswith("not shared: loading it opened a socket")
    assert not [w for w in pool.workers() if w.role == "template"]


async def test_a_failed_first_load_leaves_no_template_and_loads_once_at_a_time(
    monkeypatch, tmp_path
):
    import asyncio

    import llm

    from llm_async_procpool import live_pools

    log = tmp_path / "loads.log"
    monkeypatch.setenv("PROBE_LOAD_LOG", str(log))
    monkeypatch.setenv("PROBE_FLAKY_MARKER", str(tmp_path / "tried"))
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "432")
    model = llm.get_async_model("probe-flaky")
    texts = await asyncio.wait_for(
        asyncio.gather(*(model.prompt(str(i)).text() for i in range(4))), 60
    )
    assert all(text.startswith("ok from") for text in texts)
    (pool,) = [p for p in live_pools() if p.settings.idle_timeout == 432]
    assert pool.sharing()["probe-flaky"].startswith(
        "not shared: its warm-up prompt failed in the template (ConnectionError: the download"
    )
    assert not [w for w in pool.workers() if w.role == "template"]
    loads = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda x: x[1])
    assert 1 <= len(loads) <= 2
    if len(loads) == 2:  # the second load only once the first had finished
        assert loads[1][1] >= loads[0][2]


async def test_a_template_death_says_so_in_the_errors_of_its_workers_prompts(monkeypatch):
    import asyncio

    import llm

    from llm_async_procpool import WorkerCrashed, live_pools

    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "433")
    model = llm.get_async_model("probe-weights")
    assert (await model.prompt("warm").text()).startswith("loaded in")
    (pool,) = [p for p in live_pools() if p.settings.idle_timeout == 433]
    (template,) = [w.pid for w in pool.workers() if w.role == "template"]
    running = asyncio.ensure_future(model.prompt("long", pause=5).text())
    await asyncio.sleep(0.5)
    os.kill(template, signal.SIGKILL)
    with pytest.raises(WorkerCrashed) as info:
        await asyncio.wait_for(running, 10)
    message = str(info.value)
    assert f"the template process it was forked from (pid {template})" in message
    assert "was killed by SIGKILL" in message
    assert "Every prompt running on a worker forked from that template ended" in message
    assert (await asyncio.wait_for(model.prompt("next").text(), 30)).startswith("loaded in")


# ------------------------------------------------------------ the app's state at prompt time
async def test_a_model_sees_the_apps_directory_and_environment_when_the_prompt_is_made(
    pool_kind, tmp_path, monkeypatch
):
    import llm

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "doc.txt").write_text(f"document {name}")
    model = llm.get_async_model("probe")
    seen = []
    for name in ("a", "b"):
        monkeypatch.chdir(tmp_path / name)
        monkeypatch.setenv("PROBE_SETTING", f"setting {name}")
        response = model.prompt(
            "read", attachments=[llm.Attachment(path="doc.txt")], env="PROBE_SETTING"
        )
        await response.text()
        seen.append(await response.json())
    for name, report in zip(("a", "b"), seen, strict=True):
        assert report["contents"] == [f"document {name}"]
        if pool_kind != "ray":  # a Ray actor keeps what it started with (another machine's)
            assert report["cwd"] == str(tmp_path / name)
            assert report["env"] == f"setting {name}"


# ------------------------------------------------------------ loops that stop
@pytest.mark.parametrize("timeout", [None, "2"])
async def test_a_loop_stopped_mid_stream_and_left_open_frees_its_worker(monkeypatch, timeout):
    """An app's helper thread runs a prompt on its own loop, stops that loop
    mid-stream and keeps it: the pool's clock, not that loop, ends the
    prompt (its timeout, or the stopped-loop bound), so the only worker is
    free for the next prompt."""
    import asyncio

    from helpers import probe

    from llm_async_procpool.pools.base import STOPPED_LOOP

    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_GRACE", "0.5")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "434" if timeout else "435")
    if timeout:
        monkeypatch.setenv("LLM_ASYNC_POOL_TIMEOUT", timeout)
    assert await probe().prompt("warm", chunks=1).text() == "0 "

    def helper():
        async def first_chunk(response):
            async for _chunk in response:
                return

        loop = asyncio.new_event_loop()
        response = probe().prompt("endless", chunks=100000, delay=0.01)
        loop.run_until_complete(first_chunk(response))
        return loop, response  # stopped, not closed, and both kept

    kept = await asyncio.to_thread(helper)
    started = time.monotonic()
    bound = float(timeout) if timeout else STOPPED_LOOP
    text = await asyncio.wait_for(probe().prompt("next", chunks=2).text(), bound + 15)
    assert text == "0 1 "
    assert time.monotonic() - started < bound + 5
    kept[0].close()


def test_workers_that_exit_while_a_stopped_loop_holds_their_pipe_leak_no_fds(monkeypatch):
    """A worker per prompt; each prompt read by a loop that stops mid-stream,
    and is closed only after the worker has exited."""
    import asyncio

    from helpers import probe

    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_MAX_TASKS", "1")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "436")

    async def first_chunk(response):
        async for _chunk in response:
            return

    def one_stopped_loop():
        loop = asyncio.new_event_loop()
        response = probe().prompt("x", chunks=3, delay=0.05)
        loop.run_until_complete(first_chunk(response))
        return loop  # the worker finishes (read by the pool's reactor) and exits

    asyncio.run(probe().prompt("warm", chunks=1).text())
    time.sleep(0.5)
    before = len(os.listdir("/proc/self/fd"))
    loops = []
    for _ in range(6):
        loops.append(one_stopped_loop())
        time.sleep(0.6)  # its worker has finished and exited
    for loop in loops:
        loop.close()
    time.sleep(2.5)  # the reactor frees pipes of closed loops at its next look
    assert len(os.listdir("/proc/self/fd")) <= before + 2


# ------------------------------------------------------------ signals, orphans
def test_an_app_that_ignores_sigchld_still_learns_how_a_worker_died(tmp_path, app_shape):
    out = script(
        tmp_path,
        f"""
        import signal

        async def main():
            try:
                await probe().prompt("x", chunks=5, fail="exit", fail_after=1).text()
            except Exception as error:
                return f"{{type(error).__name__}}: {{error}}"

        if __name__ == "__main__":
            llm.pm.register(plugin_models, name="procpool-test-models")
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
            {app_shape.strip()}
            print(asyncio.run(main()))
        """,
        LLM_ASYNC_POOL_SHARE="off",  # so no template stands between the app and the worker
    )
    assert out.startswith("WorkerCrashed: ") and "exited with code 7" in out


def test_a_killed_app_without_a_main_guard_leaves_no_process_behind(tmp_path):
    """Its top-level code starts a thread and prompts; the zygote never imports
    the app's main module, so nothing of ours runs that code again, and
    everything ends with the app."""
    body = """
    threading.Thread(target=threading.Event().wait, daemon=True).start()
    llm.pm.register(plugin_models, name="procpool-test-models")

    async def main():
        from llm_async_procpool import live_pools

        first = asyncio.ensure_future(probe().prompt("a", chunks=10000, delay=0.01).text())
        second = asyncio.ensure_future(probe().prompt("b", chunks=10000, delay=0.01).text())
        while sum(w.busy for p in live_pools() for w in p.workers()) < 2:
            await asyncio.sleep(0.05)
        print("running", flush=True)
        await asyncio.gather(first, second)

    asyncio.run(main())
    """
    path = tmp_path / "script.py"
    path.write_text(SCRIPT_HEAD + textwrap.dedent(body))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path]),
        "LLM_ASYNC_POOL_WORKERS": "2",
    }
    app = subprocess.Popen([sys.executable, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout.readline().strip() == "running"
        ours = descendants(app.pid)
        assert len(ours) >= 3  # the zygote, two workers
    finally:
        app.kill()
        app.wait(10)
    deadline = time.monotonic() + 3
    while any(pid_alive(pid) for pid in ours):
        assert time.monotonic() < deadline, [pid for pid in ours if pid_alive(pid)]
        time.sleep(0.05)
