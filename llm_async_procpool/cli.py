"""``llm async-pool``: inspect the pool and compare pools."""

from __future__ import annotations

import asyncio
import json

import click


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
                    f"Model {model_id!r} failed in the pool: "
                    f"{type(error).__name__}: {error}"
                ) from None
        report = status()
        if as_json:
            click.echo(json.dumps(report, indent=2))
            return
        click.echo(render(report))


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
            f"max tasks per worker {s['max_tasks'] or 'none'}"
        )
    lines.append(
        f"Async twins (run in the pool): {', '.join(report['twins']) or 'none'}"
    )
    lines.append(
        "Native async models (left alone): "
        + (", ".join(report["native_async"]) or "none")
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
