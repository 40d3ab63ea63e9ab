"""trainer: builds the AFT aggregator (Aggregation Fine-Tuning) for aft_graph.

Recipe: proposals (on-policy from the model, or off-policy from a data set) -> top-K selection by
a reward -> aggregation targets (teacher, or teacher-free self-aggregation kept by a verifier) ->
LoRA SFT on (query + proposals -> aggregation) with the loss on the aggregation only -> export
(adapter served per request by VLLMBackend / HFBackend, or a merged model directory).

The stages are library functions (:mod:`trainer.stages`, each resumable in a run directory);
:func:`trainer.recipe.run_recipe` runs them in order (``aft-train demo``). Queries and verifiers
come from :mod:`aft_graph.tasks`, shared with the evaluation harness.

The training prompts come from :mod:`aft_graph.prompts`, the same code the graph's aggregator uses
at inference. Heavy modules (torch, transformers, peft) load only when a stage needs them.
"""

from .config import (
    AggregationConfig,
    DemoConfig,
    OffPolicyConfig,
    ProposalConfig,
    SelectConfig,
    SFTConfig,
)
from .records import AggregationRecord, DataReport, Proposal, ProposalRecord, TaskRecord

__all__ = [
    "AggregationConfig",
    "AggregationRecord",
    "DataReport",
    "DemoConfig",
    "OffPolicyConfig",
    "Proposal",
    "ProposalConfig",
    "ProposalRecord",
    "SFTConfig",
    "SelectConfig",
    "TaskRecord",
]
