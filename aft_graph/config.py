"""Validated configuration of a propose-and-aggregate run (pydantic).

Every bad setting fails here, before any generation, with a message that names the fix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .answers import AnswerFormat
from .backends.base import Sampling
from .prompts import PromptTemplate

__all__ = ["STRATEGIES", "AggregateConfig", "SamplingConfig", "Strategy"]

Strategy = Literal["propose_aggregate", "rsa", "self_consistency", "best_of_n", "self_refine"]
STRATEGIES: tuple[str, ...] = Strategy.__args__  # type: ignore[attr-defined]


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

    def to_sampling(self, seed: int | None, n: int = 1) -> Sampling:
        return Sampling(
            n=n,
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
        seed: Base seed: every call gets a seed derived from it, so runs are reproducible.
        select: How the final answer is chosen from the last layer: ``last`` (first text of the last
            layer), ``majority`` (majority vote over extracted answers) or ``reward`` (highest score
            of the reward function given to ``build_graph``).
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
    seed: int | None = Field(0, strict=True)
    select: Literal["last", "majority", "reward"] | None = None
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
        return self

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
