"""What a verifiable task is: :class:`Task`, :class:`Suite`, :class:`TaskSpec` and the answer-format
instructions appended to questions.

Every other module of :mod:`aft_graph.tasks` (loading, scoring, the disjointness check) and the
trainer's records work on these types; the trainer's ``TaskRecord`` converts itself with
``to_task()`` (see :class:`SupportsTask`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ANSWER_INSTRUCTIONS",
    "CODE_INSTRUCTION",
    "MATH_ANSWER_INSTRUCTION",
    "RG_ANSWER_INSTRUCTION",
    "Checker",
    "Suite",
    "SupportsTask",
    "Task",
    "TaskSpec",
    "as_task",
    "bare_question",
]

Checker = Literal["math", "exact", "contains"]

RG_ANSWER_INSTRUCTION = (
    "Think step by step, then give only the final answer inside <answer></answer> tags, "
    "for example <answer>...</answer>."
)
"""Appended to reasoning-gym questions of the evaluation suites."""

MATH_ANSWER_INSTRUCTION = "Reason step by step and put the final answer in \\boxed{}."
CODE_INSTRUCTION = (
    "Complete the following Python function. Write the complete function (with any imports it "
    "needs) in a single ```python code block."
)

ANSWER_INSTRUCTIONS: dict[str, str] = {
    "tag": "Give the final answer inside <answer></answer> tags.",
    # The evaluation suites' instruction: training queries asked the same way as held-out ones.
    "think": RG_ANSWER_INSTRUCTION,
    "boxed": "Put the final answer inside \\boxed{}.",
    "none": "",
}
"""Short answer-format instructions by name (the trainer's ``answer_format``)."""

_INSTRUCTIONS = sorted(
    {RG_ANSWER_INSTRUCTION, MATH_ANSWER_INSTRUCTION, *filter(None, ANSWER_INSTRUCTIONS.values())},
    key=len,
    reverse=True,
)


@dataclass(frozen=True)
class Task:
    """One question with what is needed to score a response to it.

    Attributes:
        id: Stable identifier (unique within a suite; used to resume evaluations).
        question: The prompt given to the model (answer-format instructions included).
        reference: The reference answer or solution (informative; scoring may use metadata too).
        metadata: Suite-specific data (tests, the reasoning-gym ``dataset``/``config``/``entry`` and
            the generator's ``item_seed``, the checker, ...).
        kind: Which scorer grades it: ``humaneval``, ``reasoning_gym``, ``math``, ``exact`` or
            ``contains``.
    """

    id: str
    question: str
    reference: str
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = "exact"


@runtime_checkable
class SupportsTask(Protocol):
    """Anything that can turn itself into a :class:`Task` (the trainer's ``TaskRecord``)."""

    def to_task(self) -> Task: ...


def as_task(task: Task | SupportsTask) -> Task:
    """``task`` itself, or what its ``to_task()`` gives."""
    if isinstance(task, Task):
        return task
    if isinstance(task, SupportsTask):
        return task.to_task()
    raise TypeError(f"expected a Task or an object with to_task(), got {type(task).__name__}")


def bare_question(text: str) -> str:
    """The question without a known answer-format instruction, whitespace collapsed.

    Two tasks ask the same thing when their bare questions are equal, whichever instruction each
    suite appended (used by :func:`~aft_graph.tasks.assert_disjoint`).
    """
    text = text.strip()
    for instruction in _INSTRUCTIONS:
        if text.endswith(instruction):
            text = text[: -len(instruction)]
            break
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class Suite:
    """A named list of tasks that score themselves.

    Attributes:
        name: The suite name it was loaded with (``rg-mix:easy_arithmetic``, ``humaneval`` ...).
        tasks: The tasks, in a seed-determined order.
        seed: The seed that chose them.
    """

    name: str
    tasks: list[Task]
    seed: int | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    def score(self, task: Task, text: str) -> float:
        """Score ``text`` as a response to ``task`` (1.0 = correct)."""
        from .verify import score

        return score(task, text)


class TaskSpec(BaseModel):
    """One reasoning-gym data set in a weighted task mix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="reasoning-gym data set name (reasoning_gym.factory.DATASETS).")
    weight: float = Field(1.0, gt=0, description="Share of the mix (normalized over the specs).")
    config: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the data set's config."
    )
