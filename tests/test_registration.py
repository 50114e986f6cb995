"""Which models get a twin, and what the twin shows of its sync model."""

import llm
import llm_all_models_async
import pytest

from llm_async_procpool import AsyncKeyTwin, AsyncTwin


def test_sync_only_models_get_a_twin():
    twin = llm.get_async_model("markov")
    assert isinstance(twin, AsyncTwin)
    assert isinstance(twin, llm.AsyncModel)
    key_twin = llm.get_async_model("probe-key")
    assert isinstance(key_twin, AsyncKeyTwin)
    assert isinstance(key_twin, llm.AsyncKeyModel)


def test_native_async_model_is_left_alone():
    native = llm.get_async_model("probe-native")
    assert not isinstance(native, (AsyncTwin, AsyncKeyTwin))
    assert type(native).__name__ == "NativeAsync"
    # llm-echo ships its own async model too
    assert type(llm.get_async_model("echo")).__name__ == "EchoAsync"


def test_thread_twin_of_llm_all_models_async_is_replaced():
    """Whatever the load order: run its hook last, after ours, and again first."""
    entries = [
        llm.ModelWithAliases(model, None, [])
        for model in (llm.get_model("markov"), llm.get_model("probe-key"))
    ]
    from llm_async_procpool import register_models

    llm_all_models_async.register_models(register=None, model_aliases=entries)
    assert type(entries[0].async_model).__module__ == "llm_all_models_async"
    register_models(register=None, model_aliases=entries)
    assert isinstance(entries[0].async_model, AsyncTwin)
    assert isinstance(entries[1].async_model, AsyncKeyTwin)
    llm_all_models_async.register_models(register=None, model_aliases=entries)
    assert isinstance(entries[0].async_model, AsyncTwin)
    # and through the real plugin manager, with both plugins installed
    assert isinstance(llm.get_async_model("markov"), AsyncTwin)


def test_aliases_resolve_to_the_twin():
    assert llm.get_async_model("probe-alias").model_id == "probe"
    assert llm.get_async_model("probe-alias").sync_model.model_id == "probe"


@pytest.mark.parametrize("model_id", ["markov", "probe", "probe-key", "echo-needs-key"])
def test_twin_mirrors_the_sync_model(model_id):
    sync = llm.get_model(model_id)
    twin = llm.get_async_model(model_id)
    if model_id == "echo-needs-key":  # llm-echo has a native async twin
        assert not isinstance(twin, AsyncTwin)
        return
    assert twin.model_id == sync.model_id
    assert str(twin) == str(sync)
    assert twin.Options is sync.Options
    for name in (
        "can_stream",
        "attachment_types",
        "supports_schema",
        "supports_tools",
        "supports_conversation",
        "needs_key",
        "key_env_var",
    ):
        assert getattr(twin, name, None) == getattr(sync, name, None), name


def test_options_are_validated_in_the_parent():
    twin = llm.get_async_model("markov")
    with pytest.raises(Exception, match="Extra inputs are not permitted"):
        twin.prompt("the cat", no_such_option=1)
    with pytest.raises(Exception, match="length"):
        twin.prompt("the cat", length="many")
    response = twin.prompt("the cat", length=3)
    assert response.prompt.options.length == 3


def test_plugin_specific_attributes_are_visible():
    sync = llm.get_model("probe")
    twin = llm.get_async_model("probe")
    assert twin.loads == sync.loads  # an attribute llm knows nothing about
