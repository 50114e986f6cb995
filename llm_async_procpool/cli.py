"""``llm async-pool``: inspect the pool and compare pools."""

from __future__ import annotations

import asyncio
import json

import click

from .bench import CONTENDERS


def register(cli: click.Group) -> None:
    @cli.group(name="async-pool")
    def async_pool():
        "Inspect and benchmark the async pool for sync-only models"

    @async_pool.command(name="status")
    @click.option(
        "-m",
        "--model",
        "model_id",
        help="First run one short prompt with this model through the pool, "
        "to check that a worker can load it",
    )
    @click.option("--json", "as_json", is_flag=True, help="Output JSON")
    def status_command(model_id, as_json):
        "Show pool settings, which models get an async twin, and live workers"
        import llm

        from .status import status

        if model_id:
            model = llm.get_async_model(model_id)

            async def check():
                return await model.prompt("status check").text()

            try:
                asyncio.run(check())
            except Exception as error:
                raise click.ClickException(
                    f"Model {model_id!r} failed in the pool: {type(error).__name__}: {error}"
                ) from None
        report = status()
        if as_json:
            click.echo(json.dumps(report, indent=2))
            return
        click.echo(render(report))

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
    @click.option("--contenders", default=",".join(CONTENDERS), show_default=True)
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
        type=click.Path(dir_okay=False),
        help="Write a PNG plot (needs matplotlib)",
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

        from . import bench

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
            report = bench.run(workload, counts, rounds, workers, chosen, bench.progress_bar())
            reports.append(report)
            click.echo(
                f"\n{model.model_id} {validated}, {report['workers']} workers, "
                f"{rounds} rounds (median, min-max):"
            )
            click.echo(bench.table(report))
        bench.save(reports, json_path, markdown_path)
        if plot_path and not bench.plot(reports, plot_path):
            click.echo(
                "No plot: install matplotlib (pip install 'llm-async-procpool[plot]')",
                err=True,
            )


def render(report: dict) -> str:
    lines = []
    if "error" in report:
        lines.append(f"Configuration error: {report['error']}")
    else:
        s = report["settings"]
        pool = f"Pool: {s['pool']}, {s['workers']} workers"
        if s["start_method"]:
            pool += f", start method {s['start_method']}"
        lines.append(pool)
        lines.append(
            f"Limits: timeout {_seconds(s['timeout'])}, grace {_seconds(s['grace'])}, "
            f"idle timeout {_seconds(s['idle_timeout'])}, "
            f"max tasks per worker {s['max_tasks'] or 'none'}, worker nice +{s['nice']}"
        )
    lines.append(f"Async twins (run in the pool): {', '.join(report['twins']) or 'none'}")
    lines.append(
        "Native async models (left alone): " + (", ".join(report["native_async"]) or "none")
    )
    if not report["live_pools"]:
        lines.append("Live pool in this process: none")
    for pool in report["live_pools"]:
        lines.append(f"Live {pool['pool']} pool, size {pool['size']}:")
        for w in pool["workers"]:
            rss = f"{w['rss_bytes'] / 2**20:.0f} MB" if w["rss_bytes"] else "?"
            lines.append(
                f"  pid {w['pid']}: RSS {rss}, served {w['served']}, "
                f"{'busy' if w['busy'] else 'idle'}, "
                f"models {', '.join(w['models']) or 'none'}"
            )
    return "\n".join(lines)


def _seconds(value) -> str:
    return "none" if value is None else f"{value:g}s"
