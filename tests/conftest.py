import os
import tempfile

import llm
import plugin_models
import pytest

from llm_async_procpool import config, shutdown_pools

# Before any pool starts: workers copy the environment at spawn.
os.environ["LLM_USER_PATH"] = tempfile.mkdtemp(prefix="procpool-llm-user-")
os.environ["LLM_ASYNC_POOL_WORKERS"] = "2"
for name in list(os.environ):
    if name.startswith("LLM_ASYNC_POOL") and name != "LLM_ASYNC_POOL_WORKERS":
        del os.environ[name]

if not llm.pm.has_plugin("procpool-test-models"):
    llm.pm.register(plugin_models, name="procpool-test-models")

DEFAULT = config.load().pool


@pytest.fixture(autouse=True)
def _stop_extra_pools():
    """Keep the default pool warm across tests; stop pools a test configured."""
    yield
    shutdown_pools(keep=DEFAULT)


@pytest.fixture(params=["process", "thread"])
def pool_kind(request, monkeypatch):
    monkeypatch.setenv("LLM_ASYNC_POOL", request.param)
    return request.param


def pytest_sessionfinish(session):
    shutdown_pools()
