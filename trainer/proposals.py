"""Proposals: sampled on-policy from the model being trained, or loaded off-policy from a data set.

On-policy sampling goes through any :class:`~aft_graph.backends.base.Backend` (in-process vLLM,
a ``vllm serve`` fleet, transformers...). Instruct models get the graph's own proposal prompt
(:func:`aft_graph.prompts.proposal_messages`); base models a raw few-shot (ICL) prompt.

Off-policy proposals come from any data set with several responses per prompt (UltraFeedback's
``prompt`` + ``completions[].response`` by default), in jsonl or HF ``datasets`` form.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from aft_graph.backends.base import Backend, GenerationRequest, derive_seed
from aft_graph.prompts import proposal_messages

from ._run import bounded_map, progress
from .config import OffPolicyConfig, ProposalConfig
from .records import DataReport, JsonlWriter, Proposal, ProposalRecord, TaskRecord

__all__ = [
    "ICL_STOP",
    "icl_prompt",
    "load_offpolicy",
    "proposal_request",
    "resolve_mode",
    "sample_proposals",
    "write_offpolicy",
]

ICL_STOP = ("\n\nQuestion:", "\nQuestion:")


def icl_prompt(question: str, shots: Sequence[tuple[str, str]]) -> str:
    """A raw few-shot prompt for a base model: worked examples, then the question."""
    blocks = [f"Question: {q.strip()}\nAnswer: {a.strip()}" for q, a in shots]
    blocks.append(f"Question: {question.strip()}\nAnswer:")
    return "\n\n".join(blocks)


def _icl_shots(task: TaskRecord, pool: Sequence[TaskRecord], n: int) -> list[tuple[str, str]]:
    """``n`` other tasks of the pool with reference answers, chosen stably from the task id."""
    candidates = [t for t in pool if t.id != task.id and t.answer is not None]
    if not candidates or n == 0:
        return []
    start = (derive_seed(0, task.id) or 0) % len(candidates)
    picked = [candidates[(start + i) % len(candidates)] for i in range(min(n, len(candidates)))]
    return [(t.question, f"<answer>{t.answer}</answer>") for t in picked]


def resolve_mode(backend: Backend | None, mode: str) -> str:
    """``auto`` -> ``icl`` for a base model (its tokenizer has no chat template), else ``chat``."""
    if mode != "auto":
        return mode
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) is None:
        return "icl"
    return "chat"


def proposal_request(
    task: TaskRecord,
    config: ProposalConfig,
    *,
    pool: Sequence[TaskRecord] = (),
    mode: str | None = None,
) -> GenerationRequest:
    """The request that samples ``config.samples`` proposals for ``task``.

    ``mode`` overrides ``config.mode`` (``auto`` is resolved against the backend by
    :func:`sample_proposals`; here it means ``chat``).
    """
    seed = derive_seed(config.seed, "proposal", task.id)
    sampling = config.sampling(seed)
    if (mode or config.mode) == "icl":
        prompt = icl_prompt(task.question, _icl_shots(task, pool, config.icl_shots))
        sampling = sampling.model_copy(update={"stop": ICL_STOP})
        return GenerationRequest(prompt=prompt, sampling=sampling, lora=config.lora)
    return GenerationRequest(
        messages=tuple(proposal_messages(task.question, system=config.system)),
        sampling=sampling,
        lora=config.lora,
    )


async def sample_proposals(
    backend: Backend,
    tasks: Iterable[TaskRecord],
    config: ProposalConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    source: str | None = None,
    show_progress: bool = True,
) -> DataReport:
    """Sample proposals for every task not yet in ``out`` and append them as ProposalRecords.

    Empty proposals (and, with ``drop_truncated``, cut ones) are dropped and counted; a task left
    with none, or whose request the backend rejects (e.g. too long), is skipped and counted.
    """
    tasks = list(tasks)
    report = DataReport(stage="proposals (on-policy)", read=len(tasks))
    with JsonlWriter(out, overwrite=overwrite) as writer:
        todo = [t for t in tasks if t.id not in writer.done]
        if len(todo) < len(tasks):
            report.note("already written (resumed)", len(tasks) - len(todo))
        source = source or getattr(backend, "model_path", None) and str(backend.model_path)
        mode = resolve_mode(backend, config.mode)
        report.stage = f"proposals (on-policy, {mode})"
        with progress(f"proposals ({config.samples}/query)", len(todo), enabled=show_progress) as advance:
            async for task, completions, error in bounded_map(
                todo,
                lambda t: backend.generate(proposal_request(t, config, pool=tasks, mode=mode)),
                concurrency=config.concurrency,
            ):
                advance()
                if error is not None:
                    report.skip("backend error", f"{task.id}: {error}")
                    continue
                kept = []
                for c in completions or []:
                    if not c.text.strip():
                        report.note("empty proposals dropped")
                        continue
                    if config.drop_truncated and c.finish_reason == "length":
                        report.note("truncated proposals dropped")
                        continue
                    kept.append(
                        Proposal(text=c.text, source=source, finish_reason=c.finish_reason)
                    )
                if not kept:
                    report.skip("no usable proposal", task.id)
                    continue
                writer.write(ProposalRecord(**task.task_fields(), proposals=kept, policy="on"))
                report.kept += 1
    return report


def _get(row: dict[str, Any], path: str) -> Any:
    """``row[a][b]`` for ``path="a.b"``."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


_MISSING = object()


def _field(row: dict[str, Any], path: str, i: int, report: DataReport) -> Any:
    """``row``'s field at ``path``, or ``_MISSING`` after recording row ``i`` as skipped."""
    try:
        return _get(row, path)
    except KeyError:
        report.skip(f"missing {path}", f"row {i}")
        return _MISSING


def _rows(config: OffPolicyConfig) -> Iterator[dict[str, Any]]:
    source = Path(config.source).expanduser()
    if source.is_file() and source.suffix in (".jsonl", ".json"):
        with source.open(encoding="utf-8") as fh:
            if source.suffix == ".json" and fh.read(1) == "[":
                fh.seek(0)
                yield from json.load(fh)
                return
            fh.seek(0)
            for line in fh:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        yield {"__bad_json__": line[:200]}
        return
    import datasets

    if source.is_dir() and (
        (source / "dataset_info.json").is_file() or (source / "dataset_dict.json").is_file()
    ):
        ds = datasets.load_from_disk(str(source))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[config.split]
    else:
        ds = datasets.load_dataset(str(config.source), split=config.split)
    yield from ds


def load_offpolicy(config: OffPolicyConfig, report: DataReport | None = None) -> Iterator[ProposalRecord]:
    """ProposalRecords from a data set with several responses per prompt; bad rows are counted."""
    report = report if report is not None else DataReport(stage="proposals (off-policy)")
    for i, row in enumerate(_rows(config)):
        if config.limit is not None and i >= config.limit:
            break
        report.read += 1
        if not isinstance(row, dict) or "__bad_json__" in row:
            report.skip("bad json", f"row {i}")
            continue
        prompt = _field(row, config.prompt_field, i, report)
        if prompt is _MISSING:
            continue
        if not isinstance(prompt, str) or not prompt.strip():
            report.skip(f"empty {config.prompt_field}", f"row {i}")
            continue
        responses = _field(row, config.responses_field, i, report)
        if responses is _MISSING:
            continue
        if not isinstance(responses, list):
            report.skip(f"invalid {config.responses_field}", f"row {i}: not a list")
            continue
        proposals = []
        for r in responses:
            text, score = r, None
            if isinstance(r, dict):
                text = r.get(config.response_key) if config.response_key else None
                if config.score_key:
                    score = r.get(config.score_key)
            if not isinstance(text, str) or not text.strip():
                report.note("empty responses dropped")
                continue
            try:
                reward = float(score) if score is not None else None
            except (TypeError, ValueError):
                reward = None
            proposals.append(Proposal(text=text, reward=reward, source=str(config.source)))
        if not proposals:
            report.skip("no usable response", f"row {i}")
            continue
        rid = row.get(config.id_field) if config.id_field else None
        answer = row.get(config.answer_field) if config.answer_field else None
        report.kept += 1
        yield ProposalRecord(
            id=str(rid if rid is not None else i),
            question=prompt,
            answer=None if answer is None else str(answer),
            proposals=proposals,
            policy="off",
        )


def write_offpolicy(config: OffPolicyConfig, out: str | Path, *, overwrite: bool = False) -> DataReport:
    """Load off-policy proposals into a ProposalRecord jsonl (resumable like every stage)."""
    report = DataReport(stage="proposals (off-policy)")
    with JsonlWriter(out, overwrite=overwrite) as writer:
        for record in load_offpolicy(config, report):
            if record.id in writer.done:
                report.note("already written (resumed) or duplicate id")
                report.kept -= 1
                continue
            writer.write(record)
    return report
