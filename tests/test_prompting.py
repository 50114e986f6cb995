"""Everything a sync model reads and sets crosses the pool faithfully, in both modes."""

import json
import os

import llm
import pytest
from helpers import MODERN_LLM, log_table, needs_modern_llm

from llm_async_procpool import RemoteError


def probe():
    return llm.get_async_model("probe")


async def test_runs_in_a_worker_process_or_thread(pool_kind):
    response = probe().prompt("hello")
    assert await response.text() == "0 1 2 "
    pid = (await response.json())["pid"]
    if pool_kind == "thread":
        assert pid == os.getpid()
    else:
        assert pid != os.getpid()


async def test_markov_with_options(pool_kind):
    model = llm.get_async_model("markov")
    text = await model.prompt("the cat sat on the mat", length=5, delay=0).text()
    words = text.split()
    assert len(words) == 5
    assert set(words) <= {"the", "cat", "sat", "on", "mat"}


@needs_modern_llm
async def test_options_reach_the_sync_model(pool_kind):
    response = probe().prompt("x", chunks=5, options={"delay": 0.001})
    assert await response.text() == "0 1 2 3 4 "
    seen = (await response.json())["options"]
    assert seen == {"chunks": 5, "delay": 0.001}


async def test_usage_json_and_resolved_model(pool_kind):
    response = probe().prompt("one two three", chunks=2)
    usage = await response.usage()
    assert (usage.input, usage.output) == (3, 2)
    assert usage.details["pid"] == (await response.json())["pid"]
    assert response.resolved_model == "probe-resolved-1"


async def test_streaming_in_order(pool_kind):
    response = probe().prompt("x", chunks=200)
    chunks = [chunk async for chunk in response]
    assert chunks == [f"{i} " for i in range(200)]


@needs_modern_llm
async def test_stream_events_pass_through(pool_kind):
    response = probe().prompt("x", chunks=2, reasoning=True)
    events = [(e.type, e.chunk) async for e in response.astream_events()]
    assert events[0] == ("reasoning", "thinking hard")
    assert [c for t, c in events if t == "text"] == ["0 ", "1 "]
    parts = [type(p).__name__ for m in await response.messages() for p in m.parts]
    assert parts == ["ReasoningPart", "TextPart"]


@needs_modern_llm
async def test_system_fragments_schema_and_flags(pool_kind):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    response = probe().prompt(
        "main",
        system="be brief",
        fragments=["frag one"],
        system_fragments=["sys frag"],
        schema=schema,
        hide_reasoning=True,
    )
    seen = await response.json()
    assert seen["prompt"] == "frag one\nmain"
    assert seen["system"] == "be brief\n\nsys frag" or "sys frag" in seen["system"]
    assert seen["fragments"] == ["frag one"]
    assert seen["schema"] == schema
    assert seen["hide_reasoning"] is True


async def test_attachments_content_and_path(pool_kind, tmp_path):
    path = tmp_path / "note.txt"
    path.write_text("hello from a file")
    response = probe().prompt(
        "look",
        attachments=[
            llm.Attachment(type="text/plain", content=b"inline bytes"),
            llm.Attachment(type="text/plain", path=str(path)),
        ],
    )
    seen = (await response.json())["attachments"]
    assert seen == [
        {"type": "text/plain", "path": None, "url": None, "size": 12},
        {"type": "text/plain", "path": str(path), "url": None, "size": 17},
    ]


async def test_conversation_history_is_readable(pool_kind):
    conversation = probe().conversation()
    first = conversation.prompt("first question", chunks=1)
    assert await first.text() == "0 "
    second = conversation.prompt("second question", chunks=2)
    await second.text()
    third = conversation.prompt("third question", chunks=1)
    seen = await third.json()
    assert [h["prompt"] for h in seen["history"]] == [
        "first question",
        "second question",
    ]
    assert [h["text"] for h in seen["history"]] == ["0 ", "0 1 "]
    assert seen["history"][0]["json"]["prompt"] == "first question"
    if not MODERN_LLM:  # no prompt.messages before llm 0.32
        return
    # the full chain reaches the worker
    assert [m for m in seen["messages"] if m[0] == "user"] == [
        ["user", "first question"],
        ["user", "second question"],
        ["user", "third question"],
    ]


async def test_key_model_gets_the_resolved_key(pool_kind, monkeypatch):
    monkeypatch.setenv("PROBE_KEY_SECRET", "sk-probe-123456")
    model = llm.get_async_model("probe-key")
    assert await model.prompt("hi").text() == "got a key of length 15"
    assert await model.prompt("hi", key="explicit").text() == "got a key of length 8"


async def test_an_explicit_key_reaches_a_plain_model_response(pool_kind):
    response = probe().prompt("x", key="plain-model-key")
    assert (await response.json())["explicit_key"] == "plain-model-key"
    assert (await probe().prompt("y").json())["explicit_key"] is None


async def test_missing_key_is_reported_before_any_worker(pool_kind, monkeypatch):
    monkeypatch.delenv("PROBE_KEY_SECRET", raising=False)
    with pytest.raises(llm.NeedsKeyException, match="PROBE_KEY_SECRET"):
        await llm.get_async_model("probe-key").prompt("hi").text()


async def test_tool_definitions_reach_the_model(pool_kind):
    def multiply(x: int, y: int) -> int:
        "Multiply two numbers."
        return x * y

    response = probe().prompt("use tools", tools=[multiply], call_tool="multiply")
    await response.text()
    seen = await response.json()
    assert seen["tools"][0]["name"] == "multiply"
    assert seen["tools"][0]["description"] == "Multiply two numbers."
    assert seen["tools"][0]["schema"]["properties"]["x"]["type"] == "integer"
    calls = await response.tool_calls()
    assert [(c.name, c.arguments) for c in calls] == [("multiply", {"x": 2})]
    assert calls[0].tool_call_id


async def test_chain_runs_tools_in_the_parent(pool_kind):
    parent_pid = os.getpid()
    ran_in = []

    def double(x: int) -> str:
        "Double a number."
        ran_in.append(os.getpid())
        return str(x * 2)

    chain = probe().chain("use tools", tools=[double], options={"call_tool": "double"})
    text = await chain.text()
    assert text == "tool said: 4"
    assert ran_in == [parent_pid]


async def test_model_error_keeps_type_and_follows_earlier_chunks(pool_kind):
    response = probe().prompt("x", chunks=5, fail="value", fail_after=2)
    seen = []
    with pytest.raises(ValueError, match="probe failed on purpose"):
        async for chunk in response:
            seen.append(chunk)
    assert seen == ["0 ", "1 "]


async def test_an_error_that_cannot_be_pickled_keeps_its_class(pool_kind):
    from plugin_models import Unpicklable

    response = probe().prompt("x", chunks=3, fail="unpicklable", fail_after=1)
    with pytest.raises(Unpicklable) as info:
        await response.text()
    error = info.value
    assert str(error) == "probe failed with an unpicklable error"
    if pool_kind == "thread":  # the very object the model raised
        assert hasattr(error, "lock")
    else:  # rebuilt as its own class, with the worker's traceback attached
        assert "misbehave" in str(error.__cause__)
        assert "plugin_models.py" in str(error.__cause__)


async def test_openai_errors_keep_their_class_and_status(pool_kind):
    import openai

    response = probe().prompt("x", chunks=3, fail="openai", fail_after=0)
    with pytest.raises(openai.AuthenticationError) as info:
        await response.text()
    error = info.value
    assert error.status_code == 401
    assert error.request_id == "req-42"
    assert error.body == {"error": "invalid key"}
    assert str(error) == "Error code: 401 - invalid key"


async def test_an_error_class_only_the_worker_has_becomes_remote_error():
    response = probe().prompt("x", chunks=3, fail="local", fail_after=0)
    with pytest.raises(RemoteError) as info:
        await response.text()
    error = info.value
    assert error.type_name.endswith("LocalError")
    assert "probe failed with a class only the worker has" in str(error)
    assert "could not be rebuilt in this process" in str(error)
    assert "misbehave" in error.traceback_text


async def test_pool_still_works_after_errors(pool_kind):
    for _ in range(3):
        with pytest.raises(ValueError):
            await probe().prompt("x", fail="value").text()
    assert await probe().prompt("x", chunks=1).text() == "0 "


async def test_logging_an_async_response(pool_kind, tmp_path):
    import sqlite_utils
    from llm.migrations import migrate

    db = sqlite_utils.Database(tmp_path / "logs.db")
    migrate(db)
    response = probe().prompt("log me", chunks=2)
    await response.text()
    (await response.to_sync_response()).log_to_db(db)
    row = next(db.query(f"select * from {log_table(db.conn)}"))
    assert row["model"] == "probe"
    assert row["resolved_model"] == "probe-resolved-1"
    assert (row["input_tokens"], row["output_tokens"]) == (2, 2)
    assert json.loads(row["options_json"])["chunks"] == 2
