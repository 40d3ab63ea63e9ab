"""Verifiable queries generated offline with reasoning-gym, and the verifier that scores answers.

reasoning-gym (0.1.25) generates seeded tasks without any download, each data set with its own
``score_answer``. A question is asked with an explicit answer format (``<answer>...</answer>`` by
default) so that proposals, aggregations and the verifier agree on where the answer is.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aft_graph.answers import AnswerFormat, answers_match, extract_answer

from .records import TaskRecord

__all__ = [
    "ANSWER_INSTRUCTIONS",
    "DEFAULT_MIX",
    "TaskSpec",
    "Verifier",
    "generate_tasks",
]

ANSWER_INSTRUCTIONS: dict[str, str] = {
    "tag": "Give the final answer inside <answer></answer> tags.",
    "boxed": "Put the final answer inside \\boxed{}.",
    "none": "",
}


class TaskSpec(BaseModel):
    """One reasoning-gym data set in a task mix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="reasoning-gym data set name (reasoning_gym.factory.DATASETS).")
    weight: float = Field(1.0, gt=0, description="Share of the mix (normalized over the specs).")
    config: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the data set's config."
    )


DEFAULT_MIX: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="basic_arithmetic",
        config=dict(
            min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+",),
            allow_negation=False, allow_parentheses=False,
        ),
    ),
    TaskSpec(name="chain_sum", config=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)),
)
"""Simple arithmetic a 135M model sometimes gets right: enough signal for the CPU demo."""


def generate_tasks(
    mix: tuple[TaskSpec, ...] | list[TaskSpec] = DEFAULT_MIX,
    size: int = 32,
    *,
    seed: int = 0,
    answer_format: str = "tag",
    exclude: set[str] | None = None,
    prefix: str = "",
) -> list[TaskRecord]:
    """Generate ``size`` queries from a weighted mix of reasoning-gym data sets.

    Args:
        mix: Data sets and their configs.
        size: Number of queries.
        seed: Seed of the generators (a different seed gives a held-out set).
        answer_format: ``tag`` / ``boxed`` / ``none``: the instruction appended to each question.
        exclude: Questions to leave out, with or without the instruction (e.g. the training
            questions when making a held-out set).
        prefix: Prepended to every id (``train-``, ``eval-``).

    Raises:
        ValueError: an unknown data set name or a bad config (reasoning-gym's own message).
    """
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    for spec in mix:
        if spec.name not in DATASETS:
            raise ValueError(
                f"unknown reasoning-gym data set {spec.name!r}; known ones include "
                "basic_arithmetic, chain_sum, products, gcd, leg_counting (see "
                "reasoning_gym.factory.DATASETS)"
            )
    total = sum(s.weight for s in mix)
    counts = [int(size * s.weight / total) for s in mix]
    for i in range(size - sum(counts)):
        counts[i % len(counts)] += 1
    instruction = ANSWER_INSTRUCTIONS[answer_format]
    exclude = set(exclude or ())
    seen: set[str] = set()
    out: list[TaskRecord] = []
    for k, (spec, count) in enumerate(zip(mix, counts, strict=True)):
        if count == 0:
            continue
        # Small task spaces repeat questions: draw extra and de-duplicate.
        ds = reasoning_gym.create_dataset(spec.name, size=count * 4 + 16, seed=seed * 1009 + k, **spec.config)
        got = 0
        for i, entry in enumerate(ds):
            question = entry["question"].strip()
            full = f"{question}\n\n{instruction}" if instruction else question
            if question in seen or question in exclude or full in exclude:
                continue
            seen.add(question)
            out.append(
                TaskRecord(
                    id=f"{prefix}{spec.name}-{seed}-{i}",
                    question=full,
                    answer=str(entry["answer"]),
                    task=spec.name,
                    metadata=_jsonable(entry.get("metadata", {})),
                )
            )
            got += 1
            if got == count:
                break
    return out


def _jsonable(value: Any) -> Any:
    """Metadata as plain JSON types (reasoning-gym stores tuples, sets, numpy scalars...)."""
    import json

    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@lru_cache(maxsize=64)
def _rg_scorer(name: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


class Verifier:
    """Scores a response against a task: reasoning-gym's own ``score_answer`` or math-verify.

    The answer is extracted from the response first (``<answer>`` tags, ``\\boxed{}``, ...). Tasks
    that name a reasoning-gym data set are scored by that data set's ``score_answer`` (in [0, 1]);
    others with a reference ``answer`` by :func:`aft_graph.answers.answers_match` (1 or 0).

    Args:
        answer_format: Where the answer is in a response (see ``aft_graph.answers``).
        threshold: Minimum score for :meth:`accepts`.
        last_number: When the response has no ``<answer>`` tag and no ``\\boxed{}``, take the last
            number it states as its answer (lenient; for numeric tasks and weak models that
            rarely follow the format instruction).
    """

    name = "verifier"

    def __init__(
        self, answer_format: AnswerFormat = "auto", threshold: float = 1.0, *, last_number: bool = False
    ) -> None:
        self.answer_format = answer_format
        self.threshold = threshold
        self.last_number = last_number

    def extract(self, text: str) -> str | None:
        """The answer the verifier reads from ``text``."""
        if self.last_number:
            strict = extract_answer(text, "tag")
            if strict is None:
                strict = extract_answer(text, "boxed")
            if strict is not None:
                return strict
            numbers = _NUMBER.findall(text)
            return numbers[-1] if numbers else None
        return extract_answer(text, self.answer_format)

    def score(self, task: TaskRecord, text: str) -> float:
        """Score of ``text`` as an answer to ``task`` (0 when it states no answer)."""
        answer = self.extract(text)
        if answer is None:
            return 0.0
        if task.task is not None:
            try:
                scorer = _rg_scorer(task.task)
            except ValueError:
                scorer = None
            if scorer is not None:
                entry = {"question": task.question, "answer": task.answer, "metadata": task.metadata}
                try:
                    return float(scorer(answer, entry))
                except Exception:  # noqa: BLE001 - a scorer failing on odd text means "wrong"
                    return 0.0
        if task.answer is None:
            raise ValueError(
                f"task {task.id!r} has neither a reasoning-gym task name nor a reference answer, "
                "so the verifier cannot score it: use a reward model or a judge instead"
            )
        return 1.0 if answers_match(answer, task.answer) else 0.0

    def accepts(self, task: TaskRecord, text: str) -> bool:
        return self.score(task, text) >= self.threshold
