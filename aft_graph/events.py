"""Layer events: what each finished layer tells the outside world, and how it gets there.

Every finished layer (layer 0 = the initial proposals, layer l = the l-th aggregation layer or RSA
step) becomes one :class:`LayerEvent`, sent

- to LangGraph's stream writer: ``graph.astream(..., stream_mode="custom")`` yields it (from inside a
  parent graph too, with ``subgraphs=True``);
- as a LangChain custom callback event named ``aft_layer``: callback handlers receive it in
  ``on_custom_event`` and ``astream_events(version="v2")`` yields it as ``on_custom_event``.
"""

from __future__ import annotations

from typing import Literal

from langchain_core.callbacks import adispatch_custom_event
from langgraph.config import get_stream_writer
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EVENT_NAME", "LayerEvent", "Usage", "emit_layer"]

EVENT_NAME = "aft_layer"


class LayerEvent(BaseModel):
    """One finished layer.

    Attributes:
        layer: 0 for the initial proposals, l for the l-th aggregation layer / RSA step.
        kind: ``proposals``, ``aggregation`` or ``refinement``.
        texts: The texts this layer produced (failed calls excluded), in call order.
        answers: The answer extracted from each text (``None`` where none was stated).
        sources: For each text, the indices (into the previous layer's texts) it read.
        prompt_tokens: Prompt tokens of each successful call.
        completion_tokens: Generated tokens of each successful call.
        finish_reasons: ``stop`` or ``length`` for each successful call.
        truncated: How many proposals were cut to the token budget in this layer's prompts.
        proposal_budget: Tokens allowed per proposal inside an aggregation prompt.
        failures: Error messages of calls that failed (their texts are left out).
        elapsed_s: Wall time of the layer.
    """

    model_config = ConfigDict(frozen=True)

    layer: int = Field(ge=0)
    kind: Literal["proposals", "aggregation", "refinement"]
    texts: list[str]
    answers: list[str | None]
    sources: list[list[int]]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    finish_reasons: list[str]
    truncated: int = 0
    proposal_budget: int | None = None
    failures: list[str] = []
    elapsed_s: float = 0.0

    @property
    def calls(self) -> int:
        """Generation calls made for this layer, failed ones included."""
        return len(self.texts) + len(self.failures)


class Usage(BaseModel):
    """Compute spent on one question."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    proposer_calls: int = 0
    aggregator_calls: int = 0
    failed_calls: int = 0

    @classmethod
    def from_layers(cls, layers: list[LayerEvent]) -> Usage:
        usage = cls()
        for ev in layers:
            usage.prompt_tokens += sum(ev.prompt_tokens)
            usage.completion_tokens += sum(ev.completion_tokens)
            usage.calls += ev.calls
            usage.failed_calls += len(ev.failures)
            if ev.layer == 0:
                usage.proposer_calls += ev.calls
            else:
                usage.aggregator_calls += ev.calls
        return usage


async def emit_layer(event: LayerEvent) -> None:
    """Send ``event`` to the stream writer and to LangChain callback handlers (exactly once each)."""
    get_stream_writer()(event)
    await adispatch_custom_event(EVENT_NAME, event)
