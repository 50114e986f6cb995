"""A real Datasette, in-process and offline, running datasette-enrichments-llm
against sync-only models through the process pool."""

import asyncio
import sqlite3
import statistics
import time
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from datasette.app import Datasette
from datasette_enrichments.utils import wait_for_job
from packaging.version import Version

ROWS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "birds fly over the sea",
    "the sun rose over the hill",
]


@pytest.fixture(autouse=True)
def process_pool(monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL", "process")


def make_datasette(tmp_path, model_ref=None, rows=ROWS):
    """Datasette with the README's configuration, or that with another model."""
    path = tmp_path / "data.db"
    with sqlite3.connect(path) as conn:
        conn.execute("create table docs (id integer primary key, body text)")
        conn.executemany("insert into docs (body) values (?)", [(r,) for r in rows])
    config = readme_config()
    if model_ref is not None:
        config["plugins"]["datasette-llm"]["purposes"]["enrichments"]["model"] = model_ref
    return Datasette([str(path)], config=config)


def readme_config():
    """The datasette.yaml the README tells a user to write."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("cat > datasette.yaml <<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
    return yaml.safe_load(block)


async def enrich(ds, model_id, prompt="{{ body }}"):
    """Submit the llm enrichment as the form would, and return the job id."""
    await ds.invoke_startup()
    form = await ds.client.get("/-/enrich/data/docs/llm", actor={"id": "root"})
    assert form.status_code == 200
    assert f'value="{model_id}"' in form.text  # offered: its async twin is listed
    response = await ds.client.post(
        "/-/enrich/data/docs/llm",
        data={
            "model": model_id,
            "prompt": prompt,
            "system_prompt": "",
            "output_column": "out",
        },
        actor={"id": "root"},
    )
    assert response.status_code == 302, response.text
    return int(response.headers["location"].split("_enrichment_job=")[1])


async def results(ds):
    db = ds.get_database("data")
    rows = [dict(r) for r in (await db.execute("select * from docs order by id")).rows]
    errors = [dict(r) for r in (await db.execute("select * from _enrichment_errors")).rows]
    return rows, errors


@pytest.mark.skipif(
    Version(metadata.version("datasette-llm")) < Version("0.1a7"),
    reason="datasette-llm reads per-model options from 0.1a7, which needs llm 0.32",
)
async def test_markov_enrichment_with_the_readmes_configuration(tmp_path):
    ds = make_datasette(tmp_path)  # markov, with options length 20 and delay 0
    job = await enrich(ds, "markov")
    await asyncio.wait_for(wait_for_job(ds, job, "data", timeout=60), 90)
    rows, errors = await results(ds)
    assert errors == []
    for row in rows:
        words = row["out"].split()
        assert len(words) == 20  # the configured option reached the model
        assert set(words) <= set(row["body"].split())


async def test_enrichment_with_a_model_without_options(tmp_path):
    ds = make_datasette(tmp_path, {"model": "probe-plain"})
    job = await enrich(ds, "probe-plain")
    await asyncio.wait_for(wait_for_job(ds, job, "data", timeout=60), 90)
    rows, errors = await results(ds)
    assert errors == []
    assert [r["out"] for r in rows] == [r.upper() for r in ROWS]


async def test_datasette_stays_responsive_during_a_cpu_bound_enrichment(tmp_path):
    """The model spins the CPU holding the GIL, in a worker: page requests on
    Datasette's event loop are still answered quickly."""
    ds = make_datasette(
        tmp_path,
        {"model": "probe", "options": {"chunks": 20, "spin": 300_000}},
        rows=[f"row {i}" for i in range(8)],
    )
    job = await enrich(ds, "probe", prompt="{{ body }}")
    db = ds.get_database("data")
    latencies = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = (
            await db.execute("select status from _enrichment_jobs where id = ?", [job])
        ).first()["status"]
        if status == "finished":
            break
        started = time.perf_counter()
        page = await ds.client.get("/data/docs.json")
        latencies.append(time.perf_counter() - started)
        assert page.status_code == 200
        await asyncio.sleep(0.01)
    rows, errors = await results(ds)
    assert errors == [] and all(r["out"] for r in rows)
    assert len(latencies) >= 5, "the enrichment finished before it could be measured"
    median, worst = statistics.median(latencies), max(latencies)
    print(
        f"page latency during enrichment: median {median * 1000:.1f} ms, "
        f"max {worst * 1000:.1f} ms over {len(latencies)} requests"
    )
    assert median < 0.25 and worst < 2.0
