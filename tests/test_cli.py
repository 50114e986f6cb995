"""The llm CLI, run as a user runs it: a fresh process per command."""

import os
import sqlite3
import subprocess
import sys

import pytest


def llm_cli(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "llm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def user_dir(tmp_path):
    return {"LLM_USER_PATH": str(tmp_path)}


def test_prompt_async_with_markov_prints_words_and_logs(user_dir, tmp_path):
    result = llm_cli(
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
        env=user_dir,
    )
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert len(words) == 5 and set(words) <= {"the", "cat", "sat", "on", "mat"}
    with sqlite3.connect(tmp_path / "logs.db") as db:
        rows = db.execute("select model, options_json from turns").fetchall()
    assert rows[0][0] == "markov"
    assert '"length": 5' in rows[0][1]


def test_thread_mode_markov_with_options_works_where_the_old_plugin_failed(user_dir):
    result = llm_cli(
        "prompt",
        "--async",
        "-m",
        "markov",
        "-o",
        "length",
        "3",
        "-o",
        "delay",
        "0",
        "a b c",
        env={**user_dir, "LLM_ASYNC_POOL": "thread"},
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 3


def test_bad_pool_setting_gives_a_clear_error_and_models_still_list(user_dir):
    env = {**user_dir, "LLM_ASYNC_POOL": "gpu"}
    result = llm_cli("prompt", "--async", "-m", "markov", "hi", env=env)
    assert result.returncode == 1
    assert (
        "LLM_ASYNC_POOL='gpu' is not valid: use one of process, thread" in result.stderr
    )
    listed = llm_cli("models", "list", "--async", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "markov" in listed.stdout
