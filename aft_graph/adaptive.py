"""The graph's adaptive decisions in one place: waves, early exit, confidence, final selection.

:func:`~aft_graph.graph.build_graph` owns the topology; this module owns what the adaptive and
selection settings of :class:`~aft_graph.config.AggregateConfig` decide at each point of it, on
top of the pure rules in :mod:`aft_graph.consensus`, :mod:`aft_graph.selection` and
:mod:`aft_graph.code_behaviour`:

- per call: request token log-probabilities when a mode needs them, and turn them into one
  confidence per text (:meth:`AdaptivePolicy.record`);
- after each wave of proposals: sample another wave or stop (:meth:`AdaptivePolicy.next_wave`);
- after each layer: which texts go on (``keep_confident``) and whether the run stops here
  (``early_exit``), with the calls that saves (:meth:`AdaptivePolicy.close_layer`);
- before an aggregation layer, for code: notes on what each candidate does
  (:meth:`AdaptivePolicy.code_notes`);
- at the end: which text is the answer (:meth:`AdaptivePolicy.select`).

Calls outside the layers (USC's pick, the model's test inputs) go through the ``call`` function the
graph passes in, so they get the same guards (timeouts, deadline) as every other call; if one fails
the selection falls back (plain vote; stated examples only) and says so.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .answers import answers_match, extract_answer
from .backends.base import Backend, Completion, GenerationRequest, derive_seed, supports_logprobs
from .code_behaviour import (
    CodeProblem,
    abehaviour_vote,
    behaviour_notes,
    input_request_messages,
    parse_proposed_calls,
)
from .config import AggregateConfig
from .consensus import consensus, should_stop_sampling, wave_sizes
from .selection import (
    confidence_vote,
    keep_most_confident,
    parse_usc_choice,
    trace_confidence,
    usc_messages,
)
from .tasks.code import program_key

__all__ = ["AdaptivePolicy", "Call", "LayerDecision", "FinalChoice"]

Call = Callable[[GenerationRequest], Awaitable[Completion]]
"""One guarded generation call (the graph's), returning the single completion."""

_MIN_USC_BUDGET = 16  # tokens per response below which USC cannot judge anything


@dataclass(frozen=True)
class LayerDecision:
    """What happens after a layer.

    Attributes:
        kept: Indices of the texts passed on (``None``: all).
        stopped_early: Finalize now (the answers agreed).
        agreement: Fraction stating the majority answer (``None`` when early exit is off).
        choice: After an early exit, the index of the agreed answer's first text among the texts
            passed on (for ``select="last"``).
    """

    kept: list[int] | None = None
    stopped_early: bool = False
    agreement: float | None = None
    choice: int | None = None


@dataclass
class FinalChoice:
    """The final pick and how it was made.

    Attributes:
        index: Index of the chosen text.
        rule: The rule that chose it (a fallback names itself, e.g. ``majority (usc gave no pick)``).
        calls: Completions of selector calls made for it (counted in ``usage``).
        detail: Rule-specific facts (weights, behaviour groups, the model's USC reply...).
    """

    index: int
    rule: str
    calls: list[Completion] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=256)
def _code_problem(question: str) -> CodeProblem | None:
    # Parsed once per question, not per layer; bounded, since one graph serves many questions.
    return CodeProblem.from_question(question)


class AdaptivePolicy:
    """Applies one configuration's adaptive and selection settings for one backend.

    Args:
        config: The run's configuration.
        backend: The backend (token counting and truncation for USC prompts).

    Raises:
        ValueError: The configuration needs token log-probabilities the backend does not return.
    """

    def __init__(self, config: AggregateConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        if config.needs_logprobs and not supports_logprobs(backend):
            modes = [
                m
                for m, on in (
                    ("select='confidence'", config.resolved_select == "confidence"),
                    ("keep_confident", config.keep_confident is not None),
                )
                if on
            ]
            raise ValueError(
                f"{' and '.join(modes)} need token log-probabilities, which "
                f"{type(backend).__name__} does not return: use VLLMBackend, HFBackend or "
                "OpenAIBackend (a server with logprobs, e.g. vllm serve), or select='majority' / "
                "'usc' without keep_confident"
            )

    # ------------------------------------------------------------------ calls

    @property
    def logprobs(self) -> bool:
        """Whether every call asks for token log-probabilities."""
        return self.config.needs_logprobs

    def record(self, completion: Completion) -> dict[str, Any]:
        """A completion as a layer record: token log-probabilities folded into one confidence."""
        data = completion.model_dump(exclude={"token_logprobs"})
        if completion.token_logprobs is not None:
            data["confidence"] = trace_confidence(
                completion.token_logprobs, self.config.confidence, window=self.config.confidence_window
            )
        return data

    # ------------------------------------------------------------------ waves

    def first_wave(self) -> int:
        """Proposals in the first wave (all of them without adaptive width)."""
        total = self.config.initial_count
        if not self.config.adaptive_width:
            return total
        return wave_sizes(total, self.config.first_wave, self.config.wave_step)[0]

    def next_wave(self, answers: Sequence[str | None], sampled: int) -> tuple[int, float | None]:
        """How many more proposals to sample after ``sampled`` (0: stop), and the rule's probability.

        Args:
            answers: Answers of the successful proposals so far (failed calls are no votes).
            sampled: Proposal calls made so far (failed ones included: they were paid for).
        """
        total = self.config.initial_count
        if not self.config.adaptive_width:
            return 0, None
        decision = should_stop_sampling(
            answers, confidence=self.config.stop_confidence, rule=self.config.stop_rule
        )
        if decision.stop or sampled >= total:
            return 0, decision.probability
        done = 0
        for size in wave_sizes(total, self.config.first_wave, self.config.wave_step):
            if done >= sampled:
                return size, decision.probability
            done += size
        return 0, decision.probability  # pragma: no cover - sampled < total always finds a wave

    def waves_of(self, sampled: int) -> list[int]:
        """The wave sizes that add up to ``sampled`` proposals."""
        if not self.config.adaptive_width:
            return []
        sizes, done = [], 0
        for size in wave_sizes(self.config.initial_count, self.config.first_wave, self.config.wave_step):
            if done >= sampled:
                break
            sizes.append(size)
            done += size
        return sizes

    # ------------------------------------------------------------------ layers

    def close_layer(
        self,
        layer: int,
        depth: int,
        answers: Sequence[str | None],
        confidences: Sequence[float | None] | None,
    ) -> LayerDecision:
        """Which texts go on, and whether the run stops after ``layer``.

        Early exit is judged on every text of the layer (the dropped ones too: they were
        generated, and a confident minority must not pass for agreement).
        """
        kept = None
        if self.config.keep_confident is not None:
            kept = keep_most_confident(self._confidences(confidences, len(answers)), self.config.keep_confident)
        if not self.config.early_exit or layer >= depth:
            return LayerDecision(kept=kept)
        c = consensus(answers, self.config.agreement)
        choice = c.index
        if c.agreed and kept is not None:
            # The representative must be a text that goes on: the first kept one agreeing.
            agreeing = [j for j, i in enumerate(kept) if answers_match(answers[i], c.answer)]
            choice = agreeing[0] if agreeing else 0
        return LayerDecision(kept=kept, stopped_early=c.agreed, agreement=c.fraction, choice=choice)

    @staticmethod
    def _confidences(confidences: Sequence[float | None] | None, n: int) -> list[float]:
        if confidences is None or len(confidences) != n or any(c is None for c in confidences):
            raise ValueError(
                "the engine returned no token log-probabilities for some texts, which "
                "select='confidence' and keep_confident need: use a backend and server that "
                "return them (VLLMBackend, HFBackend, vllm serve)"
            )
        return [float(c) for c in confidences]  # type: ignore[arg-type]

    # ------------------------------------------------------------------ answers

    def answers(self, question: str, texts: Sequence[str]) -> list[str | None]:
        """The answer of each text, as votes, consensus and early exit compare them.

        For a code question (the question holds a function stub) with ``answer_format="auto"``,
        a text's answer is its program with comments and blank lines removed: identical programs
        agree, and text that merely ends alike (a closing fence, a print line) does not. Otherwise
        :func:`aft_graph.answers.extract_answer` in ``config.answer_format``.
        """
        if self.config.answer_format == "auto":
            problem = _code_problem(question)
            if problem is not None:
                return [program_key(t, problem.entry_point) for t in texts]
        return [extract_answer(t, self.config.answer_format) for t in texts]

    # ------------------------------------------------------------------ code

    async def test_inputs(self, question: str, call: Call) -> tuple[list[str], Completion | None]:
        """The model's test calls for a code question (``proposed_inputs``), and the call made."""
        problem = CodeProblem.from_question(question)
        if problem is None or not self.config.proposed_inputs:
            return [], None
        request = GenerationRequest(
            messages=tuple(input_request_messages(problem, self.config.proposed_inputs)),
            sampling=self.config.proposer.to_sampling(derive_seed(self.config.seed, "test-inputs")),
        )
        try:
            completion = await call(request)
        except Exception:  # noqa: BLE001 - a failed selector call: vote on the stated examples
            return [], None
        calls = parse_proposed_calls(
            completion.text, problem.entry_point, limit=self.config.proposed_inputs
        )
        return calls, completion

    async def code_notes(
        self, question: str, texts: Sequence[str], calls: Sequence[str]
    ) -> list[str] | None:
        """Per text, what running it showed (``None`` if the question holds no function)."""
        problem = CodeProblem.from_question(question)
        if problem is None:
            return None
        vote = await abehaviour_vote(problem, texts, calls)
        return behaviour_notes(vote)

    # ------------------------------------------------------------------ final selection

    async def select(
        self,
        question: str,
        texts: Sequence[str],
        answers: Sequence[str | None],
        confidences: Sequence[float | None] | None,
        *,
        call: Call,
        reward_fn: Callable[[str, str], Any] | None = None,
        test_calls: Sequence[str] = (),
        early_choice: int | None = None,
    ) -> FinalChoice:
        """Pick the final text by ``config.resolved_select``.

        Args:
            question: The question.
            texts: The texts to choose from (the last layer's, after ``keep_confident``).
            answers: Their extracted answers.
            confidences: Their confidences (when log-probabilities were asked for).
            call: The graph's guarded call, for USC's pick.
            reward_fn: For ``reward``.
            test_calls: Model-proposed inputs for ``behaviour``.
            early_choice: The agreed answer's text after an early exit, used by ``last``.
        """
        from .answers import majority_vote

        rule = self.config.resolved_select

        def majority(reason: str | None = None) -> FinalChoice:
            vote = majority_vote(answers)
            index = vote.index if vote.index is not None else 0
            label = "majority" if reason is None else f"majority ({reason})"
            return FinalChoice(index, label, detail={"votes": vote.count, "voters": vote.total})

        if rule == "last":
            return FinalChoice(early_choice if early_choice is not None else 0, "last")
        if rule == "majority":
            return majority()
        if rule == "reward":
            assert reward_fn is not None  # build_graph refuses select='reward' without it
            scores = []
            for text in texts:
                score = reward_fn(question, text)
                scores.append(await score if inspect.isawaitable(score) else score)
            return FinalChoice(max(range(len(texts)), key=scores.__getitem__), "reward", detail={"scores": scores})
        if rule == "confidence":
            vote = confidence_vote(answers, self._confidences(confidences, len(texts)))
            if vote.index is None:
                return majority("no text stated an answer")
            return FinalChoice(
                vote.index,
                "confidence",
                detail={"weight": round(vote.weight, 6), "total_weight": round(vote.total_weight, 6)},
            )
        if rule == "usc":
            return await self._usc(question, texts, call, majority)
        if rule == "behaviour":
            problem = CodeProblem.from_question(question)
            if problem is None:
                return majority("the question holds no function to run")
            vote = await abehaviour_vote(problem, texts, test_calls)
            if vote.index is None:
                return majority("no candidate program runs")
            return FinalChoice(
                vote.index,
                "behaviour",
                detail={
                    "groups": vote.groups,
                    "passing": vote.passing,
                    "examples": vote.examples,
                    "inputs": vote.calls,
                },
            )
        raise ValueError(f"unknown selection rule {rule!r}")  # pragma: no cover - config validates

    async def _usc(
        self, question: str, texts: Sequence[str], call: Call, majority: Callable[[str], FinalChoice]
    ) -> FinalChoice:
        if len(texts) == 1:
            return FinalChoice(0, "usc (one text)")
        backend, n = self.backend, len(texts)
        # Greedy: the pick is a judgement, not a sample.
        sampling = self.config.aggregator.model_copy(update={"temperature": 0.0})
        empty = GenerationRequest(messages=tuple(usc_messages(question, [""] * n)), sampling=sampling.to_sampling(None))
        room = backend.context_window - backend.count_prompt_tokens(empty) - sampling.max_tokens - 8 * n
        budget = room // n
        if budget < _MIN_USC_BUDGET:
            return majority(f"a USC prompt over {n} responses does not fit the context window")
        fitted = [backend.truncate(t, budget) for t in texts]
        request = GenerationRequest(
            messages=tuple(usc_messages(question, fitted)),
            sampling=sampling.to_sampling(derive_seed(self.config.seed, "usc")),
        )
        try:
            completion = await call(request)
        except Exception as exc:  # noqa: BLE001 - a failed selector call leaves the plain vote
            return majority(f"the usc call failed: {exc}"[:200])
        pick = parse_usc_choice(completion.text, n)
        if pick is None:
            selection = majority("usc gave no pick")
            selection.calls.append(completion)
            selection.detail["usc_reply"] = completion.text[:300]
            return selection
        return FinalChoice(pick, "usc", calls=[completion], detail={"usc_reply": completion.text[:300]})
