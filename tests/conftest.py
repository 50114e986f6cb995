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


@pytest.fixture(params=["process", "thread", "ray"])
def pool_kind(request, monkeypatch):
    """Every backend, for the contract every backend keeps (Ray on the
    two-node loopback cluster, when Ray is installed)."""
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    monkeypatch.setenv("LLM_ASYNC_POOL", request.param)
    return request.param


def pytest_sessionfinish(session):
    shutdown_pools()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A two-node Ray cluster on this machine (1 CPU each), started once.

    Loopback only: these settings keep every Ray process on 127.0.0.1 and off
    cloud metadata services (see the README's Ray section)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")
    home = tmp_path_factory.mktemp("ray-home")
    (home / "ray_bootstrap_config.yaml").write_text("{}")
    os.environ.update(
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        # a cluster not started by ray.init() reports "disabled" to ray.io: not here
        RAY_USAGE_STATS_REPORT_URL="http://127.0.0.1:9/",
        HOME=str(home),  # holds ray_bootstrap_config.yaml: no cloud metadata probe
        # Ray workers import the test models pickled by reference
        PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
    )
    import ray  # only now: Ray reads these settings when it is imported
    from ray.cluster_utils import Cluster

    node_args = {
        "num_cpus": 1,
        "object_store_memory": 100 * 2**20,
        "node_ip_address": "127.0.0.1",
    }
    cluster = Cluster(
        initialize_head=True, head_node_args={**node_args, "include_dashboard": False}
    )
    worker_node = cluster.add_node(**node_args)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, worker_node
    finally:
        shutdown_pools()
        ray.shutdown()
        cluster.shutdown()


#: Event loops every async test runs under (PROCPOOL_TEST_LOOPS=asyncio,uvloop by default).
LOOPS = os.environ.get("PROCPOOL_TEST_LOOPS", "asyncio,uvloop").split(",")


def pytest_asyncio_loop_factories(config, item):
    import asyncio

    factories = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop

        factories["uvloop"] = uvloop.new_event_loop
    except ImportError:
        pass
    return {name: factories[name] for name in LOOPS if name in factories}


def pytest_collection_modifyitems(config, items):
    """uvloop matters for the process pool, whose events the consumer's own
    loop reads: thread and Ray variants run under asyncio only (CI time)."""
    keep, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        uvloop = "uvloop" in item.name.split("[", 1)[-1].split("-")
        kind = params.get("pool_kind") or params.get("kind")
        other = kind in ("thread", "ray") or item.module.__name__ == "test_ray"
        (dropped if uvloop and other else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
