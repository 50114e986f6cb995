"""Bad LLM_ASYNC_POOL* values fail prompts clearly and never break `llm models`."""

import llm
import pytest

from llm_async_procpool import PoolConfigError, config


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("LLM_ASYNC_POOL", "procesz", "use one of process, thread"),
        ("LLM_ASYNC_POOL_WORKERS", "0", "an integer > 0"),
        ("LLM_ASYNC_POOL_WORKERS", "two", "an integer > 0"),
        ("LLM_ASYNC_POOL_TIMEOUT", "-1", "a number of seconds > 0"),
        ("LLM_ASYNC_POOL_TIMEOUT", "nan", "a number of seconds > 0"),
        ("LLM_ASYNC_POOL_GRACE", "soon", "a number of seconds >= 0"),
        ("LLM_ASYNC_POOL_IDLE_TIMEOUT", "0", "a number of seconds > 0"),
        ("LLM_ASYNC_POOL_MAX_TASKS", "1.5", "an integer > 0"),
        ("LLM_ASYNC_POOL_NICE", "20", "an integer from 0 to 19"),
        ("LLM_ASYNC_POOL_NICE", "-1", "an integer from 0 to 19"),
    ],
)
async def test_bad_value_fails_the_prompt_with_a_clear_error(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    assert isinstance(llm.get_async_model("probe"), llm.AsyncModel)  # registry fine
    with pytest.raises(PoolConfigError) as info:
        await llm.get_async_model("probe").prompt("x").text()
    message = str(info.value)
    assert name in message and repr(value) in message and expected in message


def test_defaults_and_valid_values():
    assert config.load({}) == config.Settings(config.PoolSettings(workers=config.default_workers()))
    settings = config.load(
        {
            "LLM_ASYNC_POOL": " Thread ",
            "LLM_ASYNC_POOL_WORKERS": "3",
            "LLM_ASYNC_POOL_TIMEOUT": "2.5",
            "LLM_ASYNC_POOL_GRACE": "0",
            "LLM_ASYNC_POOL_IDLE_TIMEOUT": "60",
            "LLM_ASYNC_POOL_MAX_TASKS": "100",
            "LLM_ASYNC_POOL_NICE": "0",
        }
    )
    assert settings == config.Settings(config.PoolSettings("thread", 3, 60.0, 100, 0), 2.5, 0.0)


def test_pool_config_error_is_a_value_error():
    """So the llm CLI prints it as a plain 'Error: ...' line."""
    assert issubclass(PoolConfigError, ValueError)
