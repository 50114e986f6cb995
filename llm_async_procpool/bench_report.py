"""What ``llm async-pool bench`` prints and writes: a console table, Markdown,
JSON and a PNG plot of a ``bench.run`` report.

An error a contender hit is never cut short: the table says "fails [n]" and
note n, below it, holds the whole message.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Callable

from .bench import CONTENDERS

COLORS = dict(zip(CONTENDERS, ("C0", "C1", "C2", "C5", "C4", "C3", "C6"), strict=True))


def _rows(report: dict) -> list[dict]:
    return sorted(
        report["results"], key=lambda r: (r["concurrency"], CONTENDERS.index(r["contender"]))
    )


def number(value: float | None) -> str:
    """Three significant digits, whatever the magnitude (0.0213, 4.12, 187)."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def table(report: dict) -> str:
    """A console table: one line per contender and concurrency, then notes."""
    head = (
        f"{'contender':<17}{'conc':>5}{'prompts/s':>11}{'spread':>16}"
        f"{'x serial':>9}{'tokens/s':>10}{'cpu ms/tok':>11}{'ttfc p50/p95 ms':>18}"
        f"{'lag p50/p99/max ms':>22}"
    )
    lines, notes = [head, "-" * len(head)], []
    serial = {
        r["concurrency"]: r.get("prompts_per_s")
        for r in _rows(report)
        if r["contender"] == "serial"
    }
    for r in _rows(report):
        if "error" in r:
            if r["error"] not in notes:
                notes.append(r["error"])
            number_ = notes.index(r["error"]) + 1
            lines.append(f"{r['contender']:<17}{r['concurrency']:>5}  fails [{number_}]")
            continue
        base = serial.get(r["concurrency"])
        ratio = f"{r['prompts_per_s'] / base:.2f}x" if base else "-"
        ttfc, lag = r.get("first_chunk_ms"), r.get("loop_lag_ms")
        spread = f"{number(r['spread'][0])}-{number(r['spread'][1])}"
        lines.append(
            f"{r['contender']:<17}{r['concurrency']:>5}{number(r['prompts_per_s']):>11}"
            f"{spread:>16}{ratio:>9}{number(r['tokens_per_s']):>10}"
            f"{number(r.get('cpu_ms_per_token')):>11}"
            + (f"{number(ttfc['p50']):>9}/{number(ttfc['p95']):<8}" if ttfc else f"{'-':>18}")
            + (
                f"{number(lag['p50']):>10}/{number(lag['p99'])}/{number(lag['max'])}"
                if lag
                else f"{'-':>10}"
            )
        )
    for name, times in (report.get("start") or {}).items():
        cold, warm = times["cold_first_chunk"], times["warm_first_chunk"]
        if cold is not None and warm is not None:
            lines.append(
                f"{name}: cold first chunk {cold * 1000:.0f} ms, warm {warm * 1000:.1f} ms"
            )
    memory = report.get("memory") or {}
    if memory:
        workers = ", ".join(
            f"{w['role']} {w['rss_mb']:.0f}/{w['pss_mb']:.0f}" for w in memory.get("workers", [])
        )
        lines.append(
            f"RSS/PSS MB: parent {memory['parent_rss_mb']:.0f}; pool processes [{workers}]"
        )
    for n, note in enumerate(notes, 1):
        lines += textwrap.wrap(note, 100, initial_indent=f"[{n}] ", subsequent_indent="    ")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    rows = [
        "| contender | concurrency | prompts/s (median) | spread | tokens/s | CPU ms/token "
        "| first chunk p50 / p95 ms | loop lag p50 / p99 / max ms |",
        "|---|---:|---:|---|---:|---:|---|---|",
    ]
    for r in _rows(report):
        if "error" in r:
            error = r["error"].replace("|", "\\|")
            rows.append(f"| {r['contender']} | {r['concurrency']} | fails: {error} | | | | | |")
            continue
        ttfc, lag = r.get("first_chunk_ms"), r.get("loop_lag_ms")
        rows.append(
            f"| {r['contender']} | {r['concurrency']} | {number(r['prompts_per_s'])} | "
            f"{number(r['spread'][0])}-{number(r['spread'][1])} | "
            f"{number(r['tokens_per_s'])} | {number(r.get('cpu_ms_per_token'))} | "
            + (f"{number(ttfc['p50'])} / {number(ttfc['p95'])} | " if ttfc else "- | ")
            + (
                f"{number(lag['p50'])} / {number(lag['p99'])} / {number(lag['max'])} |"
                if lag
                else "- |"
            )
        )
    return "\n".join(rows)


def can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(reports: list[dict], path: str) -> str:
    """Throughput and loop lag against concurrency; returns the file's full path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker

    figure, axes = plt.subplots(len(reports), 2, figsize=(11, 3.4 * len(reports)), squeeze=False)
    for (left, right), report in zip(axes, reports, strict=True):
        name = report["workload"]["model_id"]
        lags: list[float] = []
        for contender in CONTENDERS:
            rows = sorted(
                (r for r in report["results"] if r["contender"] == contender and "error" not in r),
                key=lambda r: r["concurrency"],
            )
            if not rows:
                continue
            style = {"marker": "o", "label": contender, "color": COLORS[contender]}
            left.plot([r["concurrency"] for r in rows], [r["prompts_per_s"] for r in rows], **style)
            lagged = [r for r in rows if "loop_lag_ms" in r]
            if lagged:
                lags += [r["loop_lag_ms"]["p99"] for r in lagged]
                right.plot(
                    [r["concurrency"] for r in lagged],
                    [r["loop_lag_ms"]["p99"] for r in lagged],
                    **style,
                )
        left.set_title(f"{name}: prompts/s (median)")
        right.set_title(f"{name}: event-loop lag p99 (ms)")
        left.set_ylabel("prompts/s")
        right.set_ylabel("ms")
        counts = sorted({r["concurrency"] for r in report["results"]})
        for axis in (left, right):
            axis.set_xlabel("prompts at once")
            axis.set_xscale("log", base=2)
            axis.set_xticks(counts, [str(c) for c in counts])  # 1 2 4 8, not 2^0 2^1
            axis.xaxis.set_minor_locator(ticker.NullLocator())
            axis.grid(True, alpha=0.3)
            axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        if lags and min(lags) > 0 and max(lags) / min(lags) > 20:  # decades apart: log scale
            right.set_yscale("log")
            right.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            right.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            right.yaxis.set_minor_formatter(ticker.NullFormatter())
        else:
            right.set_ylim(bottom=0)
        left.set_ylim(bottom=0)
        left.legend(fontsize=7)
        right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return os.path.abspath(path)


def title(workload: dict) -> str:
    repeat = workload.get("repeat", 1)
    each = f", {repeat} prompts in turn per caller" if repeat > 1 else ""
    return f"{workload['model_id']} {workload['options']}{each}"


def save(reports: list[dict], json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        with open(json_path, "w") as out:
            json.dump(reports, out, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as out:
            for report in reports:
                out.write(f"### {title(report['workload'])}\n\n")
                out.write(markdown(report) + "\n\n")


def progress_bar(stream=sys.stderr) -> Callable[[str], None]:
    """A one-line progress display: 'n/total' messages move the bar."""
    state = {"label": ""}

    def show(message: str) -> None:
        if "/" in message and message.split("/")[0].isdigit():
            done, total = (int(x) for x in message.split("/"))
            filled = int(30 * done / total)
            stream.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {state['label']:<40}"
            )
            if done == total:
                stream.write("\n")
        else:
            state["label"] = message
        stream.flush()

    return show
