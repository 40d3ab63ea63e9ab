"""Data records of the AFT recipe (pydantic) and resumable jsonl input/output.

Every stage reads and writes jsonl, one record a line, so a job can be sharded, inspected with
``head``, and resumed: a writer opened on an existing file skips the ids already written (and drops
a half-written last line left by a killed process).

Bad rows never crash a job: :func:`read_records` validates each line, counts every rejected row by
reason in a :class:`DataReport`, and goes on.

Records:

- :class:`TaskRecord`: a query (``question``) with what a verifier needs (reference ``answer``,
  reasoning-gym ``task`` name and ``metadata``).
- :class:`ProposalRecord`: a task plus its sampled or loaded responses (:class:`Proposal`, each
  with the reward it got in selection).
- :class:`AggregationRecord`: one training example: the query, the K proposals exactly as the
  aggregator sees them, and the target aggregation.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from aft_graph.tasks import Task

__all__ = [
    "AggregationRecord",
    "DataReport",
    "JsonlWriter",
    "Proposal",
    "ProposalRecord",
    "TaskRecord",
    "read_records",
    "written_ids",
]

R = TypeVar("R", bound=BaseModel)


def _non_blank(value: str, what: str) -> str:
    if not value or not value.strip():
        raise ValueError(f"{what} is empty")
    return value


class TaskRecord(BaseModel):
    """A query and what a verifier needs to score answers to it."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(description="Unique id of the query (resume and joins use it).")
    question: str = Field(description="The query, exactly as the model sees it.")
    answer: str | None = Field(None, description="Reference answer (for verifiers), if known.")
    task: str | None = Field(
        None, description="reasoning-gym dataset name; selects that task's own score_answer."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Task metadata (reasoning-gym scorers may read it)."
    )

    @field_validator("id", mode="before")
    @classmethod
    def _id_str(cls, value: Any) -> str:
        if isinstance(value, int | float):
            value = str(value)
        return value

    @field_validator("id", "question")
    @classmethod
    def _required_text(cls, value: str, info) -> str:
        return _non_blank(value, info.field_name)

    def task_fields(self) -> dict[str, Any]:
        """The :class:`TaskRecord` part of any record (to carry it into the next stage)."""
        return {k: getattr(self, k) for k in TaskRecord.model_fields}

    @classmethod
    def from_task(cls, task: Task) -> TaskRecord:
        """The record of a task made by :func:`aft_graph.tasks.reasoning_gym_tasks` (or any task
        with a reference answer): reasoning-gym's entry metadata plus the generator's item seed."""
        meta = task.metadata
        metadata = dict(meta.get("entry", {}).get("metadata", {}))
        if meta.get("item_seed") is not None:
            metadata["item_seed"] = meta["item_seed"]
        return cls(
            id=task.id, question=task.question, answer=task.reference,
            task=meta.get("dataset"), metadata=metadata,
        )  # fmt: skip

    def to_task(self) -> Task:
        """The :class:`aft_graph.tasks.Task` that the shared verifiers score.

        A record naming a reasoning-gym data set is scored by that data set's ``score_answer``;
        one with only a reference answer by math-verify equivalence.

        Raises:
            ValueError: The record has neither (no verifier can score it).
        """
        from aft_graph.tasks import Task, is_reasoning_gym_dataset, stored_reasoning_gym_task

        if self.task is not None and is_reasoning_gym_dataset(self.task):
            return stored_reasoning_gym_task(
                self.id, self.question, self.answer or "", self.task, self.metadata
            )
        if self.answer is None:
            raise ValueError(
                f"task {self.id!r} has neither a reasoning-gym task name nor a reference answer, "
                "so the verifier cannot score it: use a reward model or a judge instead"
            )
        return Task(self.id, self.question, self.answer, kind="math")


class Proposal(BaseModel):
    """One response to a query, with its reward once selection has scored it."""

    model_config = ConfigDict(extra="ignore")

    text: str = Field(description="The response text.")
    reward: float | None = Field(None, description="Selection reward (higher is better).")
    source: str | None = Field(None, description="Where it came from (model, data set...).")
    finish_reason: str | None = Field(None, description="Engine finish reason (stop / length).")

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return _non_blank(value, "proposal text")


class ProposalRecord(TaskRecord):
    """A query with several responses (sampled on-policy or loaded off-policy)."""

    proposals: list[Proposal] = Field(min_length=1, description="Responses, in sampling order.")
    policy: Literal["on", "off"] = Field(
        "on", description="on: sampled from the model being trained; off: from a data set."
    )
    selected_by: str | None = Field(None, description="Reward that selected the proposals.")

    def texts(self) -> list[str]:
        return [p.text for p in self.proposals]


class AggregationRecord(TaskRecord):
    """One training example: query + proposals (as the aggregator sees them) -> target."""

    proposals: list[str] = Field(
        default_factory=list,
        description="Proposal texts in prompt order (empty for plain query -> response examples).",
    )
    proposal_rewards: list[float | None] = Field(
        default_factory=list, description="Selection reward of each proposal."
    )
    target: str = Field(description="The aggregation the model is trained to write.")
    target_source: Literal["teacher", "self", "solution", "verified_proposal", "reference", "proposal", "dataset"] = Field(
        "self",
        description="teacher: a teacher model; self: the model's own verified aggregation; "
        "solution: a verified answer sampled without the proposals; reference / proposal: pseudo-aggregations (ablations); dataset: loaded as is.",
    )
    target_reward: float | None = Field(None, description="Verifier score of the target.")
    template: str = Field("aft", description="Aggregation prompt template (aft_graph.prompts).")
    query_id: str | None = Field(
        None, description="Id of the query (several examples may come from one query)."
    )
    policy: Literal["on", "off"] = "on"

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return _non_blank(value, "target")

    @field_validator("proposals")
    @classmethod
    def _proposals(cls, value: list[str]) -> list[str]:
        for text in value:
            _non_blank(text, "proposal text")
        return value


@dataclass
class DataReport:
    """Counts of what a stage read, kept, and skipped (by reason), for the log and the report."""

    stage: str
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, detail: str | None = None) -> None:
        """Count one skipped row; the first few details are kept as examples."""
        self.skipped[reason] += 1
        if detail and len(self.examples) < 5:
            self.examples.append(f"{reason}: {detail}"[:300])

    def note(self, what: str, count: int = 1) -> None:
        """Count something that is not a skip (e.g. proposals dropped inside a kept row)."""
        self.notes[what] += count

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "read": self.read,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "notes": dict(self.notes),
            "examples": list(self.examples),
        }

    def summary(self) -> str:
        parts = [f"{self.stage}: read {self.read}, kept {self.kept}"]
        if self.skipped:
            parts.append(
                "skipped "
                + ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            )
        if self.notes:
            parts.append(", ".join(f"{n} {what}" for what, n in self.notes.most_common()))
        return "; ".join(parts)

    def print(self, console=None) -> None:
        from rich.console import Console

        console = console or Console(stderr=True)
        style = "yellow" if self.skipped else "green"
        console.print(f"[{style}]{self.summary()}[/{style}]")
        for example in self.examples:
            console.print(f"  [dim]{example}[/dim]")


def _describe(exc: ValidationError) -> tuple[str, str]:
    """A short reason (for counting) and a detail (for the examples) of a validation error."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int)) or "row"
    kind = err.get("type", "invalid")
    msg = err.get("msg", "")
    if kind == "missing":
        reason = f"missing {loc}"
    elif "empty" in msg or kind == "too_short":
        reason = f"empty {loc}"
    else:
        reason = f"invalid {loc}"
    return reason, f"{loc}: {msg}"


def read_records(
    path: str | Path,
    model: type[R],
    report: DataReport | None = None,
    *,
    max_chars: int | None = None,
) -> Iterator[R]:
    """Valid records of a jsonl file; bad lines are counted in ``report`` and skipped.

    Args:
        path: The jsonl file.
        model: Record class to validate each line with.
        report: Receives the counts (``read``, ``skipped`` by reason); ``kept`` is left to the
            caller, which may filter further.
        max_chars: Rows whose JSON is longer than this are skipped as ``over-long``.
    """
    report = report if report is not None else DataReport(stage=str(path))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the previous `aft-train` stage first")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            report.read += 1
            if max_chars is not None and len(line) > max_chars:
                report.skip("over-long", f"line {lineno}: {len(line)} characters > {max_chars}")
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                report.skip("bad json", f"line {lineno}: {exc}")
                continue
            if not isinstance(data, dict):
                report.skip("bad json", f"line {lineno}: not an object")
                continue
            try:
                yield model.model_validate(data)
            except ValidationError as exc:
                reason, detail = _describe(exc)
                report.skip(reason, f"line {lineno} ({reason}): {detail}")


def written_ids(path: str | Path, key: str = "id") -> set[str]:
    """Values of ``key`` (the id) in the complete records of a jsonl output (for resuming)."""
    path = Path(path)
    ids: set[str] = set()
    if not path.is_file():
        return ids
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # a half-written last line: not done
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get(key) is not None:
                ids.add(str(row[key]))
    return ids


class JsonlWriter:
    """Append records to a jsonl file, one flushed line each, resuming where a run stopped.

    Opening an existing file keeps its complete lines and drops a half-written last line; ``done``
    holds the ids already written, so callers skip that work.

    Args:
        path: Output file (parent directories are created).
        overwrite: Start from an empty file instead of resuming.
        key: The field that identifies finished work (``id``; ``query_id`` when a query may give
            several rows).
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, key: str = "id") -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self.path.write_text("")
        elif self.path.is_file():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                self.path.write_bytes(data[: data.rfind(b"\n") + 1])
        self.done: set[str] = written_ids(self.path, key)
        self.written = 0
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: BaseModel | dict[str, Any]) -> None:
        row = record.model_dump(mode="json") if isinstance(record, BaseModel) else record
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        if row.get(self.key) is not None:
            self.done.add(str(row[self.key]))
        self.written += 1

    def write_all(self, records: Iterable[BaseModel | dict[str, Any]]) -> None:
        for record in records:
            self.write(record)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
