"""Training queries: the shared reasoning-gym generator of :mod:`aft_graph.tasks`, as
:class:`~trainer.records.TaskRecord` rows.

Tasks, their verifier and the generator live in :mod:`aft_graph.tasks`, the same code the
evaluation suites use; this module only turns generated tasks into the trainer's jsonl records and
names the CPU demo's mix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aft_graph.tasks import ANSWER_INSTRUCTIONS, TaskSpec, Verifier, reasoning_gym_tasks

from .records import TaskRecord

__all__ = ["ANSWER_INSTRUCTIONS", "DEFAULT_MIX", "TaskSpec", "Verifier", "generate_tasks"]

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
    mix: Sequence[TaskSpec] = DEFAULT_MIX,
    size: int = 32,
    *,
    seed: int = 0,
    answer_format: str = "tag",
    exclude: Iterable[str] | None = None,
    prefix: str = "",
) -> list[TaskRecord]:
    """Generate ``size`` distinct queries from a weighted mix of reasoning-gym data sets.

    Args:
        mix: Data sets and their configs.
        size: Number of queries.
        seed: Seed of the generators (keep it far from the evaluation suites' seeds; see
            :func:`aft_graph.tasks.assert_disjoint`).
        answer_format: ``tag`` / ``boxed`` / ``none``: the instruction appended to each question.
        exclude: Questions to leave out, with or without the instruction (e.g. the training
            questions when making a held-out set).
        prefix: Prepended to every id (``train-``, ``eval-``).

    Raises:
        ValueError: an unknown data set name or a bad config (reasoning-gym's own message).
    """
    tasks = reasoning_gym_tasks(
        mix, size, seed, instruction=ANSWER_INSTRUCTIONS[answer_format],
        exclude=exclude or (), unique=True, id_prefix=prefix,
    )  # fmt: skip
    return [TaskRecord.from_task(t) for t in tasks]
