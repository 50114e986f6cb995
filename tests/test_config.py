"""Bad LLM_ASYNC_POOL* values fail prompts clearly and never break `llm models`."""

import llm
import pytest

from llm_async_procpool import PoolConfigError, config


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("LLM_ASYNC_POOL", "procesz", "use one of auto, process, thread, ray"),
        ("LLM_ASYNC_POOL_WORKERS", "0", "an integer > 0"),
        ("LLM_ASYNC_POOL_WORKERS", "two", "an integer > 0"),
        ("LLM_ASYNC_POOL_WORKERS", "99999999999999999999", "and <= 512"),
        ("LLM_ASYNC_POOL_WORKERS", "\u0661", "an integer > 0"),  # an Arabic-Indic one
        ("LLM_ASYNC_POOL_WORKERS", "1e3", "an integer > 0"),
        ("LLM_ASYNC_POOL_TIMEOUT", "-1", "a number of seconds > 0"),
        ("LLM_ASYNC_POOL_TIMEOUT", "nan", "a number of seconds > 0"),
        ("LLM_ASYNC_POOL_TIMEOUT", "1e400", "and <= 1e+06"),
        ("LLM_ASYNC_POOL_GRACE", "soon", "a number of seconds >= 0"),
        ("LLM_ASYNC_POOL_GRACE", "inf", "a number of seconds >= 0"),
        ("LLM_ASYNC_POOL_IDLE_TIMEOUT", "0", "a number of seconds > 0"),
        ("LLM_ASYNC_POOL_IDLE_TIMEOUT", "inf", "and <= 1e+06"),
        ("LLM_ASYNC_POOL_IDLE_TIMEOUT", "1e10", "and <= 1e+06"),
        ("LLM_ASYNC_POOL_MAX_TASKS", "1.5", "an integer > 0"),
        ("LLM_ASYNC_POOL_NICE", "20", "an integer >= 0 and <= 19"),
        ("LLM_ASYNC_POOL_NICE", "-1", "an integer >= 0 and <= 19"),
        ("LLM_ASYNC_POOL_THREADS", "many", "an integer > 0"),
        ("LLM_ASYNC_POOL_LOAD_TIMEOUT", "0", "a number of seconds > 0"),
        ("LLM_ASYNC_POOL_SHARE", "maybe", "use on or off"),
        ("LLM_ASYNC_POOL_MODELS", "probe=thread", "a JSON object"),
        ("LLM_ASYNC_POOL_MODELS", '{"probe": "gpu"}', "a JSON object"),
        ("LLM_ASYNC_POOL_MODELS", '{"nope": "thread"}', "names 'nope', which is not an installed"),
        ("LLM_ASYNC_POOL_PRELOAD", "numpy,no_such_module", "names 'no_such_module', which is not"),
        ("LLM_ASYNC_POOL_RAY_GPUS", "lots", "'lots' is not valid: use a number >= 0 and"),
    ],
)
async def test_bad_value_fails_the_prompt_with_a_clear_error(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    assert isinstance(llm.get_async_model("probe"), llm.AsyncModel)  # registry fine
    with pytest.raises(PoolConfigError) as info:
        await llm.get_async_model("probe").prompt("x").text()
    message = str(info.value)
    assert name in message and expected in message
    assert repr(value) in message or "names '" in expected  # those name the culprit


async def test_models_may_be_named_by_alias(monkeypatch):
    import os

    monkeypatch.setenv("LLM_ASYNC_POOL_MODELS", '{"probe-alias": "thread"}')
    response = llm.get_async_model("probe").prompt("x", chunks=1)
    await response.text()
    assert (await response.json())["pid"] == os.getpid()  # it ran in a thread of ours


def test_defaults_and_valid_values():
    assert config.load({}) == config.Settings()
    assert config.load({}).pool == config.PoolSettings(workers=None, threads=None, share=True)
    settings = config.load(
        {
            "LLM_ASYNC_POOL": " Thread ",
            "LLM_ASYNC_POOL_WORKERS": "3",
            "LLM_ASYNC_POOL_TIMEOUT": "2.5",
            "LLM_ASYNC_POOL_GRACE": "0",
            "LLM_ASYNC_POOL_IDLE_TIMEOUT": "60",
            "LLM_ASYNC_POOL_MAX_TASKS": "100",
            "LLM_ASYNC_POOL_NICE": "0",
            "LLM_ASYNC_POOL_THREADS": "2",
            "LLM_ASYNC_POOL_LOAD_TIMEOUT": "1e3",
            "LLM_ASYNC_POOL_SHARE": "off",
            "LLM_ASYNC_POOL_MODELS": '{"markov": "process"}',
        }
    )
    assert settings.pool == config.PoolSettings("thread", 3, 60.0, 100, 0, 2, False)
    assert (settings.timeout, settings.grace, settings.load_timeout) == (2.5, 0.0, 1000.0)
    assert settings.models == (("markov", "process"),)


def test_auto_runs_api_backed_models_in_threads_and_the_rest_in_processes():
    settings = config.load({})
    assert settings.pool_for(llm.get_model("markov")).kind == "process"
    api = settings.pool_for(llm.get_model("probe-key"))  # a key model: an API, as a rule
    assert (api.kind, api.workers) == ("thread", config.DEFAULT_API_WORKERS)
    chosen = config.load({"LLM_ASYNC_POOL_MODELS": '{"probe-key": "process"}'})
    assert chosen.pool_for(llm.get_model("probe-key")).kind == "process"
    forced = config.load({"LLM_ASYNC_POOL": "process"})
    assert forced.pool_for(llm.get_model("probe-key")).kind == "process"


def test_pool_config_error_is_a_value_error():
    """So the llm CLI prints it as a plain 'Error: ...' line."""
    assert issubclass(PoolConfigError, ValueError)
