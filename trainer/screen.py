"""Which task families give aggregation something to decide? Measure the model on each first.

AFT learns nothing from queries the model always gets right (every proposal agrees: a vote already
wins) or never gets right (no proposal to build on). The screen samples ``samples`` on-policy
proposals for a few queries of every candidate family and reports per-sample accuracy, majority
accuracy, pass@k and how often the proposals disagree; :func:`pick_families` keeps the families
inside an accuracy band (the AFT issue asks for roughly 10-90% right per sample).

Queries are generated like the recipe's (:func:`trainer.tasks.generate_tasks`), with their own seed,
excluding every evaluation suite's questions, and proven disjoint from them. Resumable: tasks
already sampled are skipped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from aft_graph.answers import extract_answer
from aft_graph.backends.base import Backend
from aft_graph.tasks import TaskSpec, Verifier, assert_disjoint, evaluation_suites

from .records import JsonlWriter, ProposalRecord, TaskRecord, read_records
from .stages import proposals as sample_stage
from .tasks import generate_tasks

__all__ = ["FamilyStats", "family_stats", "pick_families", "screen_families"]


@dataclass(frozen=True)
class FamilyStats:
    """How the model does on one task family (from ``queries`` x ``samples`` proposals)."""

    family: str
    queries: int
    per_sample: float
    majority: float
    pass_at_k: float
    disagreeing: float

    def row(self) -> str:
        return (
            f"| {self.family} | {self.queries} | {self.per_sample:.2f} | {self.majority:.2f} | "
            f"{self.pass_at_k:.2f} | {self.disagreeing:.2f} |"
        )


def family_stats(records: Sequence[ProposalRecord], verifier: Verifier) -> list[FamilyStats]:
    """Per-family accuracy and disagreement of sampled proposals."""
    by_family: dict[str, list[ProposalRecord]] = defaultdict(list)
    for record in records:
        by_family[record.task or "?"].append(record)
    out = []
    for family, rows in sorted(by_family.items()):
        samples = right = majority = any_right = disagree = 0
        for record in rows:
            scores = [verifier.score(record, p.text) for p in record.proposals]
            answers = [extract_answer(p.text, "auto") for p in record.proposals]
            samples += len(scores)
            right += sum(s >= 1.0 for s in scores)
            any_right += any(s >= 1.0 for s in scores)
            disagree += len({a for a in answers}) > 1
            counts: dict[str | None, int] = defaultdict(int)
            for a in answers:
                counts[a] += 1
            top = max(counts, key=lambda a: (counts[a], a is not None))
            winner = next(p for p, a in zip(record.proposals, answers, strict=True) if a == top)
            majority += top is not None and verifier.score(record, winner.text) >= 1.0
        n = len(rows)
        out.append(
            FamilyStats(
                family, n, right / max(samples, 1), majority / n, any_right / n, disagree / n
            )
        )
    return out


def pick_families(
    stats: Sequence[FamilyStats], low: float = 0.1, high: float = 0.9
) -> list[FamilyStats]:
    """The families whose per-sample accuracy lies in ``[low, high]``."""
    return [s for s in stats if low <= s.per_sample <= high]


async def screen_families(
    backend: Backend,
    mix: Sequence[TaskSpec],
    out_dir: str | Path,
    *,
    per_family: int = 8,
    samples: int = 4,
    max_tokens: int = 384,
    seed: int = 20_000,
    answer_format: str = "think",
) -> list[FamilyStats]:
    """Sample proposals for ``per_family`` queries of each family and measure them.

    Writes ``screen_tasks.jsonl``, ``screen_proposals.jsonl`` and ``screen.md`` into ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks_path = out / "screen_tasks.jsonl"
    if tasks_path.is_file():
        tasks = list(read_records(tasks_path, TaskRecord))
    else:
        evaluation = [t for s in evaluation_suites() for t in s]
        tasks = []
        for i, spec in enumerate(mix):
            tasks += generate_tasks(
                [spec], per_family, seed=seed + 101 * i, answer_format=answer_format,
                exclude=[t.question for t in evaluation], prefix="screen-",
            )  # fmt: skip
        assert_disjoint(tasks, evaluation, names=("screen", "evaluation suites"))
        with JsonlWriter(tasks_path, overwrite=True) as w:
            w.write_all(tasks)
    proposals_path = out / "screen_proposals.jsonl"
    await sample_stage(backend, tasks, proposals_path, samples=samples, max_tokens=max_tokens)
    stats = family_stats(list(read_records(proposals_path, ProposalRecord)), Verifier("auto"))
    lines = [
        "| family | queries | per-sample acc | majority acc | pass@k | disagreeing |",
        "|---|---|---|---|---|---|",
        *(s.row() for s in stats),
    ]
    (out / "screen.md").write_text("\n".join(lines) + "\n")
    (out / "screen.json").write_text(json.dumps([asdict(s) for s in stats], indent=2) + "\n")
    return stats
