"""AdapterRouter and CachingBackend on scripted backends, alone and under the graph and the
evaluation harness (the two-engine, two-phase evaluation of benchmarks/aft_graph_matched.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from aft_graph import AggregateConfig, build_graph
from aft_graph.backends import (
    AdapterRouter,
    BackendUnavailableError,
    CachingBackend,
    GenerationRequest,
    Sampling,
    ScriptedBackend,
)
from aft_graph.eval import evaluate, load_records
from aft_graph.tasks import Task


def chat(content: str = "What is 2 + 2?", lora: str | None = None, **sampling) -> GenerationRequest:
    return GenerationRequest(
        messages=({"role": "user", "content": content},), sampling=Sampling(**sampling), lora=lora
    )


# ------------------------------------------------------------------ AdapterRouter


async def test_router_sends_a_routed_adapter_to_its_backend_without_the_name():
    base, merged = ScriptedBackend(["base"]), ScriptedBackend(["merged"])
    router = AdapterRouter(base, {"aft": merged})
    assert (await router.generate(chat(lora="aft")))[0].text == "merged"
    assert (await router.generate(chat()))[0].text == "base"
    assert (await router.generate(chat(lora="other")))[0].text == "base"
    assert [r.lora for r in merged.calls] == [None]
    assert [r.lora for r in base.calls] == [None, "other"]  # an unrouted adapter is the base's to serve


async def test_router_without_base_refuses_unrouted_requests_by_name():
    router = AdapterRouter(None, {"aft": ScriptedBackend(["merged"])})
    assert router.count_tokens("two words") == 2  # token counting falls back to an adapter backend
    with pytest.raises(BackendUnavailableError, match=r"no base backend .* routed adapters are \['aft'\]"):
        await router.generate(chat())


def test_router_needs_some_backend():
    with pytest.raises(ValueError, match="base backend or at least one adapter"):
        AdapterRouter(None, {})


async def test_router_closes_each_backend_once():
    shared = ScriptedBackend()
    router = AdapterRouter(shared, {"a": shared, "b": ScriptedBackend()})
    await router.aclose()
    assert shared.closed


async def test_graph_aggregates_on_the_routed_backend_and_proposes_on_the_base():
    base = ScriptedBackend(lambda r, i: f"Proposal. <answer>{r.sampling.seed % 3}</answer>")
    merged = ScriptedBackend(["Aggregated. <answer>7</answer>"])
    graph = build_graph(AdapterRouter(base, {"aft": merged}), AggregateConfig(proposals=3, layers=1, aggregator_lora="aft", seed=1))
    result = await graph.ainvoke({"question": "What is 3 + 4?"})
    assert len(base.calls) == 3 and len(merged.calls) == 3
    assert all(r.lora is None for r in merged.calls)
    assert "7" in result["answer"]


# ------------------------------------------------------------------ CachingBackend


async def test_cache_replays_seeded_requests_in_a_new_instance(tmp_path):
    path = tmp_path / "cache" / "completions.jsonl"
    first = ScriptedBackend()
    cache = CachingBackend(first, path)
    texts = [(await cache.generate(chat(seed=s, temperature=0.7)))[0].text for s in range(3)]
    assert cache.misses == 3 and len(first.calls) == 3 and len(cache) == 3

    second = ScriptedBackend(["never used"])
    again = CachingBackend(second, path)
    assert [(await again.generate(chat(seed=s, temperature=0.7)))[0].text for s in range(3)] == texts
    assert again.hits == 3 and second.calls == []
    assert chat(seed=0, temperature=0.7) in again and chat(seed=9, temperature=0.7) not in again


async def test_cache_keys_on_adapter_namespace_and_sampling(tmp_path):
    backend = ScriptedBackend()
    cache = CachingBackend(backend, tmp_path / "c.jsonl")
    for request in (chat(seed=1), chat(seed=1, lora="aft"), chat(seed=1, max_tokens=9), chat(seed=2)):
        await cache.generate(request)
    assert cache.misses == 4
    other = CachingBackend(ScriptedBackend(), tmp_path / "c.jsonl", namespace="another model")
    assert chat(seed=1) not in other


async def test_cache_passes_unseeded_samples_through_and_keeps_greedy_ones(tmp_path):
    backend = ScriptedBackend()
    cache = CachingBackend(backend, tmp_path / "c.jsonl")
    await cache.generate(chat(temperature=0.7))
    await cache.generate(chat(temperature=0.7))
    await cache.generate(chat(temperature=0.0))
    await cache.generate(chat(temperature=0.0))
    assert len(backend.calls) == 3 and len(cache) == 1


async def test_cache_generates_identical_requests_in_flight_once(tmp_path):
    backend = ScriptedBackend(delay=0.05)
    cache = CachingBackend(backend, tmp_path / "c.jsonl")
    results = await asyncio.gather(*(cache.generate(chat(seed=5)) for _ in range(4)))
    assert len(backend.calls) == 1 and len({r[0].text for r in results}) == 1


async def test_cache_does_not_keep_failures(tmp_path):
    backend = ScriptedBackend(fail=lambda r: r.sampling.seed == 1)
    cache = CachingBackend(backend, tmp_path / "c.jsonl")
    with pytest.raises(BackendUnavailableError):
        await cache.generate(chat(seed=1))
    backend.fail = None
    await cache.generate(chat(seed=1))
    assert len(backend.calls) == 2 and len(cache) == 1


async def test_cache_survives_an_interrupted_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = CachingBackend(ScriptedBackend(), path)
    await cache.generate(chat(seed=1))
    with path.open("a") as f:
        f.write('{"key": "cut in the midd')  # a write killed half-way
    again = CachingBackend(ScriptedBackend(), path)
    assert len(again) == 1
    await again.generate(chat(seed=2))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith('{"key": "') and line.endswith("}")]
    assert len(rows) == 2 and len(CachingBackend(ScriptedBackend(), path)) == 2


# ------------------------------------------------------------------ two phases, two engines


async def test_two_phase_evaluation_reuses_the_base_proposals(tmp_path):
    """Phase 1 runs the base model; phase 2 aggregates the same proposals with a "merged" engine
    and generates no proposal (a router without base would refuse one)."""
    tasks = [Task(id=f"t{i}", question=f"What is {i} + {i}?", reference=str(2 * i)) for i in range(3)]
    sampling = {"temperature": 0.7, "max_tokens": 32}
    untrained = AggregateConfig(proposals=3, layers=1, seed=0, proposer=sampling, aggregator=sampling)
    trained = untrained.model_copy(update={"aggregator_lora": "aft"})
    cache_path, out = tmp_path / "completions.jsonl", tmp_path / "eval"

    base = ScriptedBackend(lambda r, i: f"Working. <answer>{r.sampling.seed % 5}</answer>")
    await evaluate(CachingBackend(base, cache_path), tasks, {"aft": untrained}, out, progress=False, plots=False)
    merged = ScriptedBackend(lambda r, i: "Checked every proposal. <answer>4</answer>")
    phase2 = CachingBackend(AdapterRouter(None, {"aft": merged}), cache_path)
    summary = await evaluate(phase2, tasks, {"aft_trained": trained}, out, progress=False, plots=False)

    assert summary["strategies"]["aft_trained"]["n"] == 3
    assert len(merged.calls) == 9 and phase2.hits == 9  # 3 aggregations and 3 cached proposals a task
    records = {(r["strategy"], r["task_id"]): r for r in load_records(out)}
    for task in tasks:
        before, after = records[("aft", task.id)], records[("aft_trained", task.id)]
        assert before["layers"][0]["texts"] == after["layers"][0]["texts"]
        assert after["layers"][1]["texts"] == ["Checked every proposal. <answer>4</answer>"] * 3
