"""The plugin never breaks the host, and leaves nothing behind when the CLI exits."""

import json
import os
import subprocess
import sys
import time
import uuid

BREAK_AN_IMPORT = "import sys; sys.modules['cloudpickle'] = None"


def llm_with_a_broken_plugin(*args):
    """The llm CLI in an environment where this plugin cannot import."""
    code = f"{BREAK_AN_IMPORT}; from llm.cli import cli; sys.argv = ['llm', *sys.argv[1:]]; cli()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def test_a_plugin_that_cannot_load_leaves_llm_working(tmp_path):
    version = llm_with_a_broken_plugin("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("cli, version") or "version" in version.stdout
    models = llm_with_a_broken_plugin("models", "list")
    assert models.returncode == 0, models.stderr
    assert "markov" in models.stdout
    status = llm_with_a_broken_plugin("async-pool", "status")
    assert status.returncode == 1
    assert "The plugin could not load here, so no model has an async twin" in status.stderr
    assert "cloudpickle" in status.stderr


def _ours(marker):
    """Processes whose environment carries ``marker``: ours, started by that run."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    if marker.encode() in environ.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_no_process_of_ours_outlives_the_cli(tmp_path):
    marker = f"PROCPOOL_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), marker.split("=")[0]: marker.split("=")[1]}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm",
            "prompt",
            "--async",
            "-m",
            "markov",
            "-o",
            "length",
            "5",
            "-o",
            "delay",
            "0",
            "the cat sat on the mat",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 5
    deadline = time.monotonic() + 1.0  # the target is 0.3 s; CI machines are noisy
    while _ours(marker):
        assert time.monotonic() < deadline, f"still alive: {_ours(marker)}"
        time.sleep(0.02)


def test_pool_processes_carry_the_environment_the_check_looks_for(tmp_path):
    """A positive control for the test above: while they live, workers and
    templates carry the marker, so the check would see them."""
    marker = f"PROCPOOL_TEST_MARK={uuid.uuid4().hex}"
    code = (
        "import asyncio, json, llm\n"
        "from llm_async_procpool import live_pools\n"
        "async def main():\n"
        "    await llm.get_async_model('markov').prompt('a b c', length=2, delay=0).text()\n"
        "    print(json.dumps([w.pid for p in live_pools() for w in p.workers()]))\n"
        "asyncio.run(main())\n"
        "import sys, time; sys.stdin.readline()\n"
    )
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), marker.split("=")[0]: marker.split("=")[1]}
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pids = set(json.loads(child.stdout.readline()))
        assert pids and pids <= set(_ours(marker))
    finally:
        child.communicate("\n", timeout=30)
