"""The summary (``summary.json``) and Markdown report (``report.md``) of a recipe run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .aggregations import copies_proposal
from .records import AggregationRecord, DataReport, ProposalRecord

__all__ = ["accuracy", "breakdown_table", "build_summary", "paired_table", "render_report"]

RUN_FILES = (
    "proposals.jsonl", "selected.jsonl", "aggregations.jsonl", "aggregations.rejected.jsonl",
    "eval_proposals.jsonl",
)  # fmt: skip


def accuracy(rows: Sequence[dict[str, Any]], key: str) -> float:
    """Share of rows whose ``key`` is a full score (1.0) or true."""
    return sum(r[key] >= 1.0 if isinstance(r[key], float) else bool(r[key]) for r in rows) / max(len(rows), 1)


def _copies(rows: list[dict[str, Any]], heldout: list[Any], k: int) -> int:
    texts = {r.id: r.texts()[:k] for r in heldout}
    return sum(copies_proposal(row["aggregation"], texts.get(row["id"], ())) for row in rows)


def build_summary(
    config: dict[str, Any],
    out: Path,
    *,
    timings: dict[str, float],
    reports: Sequence[DataReport],
    rewards: dict[str, Any],
    examples: Sequence[AggregationRecord],
    sft_result,
    heldout: Sequence[ProposalRecord],
    baselines: dict[str, float],
    before: Sequence[dict[str, Any]],
    after: Sequence[dict[str, Any]],
    merged_dir: Path | None,
    merged_text: str | None,
    graph: list[dict[str, Any]],
    checked: dict[str, int],
    paired: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Everything a run measured, as plain JSON (what ``summary.json`` holds)."""
    k = config["k"]
    agg_k = config.get("aggregation_k") or k  # the proposals the evaluated aggregator read
    losses = sft_result.losses
    window = max(1, min(5, len(losses) // 4))
    return {
        "config": config,
        "files": {name: _count_lines(out / name) for name in RUN_FILES},
        "timings_s": timings,
        "data": [r.to_dict() for r in reports],
        "disjoint_from": checked,
        "rewards": {
            **rewards,
            "training_examples": len(examples),
            "queries_with_a_target": len({e.query_id for e in examples}),
        },
        "sft": {
            "examples": sft_result.examples,
            "steps": sft_result.steps,
            "first_loss": sft_result.first_loss,
            "last_loss": sft_result.last_loss,
            "window": window,
            "first_mean": _mean([x for _, x in losses[:window]]),
            "last_mean": _mean([x for _, x in losses[-window:]]),
            "losses": losses,
            "adapter": str(sft_result.adapter_dir),
            "runtime_s": round(sft_result.runtime_s, 1),
        },
        "heldout": {
            "questions": len(heldout),
            **baselines,
            "aggregator_before": accuracy(before, "aggregation_score"),
            "aggregator_after": accuracy(after, "aggregation_score"),
            "aggregator_before_strict": accuracy(before, "aggregation_strict"),
            "aggregator_after_strict": accuracy(after, "aggregation_strict"),
            "tagged_before": accuracy(before, "aggregation_tagged"),
            "tagged_after": accuracy(after, "aggregation_tagged"),
            "direct_before": accuracy(before, "direct_score"),
            "direct_after": accuracy(after, "direct_score"),
            "outputs_changed": sum(b["aggregation"] != a["aggregation"] for b, a in zip(before, after, strict=True)),
            # An aggregator that only restates an input can at best pick: how often each did.
            "copies_before": _copies(before, heldout, agg_k),
            "copies_after": _copies(after, heldout, agg_k),
            "paired": paired or {},
        },
        "merged": {"dir": str(merged_dir) if merged_dir else None, "first_output": merged_text},
        "graph": graph,
        "examples": [
            {
                "question": r.question,
                "answer": r.answer,
                "proposals": r.texts()[:k],
                "before": b["aggregation"],
                "after": a["aggregation"],
                "before_score": b["aggregation_score"],
                "after_score": a["aggregation_score"],
            }
            for r, b, a in list(zip(heldout, before, after, strict=True))[:4]
        ],
    }


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.open() if line.strip()) if path.is_file() else 0


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _quote(text: str, limit: int = 400) -> str:
    text = text.strip()
    if len(text) > limit:
        text = text[:limit] + " [...]"
    return "\n".join("    " + line for line in text.splitlines()) or "    (empty)"


_TARGETS = {
    "self": "teacher-free self-aggregation filtered by the verifier",
    "verified_proposal": "a verifier-accepted proposal of the prompt (working shown preferred), "
    "copied: no generation",
}


def _paired_lines(paired: dict[str, dict[str, float]]) -> list[str]:
    if not paired:
        return []
    lines = [
        "Paired on the same questions: the trained aggregator minus each baseline (95% bootstrap "
        "interval, BCa; wins / losses count the questions where exactly one is right).",
        "",
        *paired_table(paired, "trained minus baseline"),
    ]
    return [*lines, ""]


def paired_table(paired: dict[str, dict[str, float]], column: str = "this minus baseline") -> list[str]:
    """Markdown rows of :func:`trainer.stages.paired_comparisons` (header included)."""
    lines = [
        f"| baseline | baseline accuracy | {column} | 95% interval | wins / losses |",
        "|---|---|---|---|---|",
    ]
    for name, p in paired.items():
        lines.append(
            f"| {name} | {p['baseline']:.3f} | {p['difference']:+.3f} | "
            f"[{p['low']:+.3f}, {p['high']:+.3f}] | {p['wins']} / {p['losses']} |"
        )
    return lines


def breakdown_table(groups: dict[int, dict[str, int]], k: int) -> list[str]:
    """Markdown rows of :func:`trainer.stages.by_right_proposals` (header included)."""
    names = [n for n in next(iter(groups.values()), {}) if n != "questions"]
    lines = [
        f"| right of {k} proposals | questions | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for right, group in groups.items():
        lines.append(
            f"| {right} | {group['questions']} | " + " | ".join(str(group[n]) for n in names) + " |"
        )
    return lines


def render_report(s: dict[str, Any]) -> str:
    """The Markdown report of a recipe run."""
    c, r, sft, h = s["config"], s["rewards"], s["sft"], s["heldout"]
    families = " + ".join(dict.fromkeys(spec["name"] for spec in c["mix"]))
    checked = ", ".join(f"{name} ({n})" for name, n in s.get("disjoint_from", {}).items()) or "none"
    lines = [
        "# AFT training run",
        "",
        f"Model `{c['model']}`; {c['train_size']} training and {c['eval_size']} held-out queries "
        f"(reasoning-gym: {families}; task seed {c['task_seed']}, disjoint by seed and question "
        f"from the evaluation suites {checked}); targets: "
        + _TARGETS.get(c["mode"], f"pseudo ({c['mode']})")
        + "."
        + (" Accepted targets without an `<answer>` tag get `<answer>N</answer>` appended (N: the "
           "answer the verifier read), so the adapter learns the requested format." if c.get("append_answer") else ""),
        "",
        "## Time (s)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in s["timings_s"].items()],
        "",
        "## Data",
        "",
        "| stage | read | kept | skipped | notes |",
        "|---|---|---|---|---|",
    ]
    for d in s["data"]:
        skipped = ", ".join(f"{n} {k}" for k, n in d["skipped"].items()) or "-"
        notes = ", ".join(f"{n} {k}" for k, n in d["notes"].items()) or "-"
        lines.append(f"| {d['stage']} | {d['read']} | {d['kept']} | {skipped} | {notes} |")
    lines += [
        "",
        "Rows in the run directory: "
        + ", ".join(f"`{name}` {n}" for name, n in s["files"].items())
        + " (a resumed run counts only new work in the table above).",
        "",
        "## Rewards",
        "",
        f"- proposals sampled: {r['proposals']}, verifier-accepted: {r['proposals_accepted']} "
        f"(mean reward {_fmt(r['mean_proposal_reward'])})",
        f"- kept (top-{c['k']} per query): {r['kept_proposals']} (mean reward {_fmt(r['mean_kept_reward'])})",
        f"- training examples: {r['training_examples']} from {r['queries_with_a_target']} queries",
        "",
        "## Training",
        "",
        f"{sft['examples']} examples, {sft['steps']} steps, {sft['runtime_s']} s; "
        f"loss {_fmt(sft['first_loss'])} (step 1) -> {_fmt(sft['last_loss'])} (step {sft['steps']}); "
        f"mean of the first {sft['window']} steps {_fmt(sft['first_mean'])}, of the last "
        f"{sft['window']} {_fmt(sft['last_mean'])} (batches differ step to step, so single steps are noisy).",
        "",
        "| step | loss |",
        "|---|---|",
    ]
    losses = sft["losses"]
    stride = max(1, len(losses) // 8)
    shown = losses[::stride]
    if losses and shown[-1] != losses[-1]:
        shown.append(losses[-1])
    lines += [f"| {step} | {loss:.4f} |" for step, loss in shown]
    lines += [
        "",
        f"Adapter: `{sft['adapter']}`" + (f"; merged model: `{s['merged']['dir']}`" if s["merged"]["dir"] else ""),
        "",
        "## Held-out queries",
        "",
        f"{h['questions']} queries, the same {c['k']} proposals (sampled from the base model) before "
        "and after; greedy aggregation.",
        "",
        "| | accuracy |",
        "|---|---|",
        f"| proposals (mean) | {_fmt(h['proposal_accuracy'])} |",
        f"| majority vote of the proposals | {_fmt(h['majority_vote_accuracy'])} |",
        f"| any proposal right (oracle) | {_fmt(h['any_proposal_right'])} |",
        f"| aggregator, base model | {_fmt(h['aggregator_before'])} |",
        f"| aggregator, base + AFT adapter | {_fmt(h['aggregator_after'])} |",
        f"| direct answer (no proposals), base | {_fmt(h['direct_before'])} |",
        f"| direct answer (no proposals), with adapter | {_fmt(h['direct_after'])} |",
        "",
        "Scored by reasoning-gym's score_answer on the answer read from the response ("
        + ("`<answer>` tag, else `\\boxed{}`, else the last number stated" if c["last_number"] else "`<answer>` tag or `\\boxed{}`")
        + f"). Strictly (tag or boxed required) the aggregator scores {_fmt(h['aggregator_before_strict'])} "
        f"before and {_fmt(h['aggregator_after_strict'])} after. "
        f"Aggregations stating an `<answer>` tag: {_fmt(h['tagged_before'])} before, "
        f"{_fmt(h['tagged_after'])} after; greedy aggregations changed by the adapter: "
        f"{h['outputs_changed']}/{h['questions']}. Aggregations that are a verbatim copy of one of "
        f"their proposals: {h.get('copies_before', '?')} before, {h.get('copies_after', '?')} after.",
        "",
        *_paired_lines(h.get("paired") or {}),
        "## Outputs before / after",
        "",
    ]
    for i, e in enumerate(s["examples"], 1):
        lines += [
            f"### {i}. {e['question'].splitlines()[0]} (reference: {e['answer']})",
            "",
            f"Before (score {e['before_score']:.2f}):",
            "",
            _quote(e["before"]),
            "",
            f"After (score {e['after_score']:.2f}):",
            "",
            _quote(e["after"]),
            "",
        ]
    if s.get("graph"):
        lines += [
            "## In the graph",
            "",
            "The adapter as the aggregator of `aft_graph.build_graph` (K proposals from the base "
            "model, one greedy aggregation with the adapter), served by the same vLLM engine:",
            "",
            "```python",
            "graph = build_graph(backend, AggregateConfig(proposals=4, layers=1, single_final_aggregation=True))",
            f"await graph.ainvoke({{'question': q}}, context=AggregateContext(aggregator_lora='{sft['adapter']}'))",
            "```",
            "",
        ]
        for run in s["graph"]:
            lines += [
                f"- {run['question'].splitlines()[0]} (reference {run['reference']}; score "
                f"{run['score']:.2f}):",
                "",
                _quote(run["answer"]),
                "",
            ]
    if s["merged"]["first_output"] is not None:
        lines += [
            "## Merged model",
            "",
            "Loaded back with transformers as a plain model path; greedy aggregation of held-out "
            "query 1:",
            "",
            _quote(s["merged"]["first_output"]),
            "",
        ]
    return "\n".join(lines)
