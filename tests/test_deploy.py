"""The LangGraph Server graph factory (aft_graph/deploy.py) on the ScriptedBackend."""

from __future__ import annotations

import pytest

from aft_graph import deploy
from aft_graph.backends import ScriptedBackend


@pytest.fixture
def backend(monkeypatch):
    fake = ScriptedBackend()
    monkeypatch.setattr(deploy, "_backend", fake)
    return fake


async def test_factory_reads_strategy_and_sampling_from_the_config(backend):
    graph = await deploy.make_graph({"configurable": {"strategy": "aft-k3-l2", "max_tokens": 8, "temperature": 0.3, "seed": 5}})
    events = [e async for e in graph.astream({"question": "What is 1+1?"}, stream_mode="custom")]
    assert [e.layer for e in events] == [0, 1, 2]
    assert len(backend.calls) == 3 + 3 * 2
    assert {(c.sampling.max_tokens, c.sampling.temperature) for c in backend.calls} == {(8, 0.3)}


async def test_factory_defaults_to_the_environment_strategy(backend, monkeypatch):
    monkeypatch.setenv("AFT_GRAPH_STRATEGY", "sc-k5")
    result = await (await deploy.make_graph({})).ainvoke({"question": "What is 1+1?"})
    assert result["usage"]["calls"] == 5
    with pytest.raises(ValueError, match="unknown strategy 'gpt'"):
        await deploy.make_graph({"configurable": {"strategy": "gpt-4"}})


def test_base_url_builds_an_openai_backend(monkeypatch):
    monkeypatch.setenv("AFT_GRAPH_BASE_URL", "http://a:1/v1, http://b:2/v1")
    from aft_graph.backends import OpenAIBackend

    monkeypatch.setattr(OpenAIBackend, "context_window", 4096)  # no server to connect to here
    backend = deploy._build_backend()
    assert isinstance(backend, OpenAIBackend) and backend.base_urls == ["http://a:1/v1", "http://b:2/v1"]
