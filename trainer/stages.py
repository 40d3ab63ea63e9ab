"""The stages of the AFT recipe as library functions, each writing into a run directory and
skipping the work a previous run finished there.

``queries`` -> ``proposals`` -> ``select`` -> ``targets`` -> ``sft`` -> ``export``, and
``evaluate`` (held-out aggregation before / after the adapter). Every stage takes the model, the
task mix, the counts and the run directory as arguments: the CPU demo (``aft-train demo``) and a
full run on the default model use the same functions with other sizes (see
:func:`trainer.recipe.run_recipe`).

Files in the run directory: ``tasks_train.jsonl``, ``tasks_eval.jsonl`` and ``queries.json`` (the
disjointness proof), ``proposals.jsonl``, ``selected.jsonl``, ``aggregations.jsonl`` (+
``.rejected``), ``sft/``, ``merged/``, ``eval_proposals.jsonl``, ``heldout_<label>.json``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aft_graph.answers import extract_answer, majority_vote
from aft_graph.backends.base import Backend, GenerationRequest, Sampling
from aft_graph.prompts import TEMPLATES, aggregation_messages, proposal_messages
from aft_graph.tasks import TaskSpec, Verifier, assert_disjoint, evaluation_suites

from ._run import bounded_map
from .aggregations import build_aggregations
from .config import AggregationConfig, ProposalConfig, SelectConfig, SFTConfig
from .proposals import sample_proposals
from .records import (
    AggregationRecord,
    DataReport,
    JsonlWriter,
    ProposalRecord,
    TaskRecord,
    read_records,
)
from .select import VerifierReward, select_proposals
from .tasks import generate_tasks

__all__ = [
    "HELDOUT_SEED_OFFSET",
    "SOLUTION_TARGETS",
    "Queries",
    "by_right_proposals",
    "evaluate",
    "export",
    "graph_runs",
    "own_heldout_proposals",
    "paired_comparisons",
    "proposal_baselines",
    "proposals",
    "queries",
    "select",
    "sft",
    "solution_targets",
    "targets",
    "vote_scores",
]

HELDOUT_SEED_OFFSET = 1_000_000
"""The held-out queries are generated from ``seed + HELDOUT_SEED_OFFSET``: far from any training
item seed (a mix's data set i uses ``seed + 7919 i`` plus the item index)."""


@dataclass
class Queries:
    """The training and held-out queries of a run, and what they were proven disjoint from."""

    train: list[TaskRecord]
    heldout: list[TaskRecord]
    checked: dict[str, int] = field(default_factory=dict)
    resumed: bool = False


def _dump(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.model_dump(mode="json")))


def queries(
    out_dir: str | Path,
    mix: Sequence[TaskSpec],
    train_size: int,
    heldout_size: int,
    *,
    seed: int,
    answer_format: str = "tag",
    eval_suites: Sequence[str] | None = None,
) -> Queries:
    """Generate training and held-out queries, disjoint from each other and from every evaluation
    suite (by reasoning-gym item seed and by question), and write them.

    Evaluation questions are excluded while generating, then :func:`aft_graph.tasks.assert_disjoint`
    proves the result; the proof (suites and sizes checked) is written to ``queries.json``. A rerun
    with the same arguments reads the files back instead.

    Args:
        out_dir: The run directory.
        mix: reasoning-gym data sets and configs.
        train_size: Training queries.
        heldout_size: Held-out queries (seeded ``seed + HELDOUT_SEED_OFFSET``).
        seed: Generator seed of the training queries; keep it far from evaluation seeds (0 ...).
        answer_format: ``tag`` / ``boxed``: the instruction appended to every question.
        eval_suites: Evaluation suite names to stay disjoint from (default: all of
            :data:`aft_graph.tasks.EVALUATION_SUITES`).

    Raises:
        aft_graph.tasks.TaskOverlapError: A set overlaps another (the message says how).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = _dump(
        {
            "mix": list(mix), "train_size": train_size, "heldout_size": heldout_size,
            "seed": seed, "heldout_seed": seed + HELDOUT_SEED_OFFSET,
            "answer_format": answer_format,
            "eval_suites": None if eval_suites is None else list(eval_suites),
        }
    )  # fmt: skip
    manifest = out / "queries.json"
    train_path, heldout_path = out / "tasks_train.jsonl", out / "tasks_eval.jsonl"
    if manifest.is_file() and train_path.is_file() and heldout_path.is_file():
        saved = json.loads(manifest.read_text())
        if saved.get("params") == params:
            return Queries(
                list(read_records(train_path, TaskRecord)),
                list(read_records(heldout_path, TaskRecord)),
                saved["checked"],
                resumed=True,
            )
    suites = evaluation_suites(eval_suites)
    evaluation = [t.question for s in suites for t in s]
    train = generate_tasks(
        mix, train_size, seed=seed, answer_format=answer_format, exclude=evaluation, prefix="train-"
    )
    heldout = generate_tasks(
        mix, heldout_size, seed=seed + HELDOUT_SEED_OFFSET, answer_format=answer_format,
        exclude=evaluation + [t.question for t in train], prefix="eval-",
    )  # fmt: skip
    assert_disjoint(train, heldout, names=("training", "held-out"))
    checked = {}
    for suite in suites:
        assert_disjoint(train + heldout, suite, names=("training", f"evaluation suite {suite.name}"))
        checked[suite.name] = len(suite)
    for path, rows in ((train_path, train), (heldout_path, heldout)):
        with JsonlWriter(path, overwrite=True) as w:
            w.write_all(rows)
    manifest.write_text(json.dumps({"params": params, "checked": checked}, indent=2) + "\n")
    return Queries(train, heldout, checked)


async def proposals(
    backend: Backend,
    tasks: Sequence[TaskRecord],
    out: str | Path,
    *,
    samples: int,
    max_tokens: int,
    show_progress: bool = True,
) -> DataReport:
    """Sample ``samples`` on-policy proposals per task into ``out`` (tasks already there are
    skipped); see :func:`trainer.proposals.sample_proposals`."""
    config = ProposalConfig(samples=samples, max_tokens=max_tokens)
    return await sample_proposals(backend, tasks, config, out, show_progress=show_progress)


async def own_heldout_proposals(
    backend: Backend,
    tasks: Sequence[TaskRecord],
    base: Sequence[ProposalRecord],
    out: str | Path,
    *,
    samples: int,
    max_tokens: int,
    lora: str | None = None,
    show_progress: bool = True,
) -> list[ProposalRecord]:
    """Held-out proposals written by the evaluated model itself (the whole AFT pipeline on one
    model), in the order of the base model's ``base`` records and with the same per-task seeds, so
    that pipelines compare question by question. Resumes from ``out``.

    Raises:
        RuntimeError: some query of ``base`` got no proposal (the error names the first; running
            again retries only the missing ones).
    """
    config = ProposalConfig(samples=samples, max_tokens=max_tokens, lora=lora, concurrency=32)
    await sample_proposals(backend, tasks, config, out, show_progress=show_progress)
    by_id = {r.id: r for r in read_records(out, ProposalRecord)}
    missing = [r.id for r in base if r.id not in by_id]
    if missing:
        raise RuntimeError(
            f"{len(missing)} held-out queries got no proposal (first: {missing[0]}); run again: it "
            f"resumes from {out} and samples only those"
        )
    return [by_id[r.id] for r in base]


async def select(
    out_dir: str | Path, verifier: Verifier, k: int, *, show_progress: bool = True
) -> tuple[DataReport, dict[str, Any]]:
    """Keep the top-``k`` proposals of every query by the verifier: ``proposals.jsonl`` ->
    ``selected.jsonl`` (queries already selected are skipped).

    Returns:
        The stage report and reward statistics (all proposals, and those kept).
    """
    out = Path(out_dir)
    report = DataReport(stage=f"select (top-{k} by verifier)")
    records = list(read_records(out / "proposals.jsonl", ProposalRecord, report))
    rewards = [verifier.score(r, p.text) for r in records for p in r.proposals]
    await select_proposals(
        records, VerifierReward(verifier), SelectConfig(k=k), out / "selected.jsonl",
        report=report, show_progress=show_progress,
    )  # fmt: skip
    kept = [p.reward or 0.0 for r in read_records(out / "selected.jsonl", ProposalRecord) for p in r.proposals]
    stats = {
        "proposals": len(rewards),
        "mean_proposal_reward": _mean(rewards),
        "proposals_accepted": sum(r >= 1.0 for r in rewards),
        "kept_proposals": len(kept),
        "mean_kept_reward": _mean(kept),
    }
    return report, stats


async def targets(
    backend: Backend,
    out_dir: str | Path,
    config: AggregationConfig,
    verifier: Verifier,
    *,
    show_progress: bool = True,
) -> tuple[DataReport, list[AggregationRecord]]:
    """Aggregation targets for the selected proposals: ``selected.jsonl`` ->
    ``aggregations.jsonl`` (queries already done are skipped).

    Raises:
        RuntimeError: No target was accepted, so there is nothing to train on.
    """
    out = Path(out_dir)
    selected = list(read_records(out / "selected.jsonl", ProposalRecord))
    report = await build_aggregations(
        selected, config, out / "aggregations.jsonl", backend=backend, verifier=verifier,
        show_progress=show_progress,
    )  # fmt: skip
    examples = list(read_records(out / "aggregations.jsonl", AggregationRecord))
    if not examples:
        raise RuntimeError(
            "no aggregation target was accepted by the verifier, so there is nothing to train "
            "on: raise --aggregation-samples or --train-size, or use --mode reference "
            "(pseudo-aggregations) to exercise the rest of the recipe"
        )
    return report, examples


SOLUTION_TARGETS = "aggregations_solution.jsonl"


async def solution_targets(
    backend: Backend,
    out_dir: str | Path,
    config: AggregationConfig,
    verifier: Verifier,
    *,
    show_progress: bool = True,
) -> tuple[DataReport, list[AggregationRecord]]:
    """``solution`` targets (``config.mode``) for every selected query that ``aggregations.jsonl``
    gave no target: ``selected.jsonl`` -> ``aggregations_solution.jsonl`` (resumable).

    Returns:
        The stage's report and the examples written so far.
    """
    if config.mode != "solution":
        raise ValueError(f"solution_targets needs AggregationConfig(mode='solution'), got {config.mode!r}")
    out = Path(out_dir)
    targeted = {r.query_id for r in read_records(out / "aggregations.jsonl", AggregationRecord)}
    todo = [r for r in read_records(out / "selected.jsonl", ProposalRecord) if r.id not in targeted]
    report = await build_aggregations(
        todo, config, out / SOLUTION_TARGETS, backend=backend, verifier=verifier,
        show_progress=show_progress,
    )  # fmt: skip
    report.stage = "solution targets (queries without a self target)"
    return report, list(read_records(out / SOLUTION_TARGETS, AggregationRecord))


async def sft(config: SFTConfig, *, show_progress: bool = True):
    """LoRA SFT (:func:`trainer.sft.train_sft`; a finished run is not trained further) in a
    worker thread, so the event loop (and a caller's engine) stays responsive."""
    from .sft import train_sft

    return await asyncio.to_thread(train_sft, config, show_progress=show_progress)


def export(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    check_messages: list[dict[str, str]] | None = None,
    max_tokens: int = 64,
) -> tuple[Path, str | None]:
    """Merge the adapter into its base model at ``out`` (skipped when ``out`` was merged from this
    adapter after it was last written) and, given ``check_messages``, load the merged directory
    back as a plain transformers model and answer them greedily (cached in ``out``).

    Returns:
        The merged directory and the check's text (``None`` without ``check_messages``).
    """
    from .export import export_merged

    adapter_dir, out = Path(adapter_dir).resolve(), Path(out)
    stamp = out / "aft_merged_from.json"
    newest = max((p.stat().st_mtime for p in adapter_dir.iterdir()), default=0.0)
    fresh = stamp.is_file() and stamp.stat().st_mtime >= newest
    if not (fresh and json.loads(stamp.read_text()).get("adapter") == str(adapter_dir)):
        export_merged(adapter_dir, out)
    if check_messages is None:
        return out, None
    cache = out / "aft_merged_check.json"
    key = {"messages": check_messages, "max_tokens": max_tokens}
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        return out, json.loads(cache.read_text())["text"]
    text = _merged_check(out, check_messages, max_tokens)
    cache.write_text(json.dumps({"key": key, "text": text}, ensure_ascii=False))
    return out, text


def _merged_check(merged: Path, messages: list[dict[str, str]], max_tokens: int) -> str:
    import torch

    from ._models import load_causal_lm

    model, tok, _ = load_causal_lm(merged)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
    return tok.decode(output[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


async def evaluate(
    backend: Backend,
    records: Sequence[ProposalRecord],
    out: str | Path,
    *,
    lora: str | None,
    k: int,
    max_tokens: int,
    verifier: Verifier,
    strict: Verifier | None = None,
    template: str = "aft",
    direct: bool = True,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Greedy aggregation of the first ``k`` proposals (and a greedy direct answer) for every
    held-out record, scored; rows are cached in ``out`` (a JSON file) for the same records and
    settings.

    ``strict`` (optional) scores the aggregation a second time, e.g. requiring the answer tag.
    ``template`` names the aggregation prompt (:data:`aft_graph.prompts.TEMPLATES`); ``direct=False``
    skips the direct answer (a prompt ablation needs only the aggregations). ``model`` names the
    model the backend serves when it is not the recipe's own (e.g. an adapter's merged model), so
    that cached rows of another model are never taken for its own.
    """
    out = Path(out)
    prompt = TEMPLATES[template]
    key = {"ids": [r.id for r in records], "lora": lora, "k": k, "max_tokens": max_tokens}
    if template != "aft" or not direct:  # earlier caches (AFT prompt, with direct) stay valid
        key |= {"template": template, "direct": direct}
    if model is not None:
        key["model"] = model
    if out.is_file():
        saved = json.loads(out.read_text())
        if saved.get("key") == key:
            return saved["rows"]
        _refuse_other_models_rows(out, saved.get("key") or {}, key)
    strict = strict or verifier
    greedy = Sampling(temperature=0.0, max_tokens=max_tokens)

    async def one(record: ProposalRecord) -> dict[str, Any]:
        messages = aggregation_messages(record.question, record.texts()[:k], prompt)
        calls = [backend.generate(GenerationRequest(messages=tuple(messages), sampling=greedy, lora=lora))]
        if direct:
            calls.append(
                backend.generate(
                    GenerationRequest(
                        messages=tuple(proposal_messages(record.question)), sampling=greedy, lora=lora
                    )
                )
            )
        agg, *rest = await asyncio.gather(*calls)
        row = {
            "id": record.id,
            "aggregation": agg[0].text,
            "aggregation_score": verifier.score(record, agg[0].text),
            "aggregation_strict": strict.score(record, agg[0].text),
            "aggregation_tagged": extract_answer(agg[0].text, "tag") is not None,
        }
        if rest:
            row |= {"direct": rest[0][0].text, "direct_score": verifier.score(record, rest[0][0].text)}
        return row

    # Rows are appended to a partial file as they finish (an evaluation through LoRA on a CPU takes
    # most of an hour): an interrupted run resumes with the rows it already has.
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.jsonl")
    rows = _partial_rows(partial, key)
    todo = [r for r in records if r.id not in rows]
    with partial.open("a") as sink:
        if partial.stat().st_size == 0:
            sink.write(json.dumps({"key": key}) + "\n")
        # Many questions at once: the engine's throughput grows with the batch (greedy outputs do
        # not depend on it beyond float rounding).
        async for record, row, error in bounded_map(todo, one, concurrency=48):
            if error is not None:
                raise error
            rows[record.id] = row  # type: ignore[index]
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
    result = [rows[r.id] for r in records]
    out.write_text(json.dumps({"key": key, "rows": result}, ensure_ascii=False))
    partial.unlink()
    return result


def _refuse_other_models_rows(out: Path, saved: dict[str, Any], key: dict[str, Any]) -> None:
    """Raise where ``out`` holds another model's or adapter's rows: they would be overwritten.

    Rows files are named after the model directory's base name, so two merged models in
    directories of the same name (``runs/a/merged``, ``runs/b/merged``) would share one file: an
    hour of evaluation, and its packed copy, would be replaced without a word.
    """
    def who(k: dict[str, Any]) -> str:
        model, lora = k.get("model"), k.get("lora")
        return f"model {model or '(the recipe model)'}" + (f" with adapter {lora}" if lora else "")

    if who(saved) != who(key):
        raise ValueError(
            f"{out} holds the held-out rows of {who(saved)}, not of {who(key)}: evaluating would "
            "overwrite them. Give this model's directory a name of its own (the rows file is named "
            f"after it), or move {out.name} away to replace its rows."
        )


def _partial_rows(path: Path, key: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows of an interrupted evaluation with the same settings (else a fresh start)."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if header != {"key": key}:
        if isinstance(header, dict) and isinstance(header.get("key"), dict):
            _refuse_other_models_rows(path, header["key"], key)
        path.unlink()
        return {}
    rows = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a half-written last line
            continue
        rows[row["id"]] = row
    return rows


def vote_scores(records: Sequence[ProposalRecord], verifier: Verifier, k: int) -> list[float]:
    """Per record, 1.0 where the majority vote of its first ``k`` proposals is right (the
    self-consistency answer; ties go to the earliest answer), else 0.0."""
    out = []
    for record in records:
        texts = record.texts()[:k]
        v = majority_vote([verifier.extract(t) for t in texts])
        out.append(float(v.index is not None and verifier.score(record, texts[v.index]) >= 1.0))
    return out


def proposal_baselines(records: Sequence[ProposalRecord], verifier: Verifier, k: int) -> dict[str, float]:
    """Accuracy of the first ``k`` proposals: their mean, their majority vote, any of them."""
    mean, oracle = [], []
    for record in records:
        scores = [verifier.score(record, t) for t in record.texts()[:k]]
        mean.append(sum(s >= 1.0 for s in scores) / len(scores))
        oracle.append(float(any(s >= 1.0 for s in scores)))
    n = max(len(records), 1)
    return {
        "proposal_accuracy": sum(mean) / n,
        "majority_vote_accuracy": sum(vote_scores(records, verifier, k)) / n,
        "any_proposal_right": sum(oracle) / n,
    }


def by_right_proposals(
    records: Sequence[ProposalRecord],
    verifier: Verifier,
    k: int,
    scores: dict[str, Sequence[float]],
) -> dict[int, dict[str, int]]:
    """Questions each aggregator got right, grouped by how many of the first ``k`` proposals are
    right: where an aggregator gains or loses against a vote (none right: only solving helps; one
    right: a minority pick).

    Args:
        records: The held-out proposals, in the order of ``scores``.
        verifier: Scores each proposal.
        k: Proposals the aggregator read.
        scores: Per-question scores (1.0 = right) by aggregator name.

    Returns:
        ``{right proposals: {"questions": n, name: questions right, ...}}``, keys ascending.
    """
    groups: dict[int, dict[str, int]] = {}
    for i, record in enumerate(records):
        right = sum(verifier.score(record, t) >= 1.0 for t in record.texts()[:k])
        group = groups.setdefault(right, {"questions": 0, **{name: 0 for name in scores}})
        group["questions"] += 1
        for name, values in scores.items():
            group[name] += int(values[i] >= 1.0)
    return dict(sorted(groups.items()))


def paired_comparisons(
    after: Sequence[dict[str, Any]],
    before: Sequence[dict[str, Any]],
    votes: dict[str, Sequence[float]],
) -> dict[str, dict[str, float]]:
    """The trained aggregator against each baseline on the same questions: the mean per-question
    difference of scores (1/0) with its 95% bootstrap interval (BCa).

    Args:
        after: Rows of :func:`evaluate` with the adapter.
        before: The same rows without it (the untrained aggregator).
        votes: Per-question vote scores by name (e.g. ``{"majority@3": ..., "majority@6": ...}``).
    """
    from aft_graph.eval.stats import bootstrap_interval

    trained = [float(r["aggregation_score"] >= 1.0) for r in after]
    baselines = {"untrained aggregator": [float(r["aggregation_score"] >= 1.0) for r in before], **votes}
    out = {}
    for name, scores in baselines.items():
        diffs = [a - b for a, b in zip(trained, scores, strict=True)]
        lo, hi = bootstrap_interval(diffs)
        out[name] = {
            "baseline": round(sum(scores) / max(len(scores), 1), 4),
            "difference": round(sum(diffs) / max(len(diffs), 1), 4),
            "low": round(lo, 4),
            "high": round(hi, 4),
            "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs),
        }
    return out


async def graph_runs(
    backend: Backend,
    records: Sequence[TaskRecord],
    adapter: str,
    *,
    k: int,
    proposal_tokens: int,
    aggregation_tokens: int,
    verifier: Verifier,
) -> list[dict[str, Any]]:
    """Answer questions with the aft_graph graph (K sampled proposals, one greedy aggregation),
    the adapter as its aggregator."""
    from aft_graph.config import AggregateConfig, SamplingConfig
    from aft_graph.graph import AggregateContext, build_graph

    graph = build_graph(
        backend,
        AggregateConfig(
            strategy="propose_aggregate",
            proposals=k,
            layers=1,
            single_final_aggregation=True,
            proposer=SamplingConfig(temperature=1.0, top_p=0.95, top_k=50, max_tokens=proposal_tokens),
            aggregator=SamplingConfig(temperature=0.0, max_tokens=aggregation_tokens),
        ),
    )
    runs = []
    for record in records:
        result = await graph.ainvoke(
            {"question": record.question}, context=AggregateContext(aggregator_lora=adapter)
        )
        runs.append(
            {
                "question": record.question,
                "reference": record.answer,
                "proposals": result["layers"][0]["texts"],
                "answer": result["answer"],
                "score": verifier.score(record, result["answer"]),
            }
        )
    return runs


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
