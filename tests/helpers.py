"""Helpers shared by the tests: processes, files and the live pools."""

import inspect
import json
import os
import subprocess
import sys
import textwrap
import time

import llm
import pytest

from llm_async_procpool import live_pools

#: llm 0.32 brought messages, stream events, hide_reasoning, options={...},
#: Response.to_dict() and the "turns" log table; 0.30 and 0.31 have none.
MODERN_LLM = "messages" in inspect.signature(llm.Prompt.__init__).parameters
needs_modern_llm = pytest.mark.skipif(
    not MODERN_LLM,
    reason="llm before 0.32 has no messages, stream events, hide_reasoning or options={}",
)


def log_table(db):
    """Where llm logs a response: "turns" (llm 0.32 and later) or "responses"."""
    names = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    return "turns" if "turns" in names else "responses"


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(root):
    """Live descendants of ``root``, through forkservers and templates."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_for_file(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return json.loads(path.read_text())
        time.sleep(0.005)
    raise AssertionError(f"{path} was not written within {timeout}s")


def probe():
    """The test probe model, as async code gets it."""
    return llm.get_async_model("probe")


def process_pool(**settings):
    """The live process pool whose settings match."""
    for pool in live_pools():
        if pool.kind == "process" and all(
            getattr(pool.settings, name) == value for name, value in settings.items()
        ):
            return pool
    raise AssertionError(f"no live process pool with {settings}")


def worker_pids(pool, busy=None):
    return [
        w.pid for w in pool.workers() if w.role == "worker" and (busy is None or w.busy == busy)
    ]


async def started(response, chunks=2):
    """Iterate until the model is really running in its worker."""
    iterator = response.__aiter__()
    for _ in range(chunks):
        await iterator.__anext__()
    return iterator


SCRIPT_HEAD = """
import asyncio, json, os, sys, threading, time
import llm
import plugin_models

def probe():
    return llm.get_async_model("probe")
"""


def run_script(tmp_path, body, timeout=60, **environ):
    """Run a script in a fresh interpreter, with the test models importable."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT_HEAD + textwrap.dedent(body))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path]),
        "LLM_ASYNC_POOL_WORKERS": "2",
        **environ,
    }
    started_at = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - started_at
