"""``llm async-pool``: inspect the pool and compare pools."""

from __future__ import annotations

import asyncio
import json

import click

from .bench import CONTENDERS, DEFAULT_CONTENDERS

DEFAULT_PLOT = "llm-async-pool-bench.png"  # in the current directory


def register(cli: click.Group) -> None:
    @cli.group(name="async-pool")
    def async_pool():
        "Inspect and benchmark the async pool for sync-only models"

    @async_pool.command(name="status")
    @click.option(
        "-m",
        "--model",
        "model_id",
        help="Check that a worker can load this model: run a short prompt up to "
        "its first chunk, then stop it",
    )
    @click.option("--json", "as_json", is_flag=True, help="Output JSON")
    def status_command(model_id, as_json):
        "Show pool settings, which models get an async twin, and live workers"
        from .status import CheckFailed, check, status

        checked = None
        if model_id:
            try:
                checked = asyncio.run(check(model_id))
            except CheckFailed as error:
                raise click.ClickException(str(error)) from None
            except Exception as error:
                raise click.ClickException(f"{type(error).__name__}: {error}") from None
        report = status()
        if checked:
            report["check"] = checked
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            click.echo(render(report))
        problem = report.get("plugin_error") or report.get("error")
        if problem:
            raise click.ClickException(problem)

    @async_pool.command(name="bench")
    @click.option(
        "-m",
        "--model",
        "model_ids",
        multiple=True,
        required=True,
        help="Model to run (repeatable)",
    )
    @click.option(
        "-o",
        "--option",
        "options",
        type=(str, str),
        multiple=True,
        help="Model option, as for llm prompt",
    )
    @click.option(
        "--prompt",
        default="the cat sat on the mat and the dog sat on the log",
        show_default=True,
    )
    @click.option(
        "--concurrency",
        default="1,2,4,8",
        show_default=True,
        help="Comma-separated prompt counts run at once",
    )
    @click.option("--rounds", default=3, show_default=True, type=click.IntRange(1))
    @click.option("--workers", type=click.IntRange(1), help="Pool size (default: CPU count)")
    @click.option(
        "--contenders",
        default=",".join(DEFAULT_CONTENDERS),
        show_default=True,
        help=f"Comma-separated, from: {', '.join(CONTENDERS)}",
    )
    @click.option(
        "--json",
        "json_path",
        type=click.Path(dir_okay=False),
        help="Write results as JSON",
    )
    @click.option(
        "--markdown",
        "markdown_path",
        type=click.Path(dir_okay=False),
        help="Write a Markdown table",
    )
    @click.option(
        "--plot",
        "plot_path",
        is_flag=False,
        flag_value=DEFAULT_PLOT,
        type=click.Path(dir_okay=False),
        help=f"Write a PNG plot (needs matplotlib); --plot alone writes ./{DEFAULT_PLOT}",
    )
    def bench_command(
        model_ids,
        options,
        prompt,
        concurrency,
        rounds,
        workers,
        contenders,
        json_path,
        markdown_path,
        plot_path,
    ):
        """Compare serial, thread, process, llm-all-models-async and a raw
        multiprocessing ceiling on any installed model, side by side

        Example: llm async-pool bench -m markov -o length 200 -o delay 0
        """
        import llm

        from . import bench, bench_report

        if plot_path and not bench_report.can_plot():
            raise click.ClickException(
                "--plot needs matplotlib: pip install 'llm-async-procpool[plot]' "
                "(or pip install matplotlib)"
            )

        try:
            counts = [int(c) for c in concurrency.split(",") if c.strip()]
        except ValueError:
            raise click.BadParameter(
                "use comma-separated integers, e.g. 1,2,4,8", param_hint="--concurrency"
            ) from None
        if not counts or min(counts) < 1:
            raise click.BadParameter(
                "use comma-separated integers >= 1", param_hint="--concurrency"
            )
        chosen = [c.strip() for c in contenders.split(",") if c.strip()]
        unknown = sorted(set(chosen) - set(CONTENDERS))
        if unknown:
            raise click.BadParameter(
                f"unknown {unknown}; choose from {', '.join(CONTENDERS)}",
                param_hint="--contenders",
            )
        reports = []
        for model_id in model_ids:
            try:
                model = llm.get_model(model_id)
            except llm.UnknownModelError as error:
                raise click.ClickException(str(error)) from None
            try:
                given = model.Options(**dict(options))  # validated, typed
                validated = {name: getattr(given, name) for name in given.model_fields_set}
            except Exception as error:
                raise click.ClickException(f"Invalid option for {model_id}: {error}") from None
            workload = bench.Workload(model.model_id, prompt, validated)
            progress = bench_report.progress_bar()
            report = bench.run(workload, counts, rounds, workers, chosen, progress)
            reports.append(report)
            click.echo(
                f"\n{model.model_id} {validated}, {report['workers']} workers, "
                f"{rounds} rounds (median, min-max):"
            )
            click.echo(bench_report.table(report))
        bench_report.save(reports, json_path, markdown_path)
        for kind, path in (("JSON", json_path), ("Markdown", markdown_path)):
            if path:
                click.echo(f"Wrote {kind} results to {path}")
        if plot_path:
            click.echo(f"Wrote the plot to {bench_report.plot(reports, plot_path)}")


def render(report: dict) -> str:
    lines = []
    if "plugin_error" in report:
        return report["plugin_error"]
    if "error" in report:
        lines.append(f"Configuration error: {report['error']}")
    else:
        s = report["settings"]
        workers = s["workers"] or f"one per usable core ({s['usable_cores']}), within free memory"
        threads = s["threads_per_worker"] or "auto"
        lines.append(
            f"Pool: {s['pool']}; process workers: {workers}; threads per worker: {threads}; "
            f"process pool {s['process_pool']}; sharing a model's memory: "
            f"{'on' if s['share'] else 'off'}"
        )
        lines.append(
            f"API-backed models in auto mode: threads, up to {s['api_workers']} at once"
            + (f"; per model: {s['models']}" if s["models"] else "")
        )
        lines.append(
            f"Limits: timeout {_seconds(s['timeout'])}, load {_seconds(s['load_timeout'])}, "
            f"grace {_seconds(s['grace'])}, idle timeout {_seconds(s['idle_timeout'])}, "
            f"max tasks per worker {s['max_tasks'] or 'none'}, max memory per worker "
            f"{str(s['max_memory_mb']) + ' MB' if s['max_memory_mb'] else 'none'}, "
            f"worker nice +{s['nice']}"
        )
    lines.append(f"Async twins (run in a pool): {', '.join(report['twins']) or 'none'}")
    lines.append(
        "Native async models (left alone): " + (", ".join(report["native_async"]) or "none")
    )
    if not report["live_pools"]:
        lines.append("Live pool in this process: none")
    for pool in report["live_pools"]:
        lines.append(
            f"Live {pool['pool']} pool, size {pool['size'] or 'auto'}, "
            f"total PSS {_mb(pool['total_pss'])}:"
        )
        if pool.get("address"):
            lines.append(f"  Ray cluster {pool['address']}, nodes: {', '.join(pool['nodes'])}")
        for w in pool["workers"]:
            m = w["memory"]
            where = f" on node {w['node']}" if w.get("node") else ""
            grown = f", grown {_mb(w['growth'])} since its model loaded" if w.get("growth") else ""
            lines.append(
                f"  {w['role']} pid {w['pid']}{where}: RSS {_mb(m['rss'])}, PSS {_mb(m['pss'])}, "
                f"shared {_mb(m['shared'])}{grown}; served {w['served']}, "
                f"{'busy' if w['busy'] else 'idle'}, models {', '.join(w['models']) or 'none'}"
            )
        for model_id, how in sorted(pool.get("sharing", {}).items()):
            lines.append(f"  {model_id}: {how}")
    if report.get("check"):
        lines.append(report["check"])
    return "\n".join(lines)


def _mb(value) -> str:
    return "?" if value is None else f"{value / 2**20:.0f} MB"


def _seconds(value) -> str:
    return "none" if value is None else f"{value:g}s"
