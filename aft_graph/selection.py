"""Picking the final answer beyond a plain vote: by the engine's confidence, or by the model itself.

- **Confidence** (the DeepConf idea: Fu, Wang, Tian, Zhao: "Deep Think with Confidence",
  https://arxiv.org/abs/2508.15260). Each text gets a confidence from the log-probabilities of its
  own tokens (:func:`trace_confidence`); :func:`confidence_vote` weighs every vote by it and
  :func:`keep_most_confident` drops the least confident texts before they are voted on or
  aggregated. DeepConf scores a token by the mean log-probability of the *top-k candidates*; the
  backends here return the log-probability of the *sampled* token (what every engine gives
  cheaply), so a text's confidence is the mean (or the worst window, or the tail) of those.
- **Universal self-consistency** (Chen et al.: "Universal Self-Consistency for Large Language Model
  Generation", https://arxiv.org/abs/2311.17311): for answers no extractor can vote on, the model
  reads all responses and names the most consistent one (:func:`usc_messages`,
  :func:`parse_usc_choice`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .answers import answers_match

__all__ = [
    "ConfidenceMethod",
    "USC_PROMPT",
    "WeightedVote",
    "confidence_vote",
    "keep_most_confident",
    "parse_usc_choice",
    "trace_confidence",
    "usc_messages",
]

ConfidenceMethod = Literal["mean", "lowest_group", "tail"]

Message = dict[str, str]


def trace_confidence(
    token_logprobs: Sequence[float], method: ConfidenceMethod = "mean", *, window: int = 32
) -> float:
    """A text's confidence from its tokens' log-probabilities (higher = surer; at most 0).

    Args:
        token_logprobs: Log-probability of each generated token.
        method: ``mean`` (mean over all tokens: minus the per-token negative log-likelihood),
            ``lowest_group`` (the lowest mean over any ``window`` consecutive tokens: DeepConf's
            "lowest group confidence", which catches one confused stretch in a long text) or
            ``tail`` (the mean over the last ``window`` tokens, where the answer is stated).
        window: Tokens per group for ``lowest_group`` and ``tail``.

    Returns:
        The confidence, a mean log-probability; ``-inf`` for a text with no tokens.
    """
    values = [float(v) for v in token_logprobs]
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not values:
        return -math.inf
    if method == "mean":
        return sum(values) / len(values)
    if method == "tail":
        tail = values[-window:]
        return sum(tail) / len(tail)
    if method == "lowest_group":
        if len(values) <= window:
            return sum(values) / len(values)
        run = sum(values[:window])
        lowest = run
        for i in range(window, len(values)):
            run += values[i] - values[i - window]
            lowest = min(lowest, run)
        return lowest / window
    raise ValueError(f"unknown confidence method {method!r}: use mean, lowest_group or tail")


@dataclass(frozen=True)
class WeightedVote:
    """The outcome of a confidence-weighted vote.

    Attributes:
        answer: The winning answer (``None`` if no text stated one).
        index: The most confident text of the winning group (its representative).
        weight: The winning group's summed weight.
        total_weight: Summed weight of every text that stated an answer.
        count: Texts in the winning group.
        total: Texts that stated an answer.
    """

    answer: str | None
    index: int | None
    weight: float
    total_weight: float
    count: int
    total: int


def confidence_vote(answers: Sequence[str | None], confidences: Sequence[float]) -> WeightedVote:
    """Vote with each answer weighted by ``exp(confidence)`` (its geometric-mean token probability).

    Equivalent answers are grouped as in :func:`aft_graph.answers.majority_vote`; the group with the
    largest summed weight wins (ties: the group seen first).

    Args:
        answers: Extracted answers (``None``: the text stated none and does not vote).
        confidences: One confidence per text, from :func:`trace_confidence` (a mean log-probability).

    Raises:
        ValueError: Lengths differ, or a confidence is missing (``None``/NaN).
    """
    if len(answers) != len(confidences):
        raise ValueError(f"{len(answers)} answers but {len(confidences)} confidences")
    weights = []
    for i, c in enumerate(confidences):
        if c is None or (isinstance(c, float) and math.isnan(c)):
            raise ValueError(
                f"text {i} has no confidence: the engine returned no log-probabilities for it "
                "(request them with Sampling(logprobs=True) on an engine that has them)"
            )
        weights.append(math.exp(c))
    groups: list[list[int]] = []
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        for group in groups:
            if answers_match(answers[group[0]], ans):
                group.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return WeightedVote(None, None, 0.0, 0.0, 0, 0)
    sums = [sum(weights[i] for i in g) for g in groups]
    best = max(range(len(groups)), key=sums.__getitem__)  # max keeps the first of equal sums
    group = groups[best]
    representative = max(group, key=lambda i: confidences[i])
    return WeightedVote(
        answers[group[0]],
        representative,
        sums[best],
        sum(sums),
        len(group),
        sum(len(g) for g in groups),
    )


def keep_most_confident(confidences: Sequence[float], keep: float) -> list[int]:
    """Indices of the most confident texts, a fraction ``keep`` of them (at least one), in order.

    DeepConf's offline filtering keeps the top 10% or 90% of traces by confidence; here the
    fraction is the caller's. Ties keep the earlier text.

    Args:
        confidences: One confidence per text.
        keep: Fraction to keep, in (0, 1].

    Returns:
        The kept indices in ascending order.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} must be in (0, 1]")
    n = len(confidences)
    if n == 0:
        return []
    count = max(1, math.ceil(keep * n - 1e-9))
    ranked = sorted(range(n), key=lambda i: (-confidences[i], i))
    return sorted(ranked[:count])


USC_PROMPT = (
    "I have generated the following responses to the question: {question}\n\n{responses}\n\n"
    "Evaluate these responses.\nSelect the most consistent response based on majority consensus.\n"
    'Start your answer with "The most consistent response is Response X" (without quotes).'
)
"""Universal self-consistency's selection prompt (the paper's wording; responses numbered from 1)."""


def usc_messages(question: str, responses: Sequence[str]) -> list[Message]:
    """Chat messages asking the model to pick the most consistent of ``responses``.

    Responses are numbered from 1 (the paper numbers from 0; small models name "Response 1" for the
    first more reliably). Fit each response to the context window before calling this.
    """
    if not responses:
        raise ValueError("universal self-consistency needs at least one response")
    listed = "\n\n".join(f"Response {i}: {text.strip()}" for i, text in enumerate(responses, 1))
    content = USC_PROMPT.replace("{responses}", listed).replace("{question}", question.strip())
    return [{"role": "user", "content": content}]


_USC_PICK = re.compile(r"most\s+consistent\s+response\s+is\s*:?\s*(?:response\s*)?#?\s*(\d+)", re.I)
_ANY_RESPONSE = re.compile(r"response\s*#?\s*(\d+)", re.I)


def parse_usc_choice(text: str, n: int) -> int | None:
    """The 0-based index of the response the model picked, or ``None`` if it named none in range.

    Reads "The most consistent response is Response X" first, then the first "Response X"
    anywhere (models often rephrase).
    """
    for pattern in (_USC_PICK, _ANY_RESPONSE):
        for match in pattern.finditer(text):
            number = int(match.group(1))
            if 1 <= number <= n:
                return number - 1
    return None
