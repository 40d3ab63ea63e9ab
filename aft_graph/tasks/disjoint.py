"""Proof that two task sets share nothing: no reasoning-gym generator seed, no question.

Training data must never contain an evaluation question. Comparing question texts alone misses a
question asked under another instruction, and comparing seeds alone misses equal questions from
different seeds of a small task space, so :func:`assert_disjoint` checks both.
"""

from __future__ import annotations

from collections.abc import Iterable

from .task import SupportsTask, Task, as_task, bare_question

__all__ = ["TaskOverlapError", "assert_disjoint"]


class TaskOverlapError(ValueError):
    """Two task sets that must be disjoint share seeds or questions."""


def _seeds(tasks: list[Task]) -> dict[tuple[str, int], str]:
    # reasoning-gym builds each item from (data set, seed + index) alone: equal pairs, equal items.
    return {
        (t.metadata["dataset"], int(t.metadata["item_seed"])): t.id
        for t in tasks
        if t.kind == "reasoning_gym" and t.metadata.get("item_seed") is not None
    }


def assert_disjoint(
    a: Iterable[Task | SupportsTask],
    b: Iterable[Task | SupportsTask],
    *,
    names: tuple[str, str] = ("training", "evaluation"),
) -> int:
    """Raise unless the two task sets share no reasoning-gym item seed and no question.

    Questions are compared without their answer-format instruction and with whitespace collapsed
    (:func:`~aft_graph.tasks.bare_question`); seeds as (data set, item seed) pairs.

    Args:
        a: One task set (tasks, or records with ``to_task()`` such as the trainer's).
        b: The other.
        names: What to call them in the error message.

    Returns:
        The number of tasks compared (``len(a) + len(b)``), for logs.

    Raises:
        TaskOverlapError: They share seeds or questions; the message gives counts and examples.
    """
    ta, tb = [as_task(t) for t in a], [as_task(t) for t in b]
    seeds_a, seeds_b = _seeds(ta), _seeds(tb)
    shared_seeds = sorted(set(seeds_a) & set(seeds_b))
    questions_a = {bare_question(t.question): t.id for t in ta}
    questions_b = {bare_question(t.question): t.id for t in tb}
    shared_questions = sorted(set(questions_a) & set(questions_b))
    if shared_seeds or shared_questions:
        problems = []
        if shared_seeds:
            ds, seed = shared_seeds[0]
            problems.append(
                f"{len(shared_seeds)} reasoning-gym item seeds (e.g. {ds} seed {seed}: "
                f"{seeds_a[(ds, seed)]} and {seeds_b[(ds, seed)]})"
            )
        if shared_questions:
            q = shared_questions[0]
            problems.append(
                f"{len(shared_questions)} questions (e.g. {questions_a[q]} and {questions_b[q]}: "
                f"{q[:80]!r})"
            )
        raise TaskOverlapError(
            f"the {names[0]} and {names[1]} tasks share {' and '.join(problems)}: generate the "
            f"{names[0]} tasks from a seed range far from the {names[1]} seeds and exclude the "
            f"{names[1]} questions (reasoning_gym_tasks(..., exclude=...))"
        )
    return len(ta) + len(tb)
