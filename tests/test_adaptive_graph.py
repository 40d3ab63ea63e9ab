"""Adaptive compute and selection in the graph, pinned on ScriptedBackend: early exit, waves,
confidence, universal self-consistency, behaviour-based code selection (calls and savings counted)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from aft_graph import AggregateConfig, LayerEvent, SamplingConfig, build_graph
from aft_graph.backends import ScriptedBackend
from aft_graph.backends.base import GenerationRequest, derive_seed

_RESPONSE = re.compile(r'<response id="\d+">\n(.*?)\n</response>', re.DOTALL)


def _cfg(**kw: Any) -> AggregateConfig:
    small = SamplingConfig(max_tokens=64)
    return AggregateConfig(proposer=small, aggregator=small, **kw)


def _kind(req: GenerationRequest) -> str:
    content = req.messages[-1]["content"]
    if "<response id=" in content or "Candidate solutions:" in content:
        return "aggregate"
    if "most consistent response" in content:
        return "usc"
    if "test it well" in content:
        return "inputs"
    return "propose"


def scripted(
    proposals: list[str],
    aggregations: list[str] | Callable[[GenerationRequest], str] = ("agg \\boxed{1}",),
    *,
    seed: int = 0,
    extra: dict[str, str] | None = None,
    **kw: Any,
) -> ScriptedBackend:
    """A backend whose i-th proposal call says ``proposals[i]`` (found from the call's seed)."""
    index = {derive_seed(seed, 0, i): i for i in range(len(proposals))}
    counter = iter(range(1 << 30))

    def respond(req: GenerationRequest, _sample: int) -> str:
        kind = _kind(req)
        if kind == "propose":
            return proposals[index[req.sampling.seed]]
        if kind == "aggregate":
            if callable(aggregations):
                return aggregations(req)
            return aggregations[next(counter) % len(aggregations)]
        return (extra or {})[kind]

    return ScriptedBackend(respond, **kw)


def calls_of(backend: ScriptedBackend, kind: str) -> list[GenerationRequest]:
    return [c for c in backend.calls if _kind(c) == kind]


# ------------------------------------------------------------------------------ early exit


class TestEarlyExit:
    async def test_agreeing_proposals_skip_every_aggregation(self):
        backend = scripted(["a \\boxed{4}", "b \\boxed{4.0}", "c \\boxed{4}", "d \\boxed{8/2}"])
        graph = build_graph(backend, _cfg(proposals=4, layers=2, early_exit=True))
        events: list[LayerEvent] = []
        async for chunk in graph.astream({"question": "2+2?"}, stream_mode=["custom", "values"]):
            if chunk[0] == "custom":
                events.append(chunk[1])
            else:
                result = chunk[1]
        assert len(backend.calls) == 4 and not calls_of(backend, "aggregate")
        (event,) = events
        assert event.stopped_early and event.agreement == 1.0 and event.saved_calls == 8
        usage = result["usage"]
        assert usage["calls"] == 4 and usage["saved_calls"] == 8 and usage["stopped_after"] == 0
        assert result["answer"] == "a \\boxed{4}"

    async def test_exit_after_an_aggregation_layer(self):
        backend = scripted(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], ["x \\boxed{5}"])
        graph = build_graph(backend, _cfg(proposals=3, layers=3, early_exit=True))
        result = await graph.ainvoke({"question": "q?"})
        assert [ly["stopped_early"] for ly in result["layers"]] == [False, True]
        assert len(calls_of(backend, "aggregate")) == 3  # layers 2 and 3 never ran
        assert result["usage"]["saved_calls"] == 6 and result["usage"]["stopped_after"] == 1
        assert result["usage"]["aggregator_calls"] == 3

    async def test_fraction_agreement_answers_with_the_agreed_text(self):
        backend = scripted(["odd \\boxed{9}", "\\boxed{4}", "\\boxed{4}", "\\boxed{4}"])
        graph = build_graph(backend, _cfg(proposals=4, layers=1, early_exit=True, agreement=0.75))
        result = await graph.ainvoke({"question": "q?"})
        assert result["usage"]["stopped_after"] == 0 and result["usage"]["saved_calls"] == 4
        assert result["answer"] == "\\boxed{4}"  # not texts[0], the dissenter
        assert result["layers"][0]["agreement"] == 0.75

    async def test_no_agreement_runs_every_layer(self):
        backend = scripted(["\\boxed{1}", "\\boxed{2}"], ["\\boxed{1}", "\\boxed{2}"])
        graph = build_graph(backend, _cfg(proposals=2, layers=2, early_exit=True))
        result = await graph.ainvoke({"question": "q?"})
        assert len(result["layers"]) == 3 and len(backend.calls) == 6
        assert result["usage"]["saved_calls"] == 0 and result["usage"]["stopped_after"] is None
        # The last layer is never judged: nothing is left to save there.
        assert result["layers"][-1]["agreement"] is None

    async def test_rsa_and_single_final_aggregation_count_what_they_skip(self):
        backend = scripted(["\\boxed{7}"] * 5)
        graph = build_graph(
            backend, _cfg(strategy="rsa", population=5, subset_size=2, steps=3, early_exit=True)
        )
        result = await graph.ainvoke({"question": "q?"})
        assert len(backend.calls) == 5 and result["usage"]["saved_calls"] == 15

        backend = scripted(["\\boxed{7}"] * 3)
        config = _cfg(proposals=3, layers=2, single_final_aggregation=True, early_exit=True)
        result = await build_graph(backend, config).ainvoke({"question": "q?"})
        assert result["usage"]["saved_calls"] == 3 + 1

    async def test_off_by_default(self):
        backend = scripted(["\\boxed{7}"] * 3)
        result = await build_graph(backend, _cfg(proposals=3, layers=1)).ainvoke({"question": "q?"})
        assert len(backend.calls) == 6 and result["usage"]["saved_calls"] == 0


# ------------------------------------------------------------------------------ adaptive width


class TestAdaptiveWidth:
    async def test_easy_question_stops_after_two_waves(self):
        backend = scripted(["\\boxed{3}"] * 8)
        config = _cfg(strategy="self_consistency", proposals=8, adaptive_width=True)
        result = await build_graph(backend, config).ainvoke({"question": "q?"})
        (layer,) = result["layers"]
        # 2 agreeing: P = 0.875 < 0.95, sample 2 more; 4 agreeing: 0.969 -> stop.
        assert layer["waves"] == [2, 2] and len(layer["texts"]) == 4
        assert layer["stop_probability"] == pytest.approx(0.96875)
        assert len(backend.calls) == 4 and layer["saved_calls"] == 4
        assert result["usage"]["saved_calls"] == 4 and result["usage"]["proposer_calls"] == 4

    async def test_lower_confidence_stops_after_the_first_wave(self):
        backend = scripted(["\\boxed{3}"] * 8)
        config = _cfg(strategy="self_consistency", proposals=8, adaptive_width=True, stop_confidence=0.85)
        result = await build_graph(backend, config).ainvoke({"question": "q?"})
        assert len(backend.calls) == 2 and result["usage"]["saved_calls"] == 6

    async def test_hard_question_uses_every_sample(self):
        backend = scripted([f"\\boxed{{{i % 3}}}" for i in range(8)])
        config = _cfg(strategy="self_consistency", proposals=8, adaptive_width=True)
        result = await build_graph(backend, config).ainvoke({"question": "q?"})
        (layer,) = result["layers"]
        assert layer["waves"] == [2, 2, 4] and len(backend.calls) == 8 and layer["saved_calls"] == 0
        # The proposals are the same calls (same seeds) as without waves: a paired comparison.
        assert [c.sampling.seed for c in backend.calls] == [derive_seed(0, 0, i) for i in range(8)]

    async def test_aft_aggregates_the_proposals_it_sampled(self):
        backend = scripted(["\\boxed{3}"] * 6, ["agg \\boxed{3}"])
        config = _cfg(proposals=6, layers=1, adaptive_width=True, wave_step=2)
        result = await build_graph(backend, config).ainvoke({"question": "q?"})
        assert result["layers"][0]["waves"] == [2, 2]
        aggregations = calls_of(backend, "aggregate")
        assert len(aggregations) == 6  # K aggregators, each reading the 4 sampled proposals
        assert all(len(_RESPONSE.findall(a.messages[-1]["content"])) == 4 for a in aggregations)
        assert result["usage"]["saved_calls"] == 2

    async def test_with_early_exit_an_easy_question_costs_four_calls(self):
        backend = scripted(["\\boxed{3}"] * 8)
        config = _cfg(proposals=8, layers=2, adaptive_width=True, early_exit=True)
        result = await build_graph(backend, config).ainvoke({"question": "q?"})
        assert len(backend.calls) == 4
        assert result["usage"]["saved_calls"] == 4 + 2 * 8
        assert result["usage"]["calls"] + result["usage"]["saved_calls"] == 8 + 16


# ------------------------------------------------------------------------------ confidence


def _confidence_by_text(table: dict[str, float]) -> Callable[[GenerationRequest, int, str], float]:
    return lambda _req, _i, text: table.get(text, -1.0)


class TestConfidence:
    async def test_confident_minority_wins_the_weighted_vote(self):
        texts = ["\\boxed{3}", "also \\boxed{3}", "sure \\boxed{5}"]
        conf = _confidence_by_text({texts[0]: -3.0, texts[1]: -3.0, texts[2]: -0.05})
        backend = scripted(texts, logprobs=conf)
        config = _cfg(strategy="self_consistency", proposals=3, select="confidence")
        result = await build_graph(backend, config).ainvoke({"question": "q?"})
        assert result["answer"] == texts[2] and result["selection"]["rule"] == "confidence"
        assert all(c.sampling.logprobs for c in backend.calls)
        assert result["layers"][0]["confidences"] == pytest.approx([-3.0, -3.0, -0.05])
        # Same samples, plain vote: the majority.
        plain = scripted(texts, logprobs=conf)
        config = _cfg(strategy="self_consistency", proposals=3)
        result = await build_graph(plain, config).ainvoke({"question": "q?"})
        assert result["answer"] == texts[0] and not any(c.sampling.logprobs for c in plain.calls)

    async def test_keep_confident_drops_proposals_before_aggregation(self):
        texts = ["p0 \\boxed{1}", "p1 \\boxed{2}", "p2 \\boxed{3}", "p3 \\boxed{4}"]
        conf = _confidence_by_text({texts[0]: -2.0, texts[1]: -0.1, texts[2]: -3.0, texts[3]: -0.5})
        backend = scripted(texts, ["agg \\boxed{2}"], logprobs=conf)
        config = _cfg(proposals=4, layers=1, keep_confident=0.5)
        result = await build_graph(backend, config).ainvoke({"question": "q?"})
        assert result["layers"][0]["kept"] == [1, 3]
        for call in calls_of(backend, "aggregate"):
            assert _RESPONSE.findall(call.messages[-1]["content"]) == [texts[1], texts[3]]
        # Sources still index the proposals layer's texts.
        assert result["layers"][1]["sources"] == [[1, 3]] * 4

    async def test_engine_without_logprobs_is_refused_up_front(self):
        backend = ScriptedBackend(logprobs=False)
        with pytest.raises(ValueError, match="select='confidence' need token log-probabilities"):
            build_graph(backend, _cfg(strategy="self_consistency", select="confidence"))
        with pytest.raises(ValueError, match="keep_confident need"):
            build_graph(backend, _cfg(keep_confident=0.5))


# ------------------------------------------------------------------------------ USC


class TestUniversalSelfConsistency:
    async def test_the_model_picks_and_the_call_is_counted(self):
        texts = ["one", "two", "three"]
        backend = scripted(texts, extra={"usc": "The most consistent response is Response 2."})
        config = _cfg(strategy="self_consistency", proposals=3, select="usc")
        result = await build_graph(backend, config).ainvoke({"question": "Write a haiku."})
        assert result["answer"] == "two" and result["selection"]["rule"] == "usc"
        (usc,) = calls_of(backend, "usc")
        assert "Response 3: three" in usc.messages[-1]["content"]
        assert usc.sampling.temperature == 0.0
        usage = result["usage"]
        assert usage["calls"] == 4 and usage["selector_calls"] == 1 and usage["proposer_calls"] == 3
        words = len(backend.render(usc).split())
        assert usage["prompt_tokens"] == 3 * len(backend.render(calls_of(backend, "propose")[0]).split()) + words

    async def test_no_pick_falls_back_to_majority(self):
        backend = scripted(["\\boxed{1}", "\\boxed{2}", "\\boxed{2}"], extra={"usc": "I cannot tell."})
        config = _cfg(strategy="self_consistency", proposals=3, select="usc")
        result = await build_graph(backend, config).ainvoke({"question": "q?"})
        assert result["answer"] == "\\boxed{2}"
        assert result["selection"]["rule"] == "majority (usc gave no pick)"
        assert result["usage"]["selector_calls"] == 1


# ------------------------------------------------------------------------------ code behaviour

STUB = '''def add_evens(xs):
    """Sum of the even numbers in xs.
    >>> add_evens([1, 2, 3, 4])
    6
    >>> add_evens([])
    0
    """
'''
CODE_QUESTION = f"Complete the following Python function.\n\n```python\n{STUB}```"
WRONG = "```python\ndef add_evens(xs):\n    return sum(xs)\n```"
RIGHT = "```python\ndef add_evens(xs):\n    return sum(x for x in xs if x % 2 == 0)\n```"
RIGHT_2 = "```python\ndef add_evens(xs):\n    return sum(filter(lambda x: not x % 2, xs))\n```"
POSITIVE_ONLY = "```python\ndef add_evens(xs):\n    return sum(x for x in xs if x % 2 == 0 and x > 0)\n```"


class TestBehaviour:
    async def test_behaviour_vote_beats_a_text_vote(self):
        backend = scripted([WRONG, WRONG, WRONG, RIGHT, RIGHT_2])
        config = _cfg(strategy="self_consistency", proposals=5, select="behaviour")
        result = await build_graph(backend, config).ainvoke({"question": CODE_QUESTION})
        assert result["answer"] == RIGHT
        assert result["selection"]["groups"] == [[3, 4], [0, 1, 2]]
        assert result["selection"]["passing"] == [3, 4]
        assert result["usage"]["selector_calls"] == 0

    async def test_model_proposed_inputs_are_one_counted_call(self):
        backend = scripted(
            [POSITIVE_ONLY, RIGHT, RIGHT_2],
            extra={"inputs": "```python\nadd_evens([-2, -4, 1])\nadd_evens([0])\n```"},
        )
        config = _cfg(strategy="self_consistency", proposals=3, select="behaviour", proposed_inputs=2)
        result = await build_graph(backend, config).ainvoke({"question": CODE_QUESTION})
        assert result["answer"] == RIGHT  # the stated examples alone cannot tell POSITIVE_ONLY apart
        assert result["selection"]["inputs"] == 2
        assert len(calls_of(backend, "inputs")) == 1 and result["usage"]["selector_calls"] == 1

    async def test_not_a_code_question_falls_back_to_majority(self):
        backend = scripted(["\\boxed{1}", "\\boxed{2}", "\\boxed{2}"])
        config = _cfg(strategy="self_consistency", proposals=3, select="behaviour")
        result = await build_graph(backend, config).ainvoke({"question": "q?"})
        assert result["answer"] == "\\boxed{2}"
        assert result["selection"]["rule"] == "majority (the question holds no function to run)"

    async def test_code_checks_are_told_to_the_aggregator(self):
        backend = scripted([WRONG, RIGHT, "no code at all"], [RIGHT])
        config = _cfg(proposals=3, layers=1, code_checks=True)
        result = await build_graph(backend, config).ainvoke({"question": CODE_QUESTION})
        checks = result["layers"][0]["checks"]
        assert checks[0].startswith("Checked by running it: passes 1 of 2 examples")
        assert checks[1].startswith("Checked by running it: passes 2 of 2 examples")
        assert checks[2] == "Checked by running it: it does not run (no code)."
        prompt = calls_of(backend, "aggregate")[0].messages[-1]["content"]
        assert f"{RIGHT}\n\n[{checks[1]}]" in prompt
        assert result["layers"][1]["checks"] is None  # the last layer is not checked


async def test_waves_and_early_exit_under_a_checkpointer():
    from langgraph.checkpoint.memory import InMemorySaver

    config = _cfg(proposals=8, layers=2, adaptive_width=True, early_exit=True)
    plain = await build_graph(scripted(["\\boxed{3}"] * 8), config).ainvoke({"question": "q?"})
    backend = scripted(["\\boxed{3}"] * 8)
    graph = build_graph(backend, config, checkpointer=InMemorySaver())
    saved = await graph.ainvoke({"question": "q?"}, {"configurable": {"thread_id": "t"}})
    assert saved["usage"] == plain["usage"] and saved["answer"] == plain["answer"]
    assert len(backend.calls) == 4


def test_chat_model_backend_cannot_weigh_by_confidence():
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from aft_graph.backends import ChatModelBackend

    backend = ChatModelBackend(FakeListChatModel(responses=["x"]))
    with pytest.raises(ValueError, match="ChatModelBackend does not return"):
        build_graph(backend, _cfg(strategy="self_consistency", select="confidence"))
    build_graph(backend, _cfg(strategy="self_consistency", select="usc"))  # USC needs none


async def test_failed_usc_call_falls_back_to_the_vote():
    backend = scripted(["\\boxed{1}", "\\boxed{2}", "\\boxed{2}"], extra={"usc": "unused"})
    backend.fail = lambda req: _kind(req) == "usc"
    config = _cfg(strategy="self_consistency", proposals=3, select="usc", max_retries=1)
    result = await build_graph(backend, config).ainvoke({"question": "q?"})
    assert result["answer"] == "\\boxed{2}"
    assert result["selection"]["rule"].startswith("majority (the usc call failed:")
    assert result["usage"]["selector_calls"] == 0  # no completion came back to count


async def test_retried_aggregation_reads_the_kept_proposals():
    texts = ["p0 \\boxed{1}", "p1 \\boxed{2}", "p2 \\boxed{3}", "p3 \\boxed{4}"]
    conf = _confidence_by_text({texts[0]: -2.0, texts[1]: -0.1, texts[2]: -3.0, texts[3]: -0.5})
    backend = scripted(texts, ["agg \\boxed{2}"], logprobs=conf)
    failed: list[GenerationRequest] = []

    def fail_once(req: GenerationRequest) -> bool:
        if _kind(req) == "aggregate" and not failed:
            failed.append(req)
            return True
        return False

    backend.fail = fail_once
    config = _cfg(proposals=4, layers=1, keep_confident=0.5, min_survivors=4, max_retries=1)
    result = await build_graph(backend, config).ainvoke({"question": "q?"})
    aggregations = calls_of(backend, "aggregate")
    assert len(aggregations) == 5  # 4 + the failed one once more
    assert all(_RESPONSE.findall(a.messages[-1]["content"]) == [texts[1], texts[3]] for a in aggregations)
    assert len(result["layers"][1]["texts"]) == 4 and result["layers"][1]["sources"] == [[1, 3]] * 4


class TestCodeAnswers:
    async def test_programs_that_end_alike_do_not_agree_and_identical_ones_do(self):
        # Every response ends in a closing fence: read as text, all would "agree" on nothing.
        backend = scripted([WRONG, RIGHT, RIGHT_2], [RIGHT])
        config = _cfg(proposals=3, layers=1, early_exit=True)
        result = await build_graph(backend, config).ainvoke({"question": CODE_QUESTION})
        assert result["usage"]["stopped_after"] is None and len(calls_of(backend, "aggregate")) == 3
        assert result["layers"][0]["answers"] == [
            "def add_evens(xs):\n    return sum(xs)",
            "def add_evens(xs):\n    return sum(x for x in xs if x % 2 == 0)",
            "def add_evens(xs):\n    return sum(filter(lambda x: not x % 2, xs))",
        ]
        # The same program three times (comments aside) is consensus: no aggregation call.
        commented = RIGHT.replace("def add_evens(xs):", "def add_evens(xs):\n    # evens only")
        backend = scripted([RIGHT, commented, RIGHT])
        result = await build_graph(backend, config).ainvoke({"question": CODE_QUESTION})
        assert result["usage"]["stopped_after"] == 0 and calls_of(backend, "aggregate") == []

    async def test_self_consistency_on_code_votes_by_program(self):
        backend = scripted([WRONG, RIGHT, RIGHT.replace("\n```", "\n\n```")])
        config = _cfg(strategy="self_consistency", proposals=3)
        result = await build_graph(backend, config).ainvoke({"question": CODE_QUESTION})
        assert result["answer"] == RIGHT  # two identical programs outvote one


def test_a_last_line_of_markup_states_no_answer():
    from aft_graph.answers import extract_answer

    assert extract_answer("def f():\n    return 1\n```") is None
    assert extract_answer("So the answer is 7.") == "so the answer is 7"
