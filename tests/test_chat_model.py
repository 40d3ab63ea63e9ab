"""AggregatingChatModel and strategy names, on the ScriptedBackend."""

from __future__ import annotations

import pytest
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.tools import tool

from aft_graph.backends import ScriptedBackend
from aft_graph.chat_model import AggregatingChatModel, conversation_question
from aft_graph.names import parse_model_name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("aft", dict(strategy="propose_aggregate", proposals=4, layers=1)),
        ("aft-k4-l2", dict(strategy="propose_aggregate", proposals=4, layers=2)),
        ("AFT-L3-K2", dict(strategy="propose_aggregate", proposals=2, layers=3)),
        ("rsa", dict(strategy="rsa", population=8, subset_size=4, steps=2)),
        ("rsa-n8-k4-t3", dict(strategy="rsa", population=8, subset_size=4, steps=3)),
        ("sc-k8", dict(strategy="self_consistency", proposals=8)),
        ("refine-l2", dict(strategy="self_refine", layers=2)),
        ("single", dict(strategy="propose_aggregate", proposals=1, layers=0)),
    ],
)
def test_strategy_names(name, expected):
    config = parse_model_name(name)
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpt-4", "unknown strategy 'gpt'"),
        ("aft-x3", "cannot read 'x3'"),
        ("sc-l2", "'sc' takes the sizes k<proposals>"),
        ("aft-k2-k3", "gives proposals twice"),
        ("single-k2", "takes the sizes none"),
        ("rsa-n2-k4", "subset_size <= population"),
        ("aft-k0", "greater than or equal to 1"),
    ],
)
def test_bad_strategy_names_say_what_to_write(name, message):
    with pytest.raises(ValueError, match=message):
        parse_model_name(name)


def test_overrides_win_over_the_name():
    assert parse_model_name("aft-k4", proposals=2, seed=None).proposals == 2


def test_conversation_question():
    question, system = conversation_question([SystemMessage("Be brief."), HumanMessage("2+2?")])
    assert (question, system) == ("2+2?", "Be brief.")
    question, _ = conversation_question(
        [HumanMessage("x = 5"), AIMessage("ok"), HumanMessage("x * 2?")]
    )
    assert "User: x = 5" in question and "Assistant: ok" in question and question.endswith("x * 2?")
    with pytest.raises(ValueError, match="last message must be the user's question"):
        conversation_question([HumanMessage("hi"), AIMessage("hello")])
    with pytest.raises(ValueError, match="no text"):
        conversation_question([HumanMessage("  ")])


class Layers(AsyncCallbackHandler):
    def __init__(self):
        self.events = []

    async def on_custom_event(self, name, data, **kwargs):
        if name == "aft_layer":
            self.events.append(data)


async def test_ainvoke_runs_the_graph_and_reports_layers_to_callbacks():
    backend = ScriptedBackend()
    model = AggregatingChatModel.from_strategy("aft-k3-l2", backend)
    handler = Layers()
    reply = await model.ainvoke("What is 2+3? Put it in \\boxed{}.", config={"callbacks": [handler]})
    assert isinstance(reply, AIMessage) and "boxed" in reply.content
    assert len(backend.calls) == 3 + 3 * 2
    assert [ev.layer for ev in handler.events] == [0, 1, 2]
    tokens = sum(sum(ev.completion_tokens) for ev in handler.events)
    assert reply.usage_metadata["output_tokens"] == tokens
    assert reply.usage_metadata["input_tokens"] == sum(backend.count_prompt_tokens(c) for c in backend.calls)
    assert reply.response_metadata["aft"]["usage"]["calls"] == 9
    assert len(reply.response_metadata["aft"]["layers"]) == 3


async def test_astream_yields_the_answer_and_astream_events_carries_layers():
    model = AggregatingChatModel.from_strategy("aft-k2-l1", ScriptedBackend())
    chunks = [c async for c in model.astream("What is 1+1?")]
    assert len(chunks) == 1 and "boxed" in chunks[0].content
    events = [e async for e in model.astream_events("What is 1+1?", version="v2")]
    layers = [e["data"].layer for e in events if e["event"] == "on_custom_event" and e["name"] == "aft_layer"]
    assert layers == [0, 1]
    assert any(e["event"] == "on_chat_model_end" for e in events)


async def test_system_prompt_and_stop_apply_to_the_run():
    backend = ScriptedBackend()
    model = AggregatingChatModel.from_strategy("single", backend)
    await model.ainvoke([SystemMessage("Be brief."), HumanMessage("2+2?")], stop=["STOP"])
    (call,) = backend.calls
    assert call.messages[0] == {"role": "system", "content": "Be brief."}
    assert "STOP" in call.sampling.stop


def test_sync_invoke_works_with_a_loop_free_backend():
    reply = AggregatingChatModel.from_strategy("sc-k3", ScriptedBackend()).invoke("What is 1+1?")
    assert "boxed" in reply.content


def test_tool_binding_is_refused_with_the_alternative():
    @tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    model = AggregatingChatModel.from_strategy("aft", ScriptedBackend())
    with pytest.raises(NotImplementedError, match="as_tool"):
        model.bind_tools([add])
    with pytest.raises(NotImplementedError, match="does not call tools"):
        model.with_structured_output({"title": "x", "type": "object", "properties": {}})
