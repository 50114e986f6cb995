"""The llm CLI, run as a user runs it: a fresh process per command."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest
from helpers import MODERN_LLM, log_table


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


def markov(length, text, env):
    """`llm prompt --async -m markov` with a length and no delay."""
    options = ["-o", "length", str(length), "-o", "delay", "0"]
    return llm_cli("prompt", "--async", "-m", "markov", *options, text, env=env)


def test_prompt_async_with_markov_prints_words_and_logs(user_dir, tmp_path):
    result = markov(5, "the cat sat on the mat", env=user_dir)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert len(words) == 5 and set(words) <= {"the", "cat", "sat", "on", "mat"}
    with sqlite3.connect(tmp_path / "logs.db") as db:
        rows = db.execute(f"select model, options_json from {log_table(db)}").fetchall()
    assert rows[0][0] == "markov"
    assert '"length": 5' in rows[0][1]


def test_thread_mode_markov_with_options_works_where_the_old_plugin_failed(user_dir):
    result = markov(3, "a b c", env={**user_dir, "LLM_ASYNC_POOL": "thread"})
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 3


def test_bad_pool_setting_gives_a_clear_error_and_models_still_list(user_dir):
    env = {**user_dir, "LLM_ASYNC_POOL": "gpu"}
    result = llm_cli("prompt", "--async", "-m", "markov", "hi", env=env)
    assert result.returncode == 1
    assert "LLM_ASYNC_POOL='gpu' is not valid: use one of auto, process, thread" in result.stderr
    listed = llm_cli("models", "list", "--async", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "markov" in listed.stdout


# In-process CLI runs (click's CliRunner) can use the test plugin's models.
def run_cli(*args):
    from click.testing import CliRunner
    from llm.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def last_turns(count):
    import llm

    db_path = llm.user_dir() / "logs.db"
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        return [
            dict(r)
            for r in db.execute(
                f"select * from {log_table(db)} order by rowid desc limit ?", (count,)
            )
        ][::-1]


def test_cli_options_system_attachments_and_continue(tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("attached text")
    out = run_cli(
        "prompt",
        "--async",
        "-m",
        "probe",
        "-o",
        "chunks",
        "2",
        "-s",
        "a system prompt",
        "-a",
        str(note),
        "first turn",
    )
    assert out.strip() == "0 1"
    out = run_cli("prompt", "--async", "-c", "-o", "chunks", "1", "second turn")
    assert out.strip() == "0"
    first, second = last_turns(2)
    assert first["model"] == second["model"] == "probe"
    seen = json.loads(second["response_json"])
    # llm -c reads the history back from the logs database
    if MODERN_LLM:
        assert first["thread_id"] == second["thread_id"]
        assert seen["loaded"] >= 2
        assert ["user", "first turn"] in seen["messages"]
        assert ["user", "second turn"] in seen["messages"]
    else:
        assert first["conversation_id"] == second["conversation_id"]
        assert [h["prompt"] for h in seen["history"]] == ["first turn"]
    first_seen = json.loads(first["response_json"])
    assert first_seen["system"] == "a system prompt"
    assert first_seen["attachments"][0]["path"] == str(note)
    assert first_seen["options"]["chunks"] == 2


def test_status_command_lists_twins_and_live_workers():
    out = run_cli("async-pool", "status", "-m", "probe")
    assert "Pool: auto; process workers: 2" in out
    twins = next(line for line in out.splitlines() if line.startswith("Async twins"))
    assert "markov" in twins and "probe" in twins and "probe-native" not in twins
    assert "Live process pool" in out and "PSS" in out and "shared" in out
    assert "OK: model 'probe' loaded in a worker process of the process pool" in out
    assert "first chunk after" in out and "the prompt was then stopped" in out


def run_cli_failing(*args):
    from click.testing import CliRunner
    from llm.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code != 0
    return result.output


def test_status_errors_are_one_line_with_a_nonzero_exit(monkeypatch):
    out = run_cli_failing("async-pool", "status", "-m", "nosuchmodel")
    assert out.strip() == "Error: Unknown model: 'nosuchmodel' (see llm models)"
    out = run_cli_failing("async-pool", "status", "-m", "probe-native")
    assert out.strip() == (
        "Error: 'probe-native' is a native async model: it runs as its plugin wrote it, "
        "and no pool is involved"
    )
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "lots")
    out = run_cli_failing("async-pool", "status")
    assert "Configuration error: LLM_ASYNC_POOL_WORKERS='lots' is not valid" in out
    assert out.strip().endswith("or unset it")
