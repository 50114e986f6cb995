"""What real third-party plugins need: a thread mode that never runs two
prompts on one model instance, API-backed models that run as many prompts at
once as the app asks for, and memory figures that count shared pages once."""

import asyncio
import http.server
import json
import threading
import time

import llm
import pytest
from helpers import process_pool

from llm_async_procpool.status import status


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_no_two_prompts_ever_share_a_model_instance(monkeypatch, kind):
    monkeypatch.setenv("LLM_ASYNC_POOL", kind)
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "4")
    model = llm.get_async_model("probe-not-reentrant")  # one twin, so one sync instance
    for _ in range(3):
        texts = await asyncio.wait_for(
            asyncio.gather(*(model.prompt(str(i)).text() for i in range(4))), 30
        )
        assert all(text.isdigit() for text in texts)


class SlowApi(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(0.5)
        body = self.headers.get("Authorization", "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_api(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PROBE_HTTP_URL", f"http://127.0.0.1:{server.server_port}/v1")
    yield
    server.shutdown()


@pytest.mark.usefixtures("slow_api")
async def test_api_backed_models_run_as_many_prompts_at_once_as_asked():
    """probe-http needs a key, so auto mode runs it in threads, not one per core."""
    model = llm.get_async_model("probe-http")
    started = time.monotonic()
    assert await model.prompt("one", key="sk-1").text() == "Bearer sk-1"
    single = time.monotonic() - started
    started = time.monotonic()
    texts = await asyncio.gather(*(model.prompt(str(i), key=f"sk-{i}").text() for i in range(8)))
    eight = time.monotonic() - started
    assert texts == [f"Bearer sk-{i}" for i in range(8)]
    assert eight <= 2 * single, f"8 at once took {eight:.2f}s, one took {single:.2f}s"


async def test_status_counts_a_shared_file_mapping_once(monkeypatch, tmp_path):
    mapped = tmp_path / "weights.gguf"
    mapped.write_bytes(b"\1" * (32 * 2**20))
    monkeypatch.setenv("PROBE_MAPPED_FILE", str(mapped))
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "2")
    monkeypatch.setenv("LLM_ASYNC_POOL_SHARE", "off")
    monkeypatch.setenv("LLM_ASYNC_POOL_IDLE_TIMEOUT", "420")
    model = llm.get_async_model("probe-mapped")
    pool = None
    deadline = time.monotonic() + 30
    while pool is None or sum("probe-mapped" in w.models for w in pool.workers()) < 2:
        assert time.monotonic() < deadline, "a second worker never took a prompt"
        await asyncio.gather(*(model.prompt(str(i)).text() for i in range(2)))
        pool = process_pool(idle_timeout=420)
    (report,) = [
        p
        for p in status()["live_pools"]
        if p["size"] == 2
        and p["workers"]
        and p["workers"][0]["pid"] in {w.pid for w in pool.workers()}
    ]
    workers = [w for w in report["workers"] if "probe-mapped" in w["models"]]
    assert len(workers) == 2
    for worker in workers:
        memory = worker["memory"]
        assert memory["shared"] >= 30 * 2**20  # the file's pages, mapped by both
        assert memory["pss"] <= memory["rss"] - 14 * 2**20  # each counts half of them
    assert report["total_pss"] == sum(w["memory"]["pss"] for w in report["workers"])


class FakeCompletions(http.server.BaseHTTPRequestHandler):
    """OpenAI's /v1/completions, streamed, after 0.5 s."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(0.5)
        choice = {"text": "echo " + body["prompt"], "index": 0, "finish_reason": "stop"}
        chunk = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"]}
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        event = json.dumps({**chunk, "choices": [{**choice, "logprobs": None}]})
        self.wfile.write(f"data: {event}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


async def test_an_openai_compatible_completion_model_runs_eight_prompts_at_once(
    monkeypatch, tmp_path
):
    """llm's own Completion class, configured in extra-openai-models.yaml with an
    api_base: it needs no key, yet it waits on the network, so auto mode must not
    cap it at one prompt per core."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "extra-openai-models.yaml").write_text(
        "- model_id: fake-instruct\n  model_name: fake\n  completion: true\n"
        f"  api_base: http://127.0.0.1:{server.server_port}/v1\n"
    )
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    monkeypatch.delenv("LLM_ASYNC_POOL", raising=False)
    monkeypatch.setenv("LLM_ASYNC_POOL_WORKERS", "1")  # one per core on a 1-core machine
    try:
        model = llm.get_async_model("fake-instruct")
        assert await asyncio.wait_for(model.prompt("warm").text(), 30) == "echo warm"
        started = time.monotonic()
        assert await asyncio.wait_for(model.prompt("one").text(), 30) == "echo one"
        single = time.monotonic() - started
        started = time.monotonic()
        texts = await asyncio.wait_for(
            asyncio.gather(*(model.prompt(str(i)).text() for i in range(8))), 30
        )
        eight = time.monotonic() - started
    finally:
        server.shutdown()
    assert texts == [f"echo {i}" for i in range(8)]
    # One at a time would take 8 x 0.5 s. Each prompt also builds an openai
    # client (old llm: per prompt), which holds the GIL: leave room for that.
    assert eight < 2.5, f"8 at once took {eight:.2f}s, one took {single:.2f}s"
