"""Validated configuration of a propose-and-aggregate run (pydantic).

Every bad setting fails here, before any generation, with a message that names the fix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .answers import AnswerFormat
from .backends.base import Sampling
from .consensus import StopRule
from .prompts import PromptTemplate
from .selection import ConfidenceMethod

__all__ = ["SELECTIONS", "STRATEGIES", "AggregateConfig", "SamplingConfig", "Selection", "Strategy"]

Strategy = Literal["propose_aggregate", "rsa", "self_consistency", "best_of_n", "self_refine"]
STRATEGIES: tuple[str, ...] = Strategy.__args__  # type: ignore[attr-defined]
Selection = Literal["last", "majority", "reward", "confidence", "usc", "behaviour"]
SELECTIONS: tuple[str, ...] = Selection.__args__  # type: ignore[attr-defined]


class SamplingConfig(BaseModel):
    """Sampling for one role (proposer or aggregator)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.7, ge=0.0, le=5.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="None/0 disables top-k.")
    max_tokens: int = Field(512, ge=1, strict=True, description="New tokens per completion.")
    stop: tuple[str, ...] = ()

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in stop):
            raise ValueError(
                "stop holds an empty string, which would end every completion before its first "
                "token: remove it (stop=() for none)"
            )
        return stop

    def to_sampling(self, seed: int | None, n: int = 1, *, logprobs: bool = False) -> Sampling:
        return Sampling(
            n=n,
            logprobs=logprobs,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            stop=self.stop,
            seed=seed,
        )


class AggregateConfig(BaseModel):
    """How one question is answered.

    Strategies (all run on the same graph, so comparisons are like for like):

    - ``propose_aggregate`` (AFT): ``proposals`` (K) samples, then ``layers`` (L) aggregation layers;
      each aggregator call reads all K current texts and K aggregations are sampled per layer
      (one in the last layer if ``single_final_aggregation``).
    - ``rsa`` (Recursive Self-Aggregation): a population of ``population`` (N); for ``steps`` (T)
      steps every new member aggregates a random ``subset_size``-subset (K) of the old population.
    - ``self_consistency``: K samples, majority vote.
    - ``best_of_n``: K samples, the one the reward function scores highest.
    - ``self_refine``: one sample refined ``layers`` times in sequence.

    Attributes:
        strategy: One of the strategies above.
        proposals: K, proposals per question (AFT, self-consistency, best-of-n).
        layers: L, aggregation layers (AFT) or refinement rounds (self-refine); 0 = no aggregation.
        population: N, RSA population size.
        subset_size: K, how many members each RSA aggregation reads.
        steps: T, RSA aggregation steps.
        proposer: Sampling of proposals.
        aggregator: Sampling of aggregations / refinements.
        aggregator_lora: LoRA adapter of the aggregation calls: a shipped name (``"aft"``, the
            trained AFT aggregator of the default model) or an adapter directory; the engine must
            serve adapters (``VLLMBackend(..., enable_lora=True)``). A run's
            ``AggregateContext.aggregator_lora`` overrides it.
        seed: Base seed: every call gets a seed derived from it, so runs are reproducible.
        select: How the final answer is chosen from the last layer: ``last`` (first text of the last
            layer), ``majority`` (majority vote over extracted answers), ``reward`` (highest score
            of the reward function given to ``build_graph``), ``confidence`` (vote weighted by each
            text's confidence from the engine's token log-probabilities, see
            ``aft_graph.selection``), ``usc`` (universal self-consistency: one more call in which
            the model names the most consistent text; for answers no extractor can vote on) or
            ``behaviour`` (code: run the candidate programs on the examples the question states
            and vote by what they do, see ``aft_graph.code_behaviour``).
        answer_format: How answers are extracted for voting (see ``aft_graph.answers``).
        template: Aggregation prompt; ``None`` picks the strategy's default (AFT, RSA or refine).
        proposal_system: Optional system message for proposals.
        proposal_token_budget: Cap on tokens per proposal inside an aggregation prompt; the graph
            also shrinks it so that the prompt fits the context window. Cuts are reported.
        single_final_aggregation: Sample one aggregation (not K) in the last AFT layer.
        max_retries: Attempts per generation call on a transient backend error
            (``BackendUnavailableError``); after the last one the call counts as failed.
        retry_backoff_s: Wait before the first retry of a transient failure; it doubles per
            attempt (LangGraph ``RetryPolicy``, with jitter, at most 128 s). Raise it with
            ``max_retries`` to ride out a server restart (about a minute for ``vllm serve``).
        call_timeout_s: Seconds one generation call may take (queueing in the engine included);
            a call past it is cancelled, which aborts the request in the engine, and counts as a
            failed call. The default, 30 minutes, only catches a hung engine: a loaded CPU
            engine can take minutes per call. ``None`` disables it.
        run_timeout_s: Deadline of one invocation of the graph (``ainvoke``/``astream``; a resume
            is a new invocation with a fresh deadline). Calls still running at the deadline are
            cancelled like timed-out calls, so the run stops with a :class:`LayerFailedError`
            naming the layer. ``None`` (default): no deadline.
        min_survivors: Successful calls a layer needs to go on (capped at the calls the layer
            makes). Below it the failed calls get one more try each, and if one fails again the
            run stops with a :class:`LayerFailedError` naming layer, calls and causes; with a
            checkpointer the thread resumes from there.
        early_exit: Consensus early exit: after any layer but the last, if at least ``agreement``
            of its texts state the same answer, finalize without the remaining layers (agreement
            among the proposals means no aggregation call at all). The layer event and ``usage``
            report the calls saved.
        agreement: Fraction of a layer's texts that must agree for ``early_exit`` (1.0: all).
        adaptive_width: Sample the initial proposals in waves (``first_wave``, then ``wave_step``
            more at a time, up to K or N) and stop once Adaptive-Consistency's rule is sure of the
            majority answer (``stop_rule``, ``stop_confidence``): an easy question costs a few
            calls, a hard one K.
        first_wave: Proposals in the first wave.
        wave_step: Proposals per later wave; ``None`` doubles what was sampled (2, 2, 4, ...).
        stop_rule: ``beta`` (leader vs runner-up) or ``dirichlet`` (leader vs all answers).
        stop_confidence: Probability the rule must reach to stop (0.95 in the paper).
        confidence: How a text's confidence is computed from its token log-probabilities:
            ``mean``, ``lowest_group`` or ``tail`` (``aft_graph.selection.trace_confidence``).
        confidence_window: Tokens per group for ``lowest_group`` / ``tail``.
        keep_confident: Keep only this fraction of each layer's texts, the most confident ones,
            before they are aggregated or voted on (DeepConf's filtering); ``None`` keeps all.
        code_checks: Run each candidate program on the examples the question states before
            aggregating, and tell the aggregator which candidates pass them and which behave
            alike (code questions; other questions are left alone).
        proposed_inputs: For ``select="behaviour"`` / ``code_checks``: ask the model (one extra
            call per question) for this many test inputs, run every candidate on them too and
            group candidates by their outputs; 0 uses the stated examples only.

    Integer and boolean fields take ints and bools only (``proposals="4"`` or ``True`` is refused
    rather than coerced).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Strategy = "propose_aggregate"
    proposals: int = Field(4, ge=1, strict=True, description="K: proposals per question.")
    layers: int = Field(1, ge=0, strict=True, description="L: aggregation layers / refinement rounds.")
    population: int = Field(8, ge=1, strict=True, description="N: RSA population size.")
    subset_size: int = Field(4, ge=1, strict=True, description="K: members each RSA aggregation reads.")
    steps: int = Field(2, ge=0, strict=True, description="T: RSA aggregation steps.")
    proposer: SamplingConfig = SamplingConfig()
    aggregator: SamplingConfig = SamplingConfig()
    aggregator_lora: str | None = Field(None, min_length=1)
    seed: int | None = Field(0, strict=True)
    select: Selection | None = None
    answer_format: AnswerFormat = "auto"
    template: PromptTemplate | None = None
    proposal_system: str | None = None
    proposal_token_budget: int | None = Field(None, ge=16, strict=True)
    single_final_aggregation: bool = Field(False, strict=True)
    max_retries: int = Field(3, ge=1, strict=True)
    retry_backoff_s: float = Field(0.5, ge=0)
    call_timeout_s: float | None = Field(1800.0, gt=0)
    run_timeout_s: float | None = Field(None, gt=0)
    min_survivors: int = Field(1, ge=1, strict=True)
    early_exit: bool = Field(False, strict=True)
    agreement: float = Field(1.0, gt=0.5, le=1.0, description="Fraction that must agree.")
    adaptive_width: bool = Field(False, strict=True)
    first_wave: int = Field(2, ge=1, strict=True)
    wave_step: int | None = Field(None, ge=1, strict=True)
    stop_rule: StopRule = "beta"
    stop_confidence: float = Field(0.95, gt=0.0, lt=1.0)
    confidence: ConfidenceMethod = "mean"
    confidence_window: int = Field(32, ge=1, strict=True)
    keep_confident: float | None = Field(None, gt=0.0, le=1.0)
    code_checks: bool = Field(False, strict=True)
    proposed_inputs: int = Field(0, ge=0, le=20, strict=True)

    @model_validator(mode="after")
    def _consistent(self) -> AggregateConfig:
        if self.strategy == "rsa" and self.subset_size > self.population:
            raise ValueError(
                f"subset_size ({self.subset_size}) is larger than population ({self.population}): "
                "each RSA aggregation reads subset_size distinct members, so set "
                "subset_size <= population"
            )
        if self.strategy == "best_of_n" and self.resolved_select != "reward":
            raise ValueError("best_of_n selects by reward: leave select unset or set select='reward'")
        if self.early_exit and self.depth == 0:
            raise ValueError(
                f"early_exit stops before aggregation layers, and strategy {self.strategy!r} with "
                f"these sizes has none: use adaptive_width=True to sample fewer proposals instead"
            )
        if self.early_exit and self.strategy == "self_refine":
            raise ValueError(
                "early_exit stops when several texts of a layer agree, and self_refine has one per "
                "layer: use it with propose_aggregate or rsa"
            )
        if self.adaptive_width:
            if self.strategy in ("self_refine", "best_of_n"):
                raise ValueError(
                    f"adaptive_width stops sampling once the answers agree, which {self.strategy} "
                    "does not use: use it with self_consistency, propose_aggregate or rsa"
                )
            if self.first_wave > self.initial_count:
                raise ValueError(
                    f"first_wave ({self.first_wave}) is larger than the {self.initial_count} initial "
                    "samples: set first_wave <= proposals (population for rsa)"
                )
        if self.keep_confident is not None and self.strategy == "self_refine":
            raise ValueError(
                "keep_confident drops the least confident of several texts, and self_refine has "
                "one: use it with propose_aggregate, rsa or self_consistency"
            )
        if self.proposed_inputs and not (self.code_checks or self.resolved_select == "behaviour"):
            raise ValueError(
                "proposed_inputs are used by behaviour checks only: set select='behaviour' or "
                "code_checks=True, or leave proposed_inputs=0"
            )
        if self.code_checks and self.depth == 0:
            raise ValueError(
                "code_checks tell the aggregator which candidates pass the stated examples, and "
                f"strategy {self.strategy!r} has no aggregation: use select='behaviour' instead"
            )
        return self

    @property
    def needs_logprobs(self) -> bool:
        """Whether the run needs token log-probabilities from the engine."""
        return self.resolved_select == "confidence" or self.keep_confident is not None

    @property
    def checks_code(self) -> bool:
        """Whether candidate programs are run (behaviour selection or checks for the aggregator)."""
        return self.code_checks or self.resolved_select == "behaviour"

    @property
    def resolved_select(self) -> str:
        """The selection rule, defaulting per strategy."""
        if self.select is not None:
            return self.select
        return {
            "self_consistency": "majority",
            "best_of_n": "reward",
            "rsa": "majority",
        }.get(self.strategy, "last")

    @property
    def initial_count(self) -> int:
        """Texts sampled in layer 0."""
        return {"rsa": self.population, "self_refine": 1}.get(self.strategy, self.proposals)

    @property
    def depth(self) -> int:
        """Number of aggregation layers after the proposals."""
        if self.strategy == "rsa":
            return self.steps
        if self.strategy in ("self_consistency", "best_of_n"):
            return 0
        return self.layers

    @property
    def resolved_template(self) -> PromptTemplate:
        from .prompts import TEMPLATES

        if self.template is not None:
            return self.template
        return TEMPLATES[{"rsa": "rsa", "self_refine": "refine"}.get(self.strategy, "aft")]
