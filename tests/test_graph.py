"""Topology, streaming, drop-in use and resume of the graph, pinned on ScriptedBackend."""

from __future__ import annotations

import re
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from pydantic import ValidationError

from aft_graph import AggregateConfig, LayerEvent, SamplingConfig, as_tool, build_graph
from aft_graph.backends import BackendError, ScriptedBackend
from aft_graph.backends.base import GenerationRequest, PromptTooLongError

_RESPONSE = re.compile(r'<response id="\d+">\n(.*?)\n</response>', re.DOTALL)


def _is_aggregation(req: GenerationRequest) -> bool:
    return "<response id=" in req.messages[-1]["content"]


def _unique(req: GenerationRequest, i: int) -> str:
    """A distinct text per call: its seed names it, so prompts can be traced back to calls."""
    return f"text-{req.sampling.seed}-{i} \\boxed{{{req.sampling.seed % 3}}}"


def _proposals_in(req: GenerationRequest) -> list[str]:
    return _RESPONSE.findall(req.messages[-1]["content"])


def _cfg(**kw: Any) -> AggregateConfig:
    small = SamplingConfig(max_tokens=64)
    return AggregateConfig(proposer=small, aggregator=small, **kw)


async def test_aft_topology_calls_and_prompts():
    backend = ScriptedBackend(_unique)
    graph = build_graph(backend, _cfg(proposals=3, layers=2))
    result = await graph.ainvoke({"question": "What is 2 + 2?"})

    proposer = [c for c in backend.calls if not _is_aggregation(c)]
    aggregator = [c for c in backend.calls if _is_aggregation(c)]
    assert len(proposer) == 3 and len(aggregator) == 6
    layers = result["layers"]
    assert [ly["layer"] for ly in layers] == [0, 1, 2]
    # Every aggregator call of layer l reads exactly the K texts of layer l - 1, in order.
    for layer in (1, 2):
        previous = layers[layer - 1]["texts"]
        calls = aggregator[(layer - 1) * 3 : layer * 3]
        for call in calls:
            assert _proposals_in(call) == previous
        assert layers[layer]["sources"] == [[0, 1, 2]] * 3
    assert result["answer"] == layers[-1]["texts"][0]  # select="last"
    assert result["messages"][-1].content == result["answer"]


async def test_single_final_aggregation_samples_one():
    backend = ScriptedBackend(_unique)
    graph = build_graph(backend, _cfg(proposals=4, layers=2, single_final_aggregation=True))
    result = await graph.ainvoke({"question": "q?"})
    assert [len(ly["texts"]) for ly in result["layers"]] == [4, 4, 1]
    assert len(backend.calls) == 9


async def test_rsa_subsets_are_distinct_members_of_previous_population():
    backend = ScriptedBackend(_unique)
    graph = build_graph(backend, _cfg(strategy="rsa", population=5, subset_size=3, steps=3))
    result = await graph.ainvoke({"question": "q?"})
    layers = result["layers"]
    assert [len(ly["texts"]) for ly in layers] == [5, 5, 5, 5]
    aggregations = [c for c in backend.calls if _is_aggregation(c)]
    assert len(aggregations) == 15
    for layer in (1, 2, 3):
        previous = layers[layer - 1]["texts"]
        for src in layers[layer]["sources"]:
            assert len(src) == 3 and len(set(src)) == 3
            assert all(0 <= j < 5 for j in src)
        # the prompts hold exactly those members
        seen = sorted(tuple(_proposals_in(c)) for c in aggregations[(layer - 1) * 5 : layer * 5])
        expected = sorted(tuple(previous[j] for j in src) for src in layers[layer]["sources"])
        assert seen == expected
    # Not every call reads the same subset: the subsets really are random.
    assert len({tuple(s) for ly in layers[1:] for s in ly["sources"]}) > 1


async def test_seeds_make_runs_reproducible():
    cfg = _cfg(strategy="rsa", population=6, subset_size=2, steps=2, seed=7)
    first = await build_graph(ScriptedBackend(_unique), cfg).ainvoke({"question": "q?"})
    second = await build_graph(ScriptedBackend(_unique), cfg).ainvoke({"question": "q?"})
    other = await build_graph(ScriptedBackend(_unique), cfg.model_copy(update={"seed": 8})).ainvoke(
        {"question": "q?"}
    )
    strip = lambda r: [{k: v for k, v in ly.items() if k != "elapsed_s"} for ly in r["layers"]]  # noqa: E731
    assert strip(first) == strip(second)
    assert first["answer"] == second["answer"]
    assert strip(first) != strip(other)


async def test_usage_is_the_sum_of_the_layers():
    backend = ScriptedBackend(_unique)
    result = await build_graph(backend, _cfg(proposals=2, layers=1)).ainvoke({"question": "q?"})
    usage = result["usage"]
    assert usage["calls"] == len(backend.calls) == 4
    assert usage["proposer_calls"] == 2 and usage["aggregator_calls"] == 2
    assert usage["completion_tokens"] == sum(
        len(t.split()) for ly in result["layers"] for t in ly["texts"]
    )
    assert usage["prompt_tokens"] == sum(backend.count_prompt_tokens(c) for c in backend.calls)


async def test_events_stream_once_per_layer_in_order():
    graph = build_graph(ScriptedBackend(_unique), _cfg(proposals=2, layers=3))
    events = [
        chunk async for chunk in graph.astream({"question": "q?"}, stream_mode="custom")
    ]
    assert all(isinstance(e, LayerEvent) for e in events)
    assert [e.layer for e in events] == [0, 1, 2, 3]
    assert [e.kind for e in events] == ["proposals", "aggregation", "aggregation", "aggregation"]


class _Recorder(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    async def on_custom_event(self, name, data, **kwargs) -> None:
        self.events.append((name, data))


async def test_callback_events_and_parent_graph_streaming():
    inner = build_graph(ScriptedBackend(_unique), _cfg(proposals=2, layers=2), name="reasoner")
    parent = StateGraph(MessagesState)
    parent.add_node("reasoner", inner)
    parent.add_edge(START, "reasoner")
    app = parent.compile()

    recorder = _Recorder()
    streamed = []
    async for _ns, mode, chunk in app.astream(
        {"messages": [HumanMessage("What is 3 * 3?")]},
        stream_mode=["custom", "values"],
        subgraphs=True,
        config={"callbacks": [recorder]},
    ):
        if mode == "custom":
            streamed.append(chunk.layer)
        else:
            final = chunk
    assert streamed == [0, 1, 2]
    assert [(n, d.layer) for n, d in recorder.events] == [("aft_layer", 0), ("aft_layer", 1), ("aft_layer", 2)]
    # Question read from the last human message; answer appended as an AI message.
    messages = final["messages"]
    assert isinstance(messages[0], HumanMessage) and isinstance(messages[-1], AIMessage)
    assert len(messages) == 2
    assert messages[-1].content.startswith("text-")


async def test_as_tool_inside_an_agent_graph():
    backend = ScriptedBackend(_unique)
    tool = as_tool(build_graph(backend, _cfg(proposals=2, layers=1)))

    def agent(state: MessagesState) -> dict:
        call = {"name": tool.name, "args": {"question": "What is 6 * 7?"}, "id": "call-1"}
        return {"messages": [AIMessage(content="", tool_calls=[call])]}

    parent = StateGraph(MessagesState)
    parent.add_node("agent", agent)
    parent.add_node("tools", ToolNode([tool]))
    parent.add_edge(START, "agent")
    parent.add_edge("agent", "tools")
    recorder = _Recorder()
    out = await parent.compile().ainvoke(
        {"messages": [HumanMessage("solve it")]}, config={"callbacks": [recorder]}
    )
    reply = out["messages"][-1]
    assert reply.type == "tool" and reply.content.startswith("text-")
    assert any("What is 6 * 7?" in c.messages[-1]["content"] for c in backend.calls)
    assert [d.layer for _, d in recorder.events] == [0, 1]


async def test_checkpointed_run_resumes_after_interruption_without_regenerating():
    attempts = {"fail": True}

    def fail(req: GenerationRequest) -> bool:
        # Layer 2 (its prompts hold layer-1 texts, whose seeds differ from layer 0's) fails once.
        return attempts["fail"] and _is_aggregation(req) and "text-" in req.messages[-1]["content"] and req.sampling.seed == seeds_layer2[0]

    # Both calls of a layer must succeed, so the failing call stops the run.
    cfg = _cfg(proposals=2, layers=2, max_retries=1, min_survivors=2)
    from aft_graph.backends.base import derive_seed

    seeds_layer2 = [derive_seed(cfg.seed, 2, 0)]
    backend = ScriptedBackend(_unique, fail=fail)
    graph = build_graph(backend, cfg, checkpointer=InMemorySaver())
    run = {"configurable": {"thread_id": "t1"}}
    with pytest.raises(Exception, match="scripted failure"):
        await graph.ainvoke({"question": "q?"}, run)
    calls_before = len(backend.calls)
    # layers 0 and 1 done, both layer-2 calls attempted, and the failed one tried once more
    assert calls_before == 2 + 2 + 2 + 1
    state = await graph.aget_state(run)
    assert [ly["layer"] for ly in state.values["layers"]] == [0, 1]

    attempts["fail"] = False
    result = await graph.ainvoke(None, run)
    assert [ly["layer"] for ly in result["layers"]] == [0, 1, 2]
    # Only the failed call is made again: finished layers and the finished call are reused.
    assert len(backend.calls) == calls_before + 1


async def test_non_transient_failure_is_reported_in_the_layer_event():
    class _Broken(ScriptedBackend):
        async def generate(self, request):
            if request.sampling.seed == self.bad_seed:
                self.calls.append(request)
                raise BackendError("model refused")
            return await super().generate(request)

    from aft_graph.backends.base import derive_seed

    backend = _Broken(_unique)
    backend.bad_seed = derive_seed(0, 0, 1)
    result = await build_graph(backend, _cfg(proposals=3, layers=1)).ainvoke({"question": "q?"})
    first = result["layers"][0]
    assert len(first["texts"]) == 2 and len(first["failures"]) == 1
    assert "model refused" in first["failures"][0]
    assert result["layers"][1]["sources"] == [[0, 1]] * 3  # only survivors are aggregated
    assert result["usage"]["failed_calls"] == 1


async def test_proposals_are_cut_to_fit_the_context_window():
    long_text = " ".join(f"w{i}" for i in range(400))
    backend = ScriptedBackend(lambda req, i: long_text if not _is_aggregation(req) else "done", context_window=600)
    cfg = AggregateConfig(
        proposals=3, layers=1, proposer=SamplingConfig(max_tokens=500), aggregator=SamplingConfig(max_tokens=64)
    )
    result = await build_graph(backend, cfg).ainvoke({"question": "q?"})
    assert result["layers"][0]["completion_tokens"] == [400] * 3
    agg = result["layers"][1]
    assert agg["truncated"] == 9 and agg["proposal_budget"] < 400
    for call in (c for c in backend.calls if _is_aggregation(c)):
        assert backend.count_prompt_tokens(call) + 64 <= 600
        assert all(len(p.split()) <= agg["proposal_budget"] for p in _proposals_in(call))


async def test_prompt_that_cannot_fit_fails_before_any_generation():
    backend = ScriptedBackend(context_window=120)
    graph = build_graph(backend, _cfg(proposals=8, layers=1))
    with pytest.raises(PromptTooLongError, match="tokens per proposal"):
        await graph.ainvoke({"question": "q?"})
    assert backend.calls == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"proposals": 0}, "greater than or equal to 1"),
        ({"strategy": "rsa", "population": 2, "subset_size": 3}, "subset_size"),
        ({"layers": -1}, "greater than or equal to 0"),
        ({"strategy": "beam_search"}, "propose_aggregate"),
        ({"proposer": {"max_tokens": 0}}, "greater than or equal to 1"),
    ],
)
def test_bad_configs_are_rejected(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        AggregateConfig(**kwargs)


@pytest.mark.parametrize("payload", [{"question": "   "}, {"messages": []}, {}])
async def test_empty_question_fails_before_generation(payload):
    backend = ScriptedBackend()
    with pytest.raises(ValueError, match="question is empty"):
        await build_graph(backend, _cfg()).ainvoke(payload)
    assert backend.calls == []


async def test_self_consistency_votes_the_majority():
    answers = iter(["\\boxed{5}", "\\boxed{7}", "\\boxed{10/2}", "\\boxed{7.5}"])
    backend = ScriptedBackend(lambda req, i: f"so {next(answers)}")
    result = await build_graph(backend, _cfg(strategy="self_consistency", proposals=4)).ainvoke(
        {"question": "q?"}
    )
    assert result["answer"] == "so \\boxed{5}"  # 5 and 10/2 agree (math-verify), 2 of 4
    assert len(result["layers"]) == 1


async def test_best_of_n_selects_by_reward_and_needs_a_reward():
    backend = ScriptedBackend(_unique)
    with pytest.raises(ValueError, match="reward_fn"):
        build_graph(backend, _cfg(strategy="best_of_n"))

    async def reward(question: str, text: str) -> float:
        return float(text.split("-")[1])  # the seed

    result = await build_graph(backend, _cfg(strategy="best_of_n", proposals=5), reward_fn=reward).ainvoke(
        {"question": "q?"}
    )
    texts = result["layers"][0]["texts"]
    assert result["answer"] == max(texts, key=lambda t: float(t.split("-")[1]))


async def test_self_refine_is_sequential_with_one_source():
    backend = ScriptedBackend(_unique)
    result = await build_graph(backend, _cfg(strategy="self_refine", layers=3)).ainvoke({"question": "q?"})
    assert [len(ly["texts"]) for ly in result["layers"]] == [1, 1, 1, 1]
    assert [ly["kind"] for ly in result["layers"]] == ["proposals"] + ["refinement"] * 3
    refine_calls = backend.calls[1:]
    for layer, call in enumerate(refine_calls, start=1):
        assert result["layers"][layer - 1]["texts"][0] in call.messages[-1]["content"]


async def test_drawing_and_traces_show_proposals_fanning_in_to_aggregators():
    graph = build_graph(ScriptedBackend(), _cfg(proposals=2, layers=1))
    drawing = graph.get_graph().draw_mermaid()
    for node in ("prepare", "propose", "collect_layer", "aggregate", "finalize"):
        assert node in drawing
    nodes = set(graph.get_graph().nodes)
    assert {"propose", "aggregate", "collect_layer"} <= nodes
    assert "generate" not in nodes and "collect" not in nodes
    # Traces name the same nodes: 2 proposal calls, the barrier, 2 aggregation calls, ...
    steps = [
        node
        async for update in graph.astream({"question": "q?"}, stream_mode="updates")
        for node in update
    ]
    assert steps == ["prepare", "propose", "propose", "collect_layer", "aggregate", "aggregate",
                     "collect_layer", "finalize"]  # fmt: skip


async def test_aggregator_lora_from_the_config_and_the_context():
    from aft_graph import AggregateContext

    backend = ScriptedBackend(_unique)
    graph = build_graph(backend, _cfg(proposals=2, layers=1, aggregator_lora="aft"))
    await graph.ainvoke({"question": "What is 2 + 2?"})
    assert {c.lora for c in backend.calls if not _is_aggregation(c)} == {None}
    assert {c.lora for c in backend.calls if _is_aggregation(c)} == {"aft"}
    # A run's context wins over the configuration; the run-wide lora stays off the aggregator.
    backend.calls.clear()
    await graph.ainvoke(
        {"question": "What is 2 + 2?"}, context=AggregateContext(lora="p", aggregator_lora="/x/adapter")
    )
    assert {c.lora for c in backend.calls if not _is_aggregation(c)} == {"p"}
    assert {c.lora for c in backend.calls if _is_aggregation(c)} == {"/x/adapter"}


async def test_usage_counts_prompt_tokens_read_from_the_prefix_cache():
    class Caching(ScriptedBackend):
        """Reports the shared aggregation prompt as cached after its first read, as vLLM does."""

        seen: set = set()

        async def generate(self, request):
            out = await super().generate(request)
            key = request.messages[-1]["content"]
            cached = 7 if key in self.seen else 0
            self.seen.add(key)
            return [c.model_copy(update={"cached_prompt_tokens": cached}) for c in out]

    graph = build_graph(Caching(_unique), _cfg(proposals=3, layers=1))
    result = await graph.ainvoke({"question": "What is 2 + 2?"})
    layers = result["layers"]
    # each layer's three calls share one prompt: one prefill, two reads
    assert [sorted(ly["cached_prompt_tokens"]) for ly in layers] == [[0, 7, 7], [0, 7, 7]]
    assert result["usage"]["cached_prompt_tokens"] == sum(map(sum, (ly["cached_prompt_tokens"] for ly in layers)))
