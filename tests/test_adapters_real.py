"""The shipped AFT adapter on the real default model: it loads by name and changes the greedy
aggregation (slow: starts a vLLM engine on the default model)."""

from __future__ import annotations

import pytest

from aft_graph.backends.base import GenerationRequest, Sampling
from aft_graph.prompts import aggregation_messages

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

QUESTION = (
    "What is 37 + 48 - 19?\n\nThink step by step, then give only the final answer inside "
    "<answer></answer> tags, for example <answer>...</answer>."
)
PROPOSALS = [
    "37 + 48 = 85, and 85 - 19 = 66. <answer>66</answer>",
    "37 + 48 = 75; 75 - 19 = 56. <answer>56</answer>",
    "<answer>56</answer>",
]


async def test_shipped_adapter_changes_the_default_models_aggregation():
    from aft_graph.backends import VLLMBackend

    greedy = Sampling(temperature=0.0, max_tokens=96)
    messages = tuple(aggregation_messages(QUESTION, PROPOSALS))
    async with VLLMBackend("default", enable_lora=True, max_model_len=2048) as backend:
        base = await backend.generate(GenerationRequest(messages=messages, sampling=greedy))
        aft = await backend.generate(GenerationRequest(messages=messages, sampling=greedy, lora="aft"))
        again = await backend.generate(GenerationRequest(messages=messages, sampling=greedy, lora="aft"))
    assert aft[0].text.strip() and aft[0].text != base[0].text
    assert again[0].text == aft[0].text  # served by name, deterministic
