"""End to end: the graph on the real small model through the in-process vLLM engine."""

from __future__ import annotations

import pytest

from aft_graph import AggregateConfig, SamplingConfig, build_graph
from aft_graph.backends.base import GenerationRequest
from aft_graph.prompts import proposal_messages

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

QUESTION = "What is 12 * 7? Put the final answer in \\boxed{}."
MAX_TOKENS = 48


def _check_layer_accounting(layers, backend):
    for ly in layers:
        n = len(ly["texts"])
        assert n and ly["failures"] == []
        assert len(ly["answers"]) == len(ly["prompt_tokens"]) == len(ly["completion_tokens"]) == n
        for text, done, why in zip(ly["texts"], ly["completion_tokens"], ly["finish_reasons"], strict=True):
            assert 0 < done <= MAX_TOKENS
            assert why in ("stop", "length")
            if why == "length":
                assert done == MAX_TOKENS
            # re-tokenizing the text gives (about) the generated count: the accounting is real
            assert abs(backend.count_tokens(text) - done) <= 2
        if ly["layer"] > 0:
            # an aggregation prompt holds the proposals, so it is longer than a proposal prompt
            assert min(ly["prompt_tokens"]) > max(layers[0]["prompt_tokens"])


def _check_usage(result):
    layers = result["layers"]
    usage = result["usage"]
    assert usage["prompt_tokens"] == sum(sum(ly["prompt_tokens"]) for ly in layers)
    assert usage["completion_tokens"] == sum(sum(ly["completion_tokens"]) for ly in layers)
    assert usage["calls"] == sum(len(ly["texts"]) for ly in layers)


async def test_aft_end_to_end_on_vllm(vllm_backend):
    sampling = SamplingConfig(max_tokens=MAX_TOKENS, temperature=0.8)
    cfg = AggregateConfig(proposals=3, layers=2, proposer=sampling, aggregator=sampling, seed=1)
    result = await build_graph(vllm_backend, cfg).ainvoke({"question": QUESTION})

    layers = result["layers"]
    assert [ly["layer"] for ly in layers] == [0, 1, 2]
    assert [len(ly["texts"]) for ly in layers] == [3, 3, 3]
    expected_prompt = vllm_backend.count_prompt_tokens(
        GenerationRequest(messages=tuple(proposal_messages(QUESTION)))
    )
    assert layers[0]["prompt_tokens"] == [expected_prompt] * 3
    _check_layer_accounting(layers, vllm_backend)
    _check_usage(result)
    assert result["usage"]["proposer_calls"] == 3 and result["usage"]["aggregator_calls"] == 6
    assert result["answer"] == layers[-1]["texts"][0]


async def test_rsa_end_to_end_on_vllm(vllm_backend):
    sampling = SamplingConfig(max_tokens=MAX_TOKENS, temperature=0.8)
    cfg = AggregateConfig(
        strategy="rsa", population=4, subset_size=2, steps=2, proposer=sampling, aggregator=sampling
    )
    result = await build_graph(vllm_backend, cfg).ainvoke({"question": QUESTION})
    layers = result["layers"]
    assert [len(ly["texts"]) for ly in layers] == [4, 4, 4]
    for ly in layers[1:]:
        assert all(len(set(s)) == 2 for s in ly["sources"])
    _check_layer_accounting(layers, vllm_backend)
    _check_usage(result)
    assert result["usage"]["calls"] == 12
