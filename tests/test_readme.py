"""The README's examples work as written."""

import os
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()


def _block(language, after):
    return README.split(after, 1)[1].split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_quick_start_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_block("python", "## Quick start"))
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "LLM_ASYNC_POOL": "process"}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    words, usage = result.stdout.strip().splitlines()
    assert len(words.split()) == 10
    assert set(words.split()) <= set("the cat sat on the mat".split())
    assert usage.startswith("Usage(") or "input" in usage


def test_the_readme_states_the_two_set_up_commands_ci_runs():
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    test_command = _block("bash", "## Development").strip()
    assert test_command in ci
    first = _block("bash", "the process pool:").strip()
    assert first.startswith("python -m pip install . llm-markov && llm prompt --async")
