"""When is the population sure enough to stop? Consensus early exit and adaptive width.

Two pure decisions, taken on the answers extracted from a layer's texts (compared with the
project's equivalence, :func:`aft_graph.answers.answers_match`: math-verify for math, normalized
text otherwise):

- :func:`consensus` — *early exit*: if at least a fraction ``agreement`` of a layer's texts state the
  same answer, the remaining aggregation layers cannot be expected to change it, so the run may
  finalize now. Texts that state no answer count against agreement (they are not votes for it).
- :func:`should_stop_sampling` — *adaptive width*: proposals are sampled in waves
  (:func:`wave_sizes`), and after each wave a stopping rule on the answer distribution decides
  whether the majority answer is already settled. The rule is Adaptive-Consistency's
  (Aggarwal, Madaan, Yang, Mausam: "Let's Sample Step by Step: Adaptive-Consistency for Efficient
  Reasoning and Coding with LLMs", EMNLP 2023, https://arxiv.org/abs/2305.11860):

  * ``beta``: with ``v1`` and ``v2`` the votes of the two most common answers, the probability
    that the leading answer is truly the more likely of the two, under a uniform prior,
    is ``P(p > 1/2)`` for ``p ~ Beta(v1 + 1, v2 + 1)``; sampling stops once it reaches
    ``confidence`` (0.95 in the paper).
  * ``dirichlet``: the same question against *every* other answer, ``P(p_1 > max_j p_j)`` under
    ``Dirichlet(v + 1)``, estimated by a seeded Monte-Carlo draw (no closed form).

  With a uniform prior and ``confidence=0.95``, unanimous waves stop after 4 agreeing samples
  (2 agreeing: 0.875, 3: 0.9375, 4: 0.969); ``confidence=0.85`` lets 2 agreeing samples stop.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .answers import majority_vote

__all__ = [
    "Consensus",
    "StopRule",
    "StopDecision",
    "answer_counts",
    "beta_stop_probability",
    "consensus",
    "dirichlet_stop_probability",
    "should_stop_sampling",
    "wave_sizes",
]

StopRule = Literal["beta", "dirichlet"]


@dataclass(frozen=True)
class Consensus:
    """How far a layer's texts agree.

    Attributes:
        agreed: Whether at least ``agreement`` of the texts state the majority answer.
        answer: The majority answer (``None`` if no text stated one).
        index: Index of the first text giving it (the representative text).
        count: Texts stating it.
        total: Texts in the layer (those without an answer included).
        fraction: ``count / total``.
    """

    agreed: bool
    answer: str | None
    index: int | None
    count: int
    total: int
    fraction: float


def consensus(answers: Sequence[str | None], agreement: float = 1.0, *, minimum: int = 2) -> Consensus:
    """Decide whether a layer's answers agree enough to stop (consensus early exit).

    Args:
        answers: The answer extracted from each text of the layer (``None``: none stated).
        agreement: Fraction of *all* texts that must state the majority answer, in (0.5, 1];
            1.0 means unanimity.
        minimum: Fewest texts for agreement to mean anything (one text always "agrees").

    Returns:
        The :class:`Consensus`; ``agreed`` is the decision.

    Raises:
        ValueError: ``agreement`` outside (0.5, 1].
    """
    if not 0.5 < agreement <= 1.0:
        raise ValueError(
            f"agreement={agreement} must be in (0.5, 1]: a majority at least, 1.0 for unanimity"
        )
    total = len(answers)
    vote = majority_vote(answers)
    fraction = vote.count / total if total else 0.0
    # A small tolerance so that e.g. 0.8 of 5 texts (4/5 = 0.8) is not lost to rounding.
    agreed = vote.answer is not None and total >= minimum and fraction + 1e-9 >= agreement
    return Consensus(agreed, vote.answer, vote.index, vote.count, total, fraction)


def answer_counts(answers: Sequence[str | None]) -> list[int]:
    """Sizes of the groups of equivalent answers, largest first (texts without an answer left out)."""
    from .answers import group_answers

    return sorted((len(g) for g in group_answers(answers)), reverse=True)


def beta_stop_probability(v1: int, v2: int) -> float:
    """``P(p > 1/2)`` for ``p ~ Beta(v1 + 1, v2 + 1)``: how sure the leader beats the runner-up.

    Exact for integer counts: with ``a = v1 + 1``, ``b = v2 + 1``, ``m = a + b - 1``,
    ``I_{1/2}(a, b) = P(Binomial(m, 1/2) >= a)``, so ``P(p > 1/2) = P(Binomial(m, 1/2) < a)``.
    """
    if v1 < 0 or v2 < 0:
        raise ValueError(f"vote counts must be >= 0, got {v1} and {v2}")
    a, b = v1 + 1, v2 + 1
    m = a + b - 1
    return sum(math.comb(m, j) for j in range(a)) / 2**m


def dirichlet_stop_probability(counts: Sequence[int], *, draws: int = 4000, seed: int = 0) -> float:
    """``P(p_1 > max_{j>1} p_j)`` for ``p ~ Dirichlet(counts + 1)`` (Monte Carlo, seeded).

    Args:
        counts: Votes per distinct answer, the leader first.
        draws: Monte-Carlo samples (the estimate's standard error is at most 0.008 at 4000).
        seed: Seed of the draws, so the decision is reproducible.
    """
    if not counts:
        return 0.0
    if len(counts) == 1:
        # Against "any other answer", an unseen one: the two-answer Beta rule with v2 = 0.
        return beta_stop_probability(counts[0], 0)
    rng = random.Random(seed)
    wins = 0
    for _ in range(draws):
        # A Dirichlet draw is normalized Gammas; normalizing does not change which is largest.
        g = [rng.gammavariate(c + 1, 1.0) for c in counts]
        wins += g[0] > max(g[1:])
    return wins / draws


@dataclass(frozen=True)
class StopDecision:
    """The outcome of the adaptive-width stopping rule after one wave.

    Attributes:
        stop: Whether to stop sampling.
        probability: The rule's probability that the current leader is the majority answer.
        counts: Votes per distinct answer, largest first.
        sampled: Texts sampled so far.
    """

    stop: bool
    probability: float
    counts: tuple[int, ...]
    sampled: int


def should_stop_sampling(
    answers: Sequence[str | None], *, confidence: float = 0.95, rule: StopRule = "beta"
) -> StopDecision:
    """Adaptive-Consistency's stopping rule on the answers sampled so far.

    Args:
        answers: Answers extracted from every text sampled so far (``None``: none stated; such
            texts are no vote for anything).
        confidence: Stop once the rule's probability reaches this (0.95 in the paper).
        rule: ``beta`` (leader vs runner-up, exact) or ``dirichlet`` (leader vs all, Monte Carlo).

    Returns:
        The :class:`StopDecision`.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    counts = answer_counts(answers)
    if not counts:
        probability = 0.0
    elif rule == "beta":
        probability = beta_stop_probability(counts[0], counts[1] if len(counts) > 1 else 0)
    elif rule == "dirichlet":
        probability = dirichlet_stop_probability(counts)
    else:
        raise ValueError(f"unknown stopping rule {rule!r}: use 'beta' or 'dirichlet'")
    return StopDecision(probability >= confidence, probability, tuple(counts), len(answers))


def wave_sizes(total: int, first: int = 2, step: int | None = None) -> list[int]:
    """How many samples each wave draws: ``first``, then ``step`` at a time, up to ``total``.

    Args:
        total: The most samples (K).
        first: Size of the first wave.
        step: Size of each later wave; ``None`` doubles the number sampled so far each time
            (2, 2, 4, 8 ...), which bounds the number of sequential waves by log2(K).

    Returns:
        Wave sizes summing to ``total``.
    """
    if total < 1 or first < 1 or (step is not None and step < 1):
        raise ValueError(f"wave sizes need total, first and step >= 1, got {total}, {first}, {step}")
    sizes = [min(first, total)]
    while sum(sizes) < total:
        size = step if step is not None else sum(sizes)
        sizes.append(min(size, total - sum(sizes)))
    return sizes
