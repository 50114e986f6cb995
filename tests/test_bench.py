"""`llm async-pool bench` keeps working: structure, not speed."""

import json

from click.testing import CliRunner
from llm.cli import cli

from llm_async_procpool.bench import DEFAULT_CONTENDERS as CONTENDERS


def test_bench_command_on_a_tiny_configuration(tmp_path):
    json_path, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    result = CliRunner().invoke(
        cli,
        [
            "async-pool",
            "bench",
            "-m",
            "probe",
            "-o",
            "chunks",
            "3",
            "--concurrency",
            "1,2",
            "--rounds",
            "1",
            "--workers",
            "2",
            "--json",
            str(json_path),
            "--markdown",
            str(md_path),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "probe {'chunks': 3}, 2 workers, 1 rounds" in result.output
    assert f"Wrote JSON results to {json_path}" in result.output
    assert f"Wrote Markdown results to {md_path}" in result.output
    (report,) = json.loads(json_path.read_text())
    assert report["workload"]["options"] == {"chunks": 3}
    rows = {(r["contender"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {(name, count) for name in CONTENDERS for count in (1, 2)}
    for name in ("serial", "thread", "process", "ceiling"):
        for count in (1, 2):
            row = rows[(name, count)]
            assert row["prompts_per_s"] > 0 and row["tokens_per_s"] > 0
            assert row["spread"][0] <= row["prompts_per_s"] <= row["spread"][1]
    for name in ("thread", "process"):
        assert set(rows[(name, 2)]["loop_lag_ms"]) == {"p50", "p99", "max"}
        assert set(rows[(name, 2)]["first_chunk_ms"]) == {"p50", "p95"}
    # llm-all-models-async never copies Options, so a model with options fails
    assert "Extra inputs are not permitted" in rows[("all-models-async", 1)]["error"]
    note = next(line for line in result.output.splitlines() if line.startswith("[1] "))
    assert "all-models-async" in result.output and "fails [1]" in result.output
    assert "Extra inputs are not" in note  # the whole message, wrapped, never cut
    assert "Extra inputs are not permitted" in " ".join(result.output.split())
    assert set(report["start"]) == {"process", "thread"}
    assert len([w for w in report["memory"]["workers"] if w["role"] == "worker"]) == 2
    assert "| process | 2 |" in md_path.read_text()


def test_bench_rejects_bad_arguments():
    runner = CliRunner()
    result = runner.invoke(cli, ["async-pool", "bench", "-m", "probe", "--concurrency", "a,b"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output
    result = runner.invoke(cli, ["async-pool", "bench", "-m", "probe", "--contenders", "gpu"])
    assert result.exit_code == 2 and "unknown ['gpu']" in result.output
    result = runner.invoke(cli, ["async-pool", "bench", "-m", "no-such-model"])
    assert result.exit_code == 1 and "no-such-model" in result.output


def test_plot_alone_writes_a_readable_png_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli,
        [
            *("async-pool", "bench", "-m", "probe", "--concurrency", "1,2", "--rounds", "1"),
            *("--contenders", "serial,thread,process", "--workers", "2", "--plot"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    png = tmp_path / "llm-async-pool-bench.png"
    assert f"Wrote the plot to {png}" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib_fails_before_running(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(cli, ["async-pool", "bench", "-m", "probe", "--plot"])
    assert result.exit_code == 1
    assert "--plot needs matplotlib: pip install" in result.output
    assert "round" not in result.output  # nothing ran
