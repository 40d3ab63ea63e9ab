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
        cached_prompt_tokens: Of those, the tokens the engine read from its prefix cache instead of
            computing them (vLLM: ``num_cached_tokens``; 0 where the engine does not say). The
            aggregation calls of one layer share their prompt, so all but the first read it.
        completion_tokens: Generated tokens of each successful call.
        finish_reasons: ``stop`` or ``length`` for each successful call.
        truncated: How many proposals were cut to the token budget in this layer's prompts.
        proposal_budget: Tokens allowed per proposal inside an aggregation prompt.
        failures: Error messages of calls that failed (their texts are left out).
        elapsed_s: Wall time of the layer.
        confidences: Each text's confidence from its token log-probabilities (when the run uses
            them: ``select="confidence"`` or ``keep_confident``).
        kept: Indices of the texts passed on (to the next layer or the final selection) when
            ``keep_confident`` dropped the least confident ones; ``None``: all were.
        waves: Sizes of the waves the proposals were sampled in (``adaptive_width``).
        stop_probability: The adaptive-width rule's probability that the leading answer is the
            majority answer, after the last wave.
        agreement: Fraction of the texts stating the majority answer (``early_exit``).
        stopped_early: The run finalizes after this layer: its answers agreed (``early_exit``).
        saved_calls: Generation calls not made thanks to this layer: proposals the adaptive width
            did not sample, plus every call of the layers an early exit skipped.
        checks: For code: per text, what running it on the question's examples showed (the
            notes the aggregator was given with ``code_checks``).
    """

    model_config = ConfigDict(frozen=True)

    layer: int = Field(ge=0)
    kind: Literal["proposals", "aggregation", "refinement"]
    texts: list[str]
    answers: list[str | None]
    sources: list[list[int]]
    prompt_tokens: list[int]
    cached_prompt_tokens: list[int] = []
    completion_tokens: list[int]
    finish_reasons: list[str]
    truncated: int = 0
    proposal_budget: int | None = None
    failures: list[str] = []
    elapsed_s: float = 0.0
    confidences: list[float] | None = None
    kept: list[int] | None = None
    waves: list[int] = []
    stop_probability: float | None = None
    agreement: float | None = None
    stopped_early: bool = False
    saved_calls: int = Field(0, ge=0)
    checks: list[str] | None = None

    @property
    def calls(self) -> int:
        """Generation calls made for this layer, failed ones included."""
        return len(self.texts) + len(self.failures)


class Usage(BaseModel):
    """Compute spent on one question.

    ``selector_calls`` are calls outside the layers (universal self-consistency's pick, the
    model's test inputs for code checks); their tokens are in the totals. ``saved_calls`` are the
    calls adaptive width and early exit did not make, and ``stopped_after`` the layer after which
    an early exit finalized (``None``: the run went through every layer).
    """

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    proposer_calls: int = 0
    aggregator_calls: int = 0
    failed_calls: int = 0
    selector_calls: int = 0
    saved_calls: int = 0
    stopped_after: int | None = None

    @classmethod
    def from_layers(cls, layers: list[LayerEvent]) -> Usage:
        usage = cls()
        for ev in layers:
            usage.prompt_tokens += sum(ev.prompt_tokens)
            usage.cached_prompt_tokens += sum(ev.cached_prompt_tokens)
            usage.completion_tokens += sum(ev.completion_tokens)
            usage.calls += ev.calls
            usage.failed_calls += len(ev.failures)
            if ev.layer == 0:
                usage.proposer_calls += ev.calls
            else:
                usage.aggregator_calls += ev.calls
            usage.saved_calls += ev.saved_calls
            if ev.stopped_early:
                usage.stopped_after = ev.layer
        return usage

    def add_call(self, prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int = 0) -> None:
        """Count one selector call (outside the layers)."""
        self.prompt_tokens += prompt_tokens
        self.cached_prompt_tokens += cached_prompt_tokens
        self.completion_tokens += completion_tokens
        self.calls += 1
        self.selector_calls += 1


async def emit_layer(event: LayerEvent) -> None:
    """Send ``event`` to the stream writer and to LangChain callback handlers (exactly once each)."""
    get_stream_writer()(event)
    await adispatch_custom_event(EVENT_NAME, event)
