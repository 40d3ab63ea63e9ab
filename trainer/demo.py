"""``aft-train demo``: the whole AFT recipe on a reasoning-gym task mix, small enough for a CPU.

1. queries: a seeded mix of simple arithmetic from reasoning-gym (training + held-out sets);
2. proposals: sampled on-policy from the model being trained (vLLM, LoRA serving on);
3. selection: top-K proposals per query by the verifier (reasoning-gym's own ``score_answer``);
4. targets: teacher-free, the model's own aggregations with the inference prompt, kept only when
   the verifier accepts them (rejection sampling);
5. SFT: LoRA on (query + proposals -> aggregation), loss on the aggregation tokens only;
6. evaluation on held-out queries, same proposals before and after: greedy aggregation by the base
   model vs. by the base model + adapter (served per request by the same vLLM engine);
7. export: the adapter and a merged model directory (loaded back with transformers as a check);
8. ``report.md`` (+ ``summary.json``) in the run directory.

Every stage writes jsonl in the run directory and resumes on a rerun.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from aft_graph.answers import extract_answer, majority_vote
from aft_graph.backends.base import Backend, BackendUnavailableError, GenerationRequest, Sampling
from aft_graph.prompts import AFT_TEMPLATE, aggregation_messages, proposal_messages

from ._run import bounded_map, console
from .aggregations import build_aggregations
from .config import AggregationConfig, DemoConfig, ProposalConfig, SelectConfig, SFTConfig
from .export import export_merged
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
from .sft import train_sft
from .tasks import DEFAULT_MIX, Verifier, generate_tasks

__all__ = ["evaluate_aggregator", "run_demo"]


async def evaluate_aggregator(
    backend: Backend,
    records: list[ProposalRecord],
    *,
    lora: str | None,
    max_tokens: int,
    verifier: Verifier,
    k: int,
    strict: Verifier | None = None,
) -> list[dict[str, Any]]:
    """Greedy aggregation (and greedy direct answer) per held-out record, scored.

    ``strict`` (optional) scores the aggregation a second time, e.g. requiring the answer tag.
    """
    strict = strict or verifier

    async def one(record: ProposalRecord) -> dict[str, Any]:
        texts = record.texts()[:k]
        greedy = Sampling(temperature=0.0, max_tokens=max_tokens)
        agg, direct = await asyncio.gather(
            backend.generate(
                GenerationRequest(
                    messages=tuple(aggregation_messages(record.question, texts, AFT_TEMPLATE)),
                    sampling=greedy,
                    lora=lora,
                )
            ),
            backend.generate(
                GenerationRequest(
                    messages=tuple(proposal_messages(record.question)), sampling=greedy, lora=lora
                )
            ),
        )
        return {
            "id": record.id,
            "aggregation": agg[0].text,
            "aggregation_score": verifier.score(record, agg[0].text),
            "aggregation_strict": strict.score(record, agg[0].text),
            "aggregation_tagged": extract_answer(agg[0].text, "tag") is not None,
            "direct": direct[0].text,
            "direct_score": verifier.score(record, direct[0].text),
        }

    rows: dict[str, dict[str, Any]] = {}
    async for record, row, error in bounded_map(records, one, concurrency=16):
        if error is not None:
            raise error
        rows[record.id] = row  # type: ignore[index]
    return [rows[r.id] for r in records]


def _proposal_baselines(records: list[ProposalRecord], verifier: Verifier, k: int) -> dict[str, float]:
    mean, vote, oracle = [], [], []
    for record in records:
        texts = record.texts()[:k]
        scores = [verifier.score(record, t) for t in texts]
        mean.append(sum(s >= 1.0 for s in scores) / len(scores))
        oracle.append(float(any(s >= 1.0 for s in scores)))
        v = majority_vote([verifier.extract(t) for t in texts])
        vote.append(float(v.index is not None and scores[v.index] >= 1.0))
    n = max(len(records), 1)
    return {
        "proposal_accuracy": sum(mean) / n,
        "majority_vote_accuracy": sum(vote) / n,
        "any_proposal_right": sum(oracle) / n,
    }


def _acc(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] >= 1.0 if isinstance(r[key], float) else bool(r[key]) for r in rows) / max(len(rows), 1)


async def _through_the_graph(
    backend: Backend,
    records: list[ProposalRecord],
    adapter: str,
    config: DemoConfig,
    verifier: Verifier,
) -> list[dict[str, Any]]:
    """Answer a few held-out questions with the aft_graph graph, the adapter as its aggregator."""
    from aft_graph.config import AggregateConfig, SamplingConfig
    from aft_graph.graph import AggregateContext, build_graph

    graph = build_graph(
        backend,
        AggregateConfig(
            strategy="propose_aggregate",
            proposals=config.k,
            layers=1,
            single_final_aggregation=True,
            proposer=SamplingConfig(
                temperature=1.0, top_p=0.95, top_k=50, max_tokens=config.proposal_tokens
            ),
            aggregator=SamplingConfig(temperature=0.0, max_tokens=config.aggregation_tokens),
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


def _write_tasks(path: Path, tasks: list[TaskRecord]) -> None:
    with JsonlWriter(path, overwrite=True) as w:
        w.write_all(tasks)


def _merged_check(merged: Path, prompt_messages: list[dict[str, str]], max_tokens: int) -> str:
    """Load the merged directory as a plain model with transformers and answer one prompt greedily."""
    import torch

    from ._models import load_causal_lm

    model, tok, _ = load_causal_lm(merged)
    text = tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


async def run_demo(
    config: DemoConfig,
    *,
    backend: Backend | None = None,
    fresh: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the recipe; returns the summary (also written to ``summary.json`` and ``report.md``).

    Args:
        config: Sizes and settings.
        backend: An engine on ``config.model`` that serves LoRA adapters per request (default: a
            new in-process ``VLLMBackend``, closed at the end).
        fresh: Delete the run directory first instead of resuming.
    """
    con = console()
    out = Path(config.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    reports: list[DataReport] = []
    started = time.monotonic()

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.monotonic() - since, 1)
        con.print(f"[green]done[/green] {name} in {timings[name]} s")
        return time.monotonic()

    t = time.monotonic()
    train = generate_tasks(
        DEFAULT_MIX, config.train_size, seed=config.seed, answer_format=config.answer_format,
        prefix="train-",
    )
    heldout = generate_tasks(
        DEFAULT_MIX, config.eval_size, seed=config.seed + 1000, answer_format=config.answer_format,
        exclude={q.question for q in train}, prefix="eval-",
    )
    _write_tasks(out / "tasks_train.jsonl", train)
    _write_tasks(out / "tasks_eval.jsonl", heldout)
    verifier = Verifier("auto", last_number=config.last_number)
    strict = Verifier("auto")

    own = backend is None

    def start_engine() -> Backend:
        from .backend import make_backend

        with con.status(f"starting the vLLM engine on {config.model!r} (about a minute on a CPU)"):
            return make_backend(config.model, max_model_len=config.max_model_len)

    if own:
        backend = start_engine()
    assert backend is not None
    t = lap("engine start", t)
    sft_result = None
    try:
        pcfg = ProposalConfig(samples=config.proposals, max_tokens=config.proposal_tokens)
        reports.append(
            await sample_proposals(backend, train, pcfg, out / "proposals.jsonl", show_progress=show_progress)
        )
        t = lap("proposals", t)

        rep = DataReport(stage=f"select (top-{config.k} by verifier)")
        proposals = list(read_records(out / "proposals.jsonl", ProposalRecord, rep))
        all_rewards = [verifier.score(r, p.text) for r in proposals for p in r.proposals]
        reports.append(
            await select_proposals(
                proposals, VerifierReward(verifier), SelectConfig(k=config.k), out / "selected.jsonl",
                report=rep, show_progress=show_progress,
            )
        )
        selected = list(read_records(out / "selected.jsonl", ProposalRecord))
        kept_rewards = [p.reward or 0.0 for r in selected for p in r.proposals]
        t = lap("selection", t)

        acfg = AggregationConfig(
            mode=config.mode, samples=config.aggregation_samples, keep=config.keep,
            max_tokens=config.aggregation_tokens, k=config.k,
            temperature=config.aggregation_temperature, last_number=config.last_number,
            append_answer=config.append_answer,
        )
        reports.append(
            await build_aggregations(
                selected, acfg, out / "aggregations.jsonl", backend=backend, verifier=verifier,
                show_progress=show_progress,
            )
        )
        examples = list(read_records(out / "aggregations.jsonl", AggregationRecord))
        t = lap("aggregation targets", t)
        if not examples:
            raise RuntimeError(
                "no aggregation target was accepted by the verifier, so there is nothing to train "
                "on: raise --aggregation-samples or --train-size, or use --mode reference "
                "(pseudo-aggregations) to exercise the rest of the recipe"
            )

        ecfg = ProposalConfig(samples=config.k, max_tokens=config.proposal_tokens)
        reports.append(
            await sample_proposals(
                backend, heldout, ecfg, out / "eval_proposals.jsonl", show_progress=show_progress
            )
        )
        reports[-1].stage = "held-out proposals"
        eval_records = list(read_records(out / "eval_proposals.jsonl", ProposalRecord))
        baselines = _proposal_baselines(eval_records, verifier, config.k)
        before = await evaluate_aggregator(
            backend, eval_records, lora=None, max_tokens=config.aggregation_tokens,
            verifier=verifier, k=config.k, strict=strict,
        )
        t = lap("evaluation before", t)

        sft_config = SFTConfig(
            model=config.model,
            data=(out / "aggregations.jsonl",),
            output_dir=out / "sft",
            max_steps=config.steps,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            lora_r=config.lora_r,
            lora_alpha=2 * config.lora_r,
            warmup_steps=min(3, config.steps // 10),
            save_steps=max(config.steps // 2, 1),
            seed=config.seed,
        )
        if own:
            # Training gets the whole CPU and memory; a fresh engine serves the adapter after.
            await backend.aclose()
            backend = None
        # A worker thread keeps the event loop (and a caller's engine) responsive meanwhile.
        sft_result = await asyncio.to_thread(train_sft, sft_config, show_progress=show_progress)
        t = lap("sft", t)
        if own:
            backend = start_engine()
            t = lap("engine restart", t)

        adapter = str(sft_result.adapter_dir.resolve())
        try:
            after = await evaluate_aggregator(
                backend, eval_records, lora=adapter, max_tokens=config.aggregation_tokens,
                verifier=verifier, k=config.k, strict=strict,
            )
        except BackendUnavailableError:
            if not own:
                raise
            # A CPU shared with other engines can starve ours into an RPC timeout: retry once.
            con.print("[yellow]the engine died; restarting it once[/yellow]")
            await backend.aclose()
            backend = start_engine()
            after = await evaluate_aggregator(
                backend, eval_records, lora=adapter, max_tokens=config.aggregation_tokens,
                verifier=verifier, k=config.k, strict=strict,
            )
        t = lap("evaluation after", t)
        graph_runs = await _through_the_graph(backend, eval_records[:2], adapter, config, verifier)
        t = lap("graph with the adapter", t)
    finally:
        if own and backend is not None:
            await backend.aclose()

    merged_dir = None
    merged_text = None
    if config.merged:
        with con.status("exporting the merged model"):
            merged_dir = export_merged(sft_result.adapter_dir, out / "merged")
            first = eval_records[0]
            merged_text = _merged_check(
                merged_dir,
                aggregation_messages(first.question, first.texts()[: config.k], AFT_TEMPLATE),
                config.aggregation_tokens,
            )
        t = lap("export + merged check", t)
    timings["total"] = round(time.monotonic() - started, 1)

    files = ["proposals.jsonl", "selected.jsonl", "aggregations.jsonl", "aggregations.rejected.jsonl", "eval_proposals.jsonl"]
    summary = {
        "config": json.loads(config.model_dump_json()),
        "files": {name: _count_lines(out / name) for name in files},
        "timings_s": timings,
        "data": [r.to_dict() for r in reports],
        "rewards": {
            "proposals": len(all_rewards),
            "mean_proposal_reward": _mean(all_rewards),
            "proposals_accepted": sum(r >= 1.0 for r in all_rewards),
            "kept_proposals": len(kept_rewards),
            "mean_kept_reward": _mean(kept_rewards),
            "training_examples": len(examples),
            "queries_with_a_target": len({e.query_id for e in examples}),
        },
        "sft": {
            "examples": sft_result.examples,
            "steps": sft_result.steps,
            "first_loss": sft_result.first_loss,
            "last_loss": sft_result.last_loss,
            "window": (w := max(1, min(5, len(sft_result.losses) // 4))),
            "first_mean": _mean([x for _, x in sft_result.losses[:w]]),
            "last_mean": _mean([x for _, x in sft_result.losses[-w:]]),
            "losses": sft_result.losses,
            "adapter": str(sft_result.adapter_dir),
            "runtime_s": round(sft_result.runtime_s, 1),
        },
        "heldout": {
            "questions": len(eval_records),
            **baselines,
            "aggregator_before": _acc(before, "aggregation_score"),
            "aggregator_after": _acc(after, "aggregation_score"),
            "aggregator_before_strict": _acc(before, "aggregation_strict"),
            "aggregator_after_strict": _acc(after, "aggregation_strict"),
            "tagged_before": _acc(before, "aggregation_tagged"),
            "tagged_after": _acc(after, "aggregation_tagged"),
            "direct_before": _acc(before, "direct_score"),
            "direct_after": _acc(after, "direct_score"),
            "outputs_changed": sum(b["aggregation"] != a["aggregation"] for b, a in zip(before, after, strict=True)),
        },
        "merged": {"dir": str(merged_dir) if merged_dir else None, "first_output": merged_text},
        "graph": graph_runs,
        "examples": [
            {
                "question": r.question,
                "answer": r.answer,
                "proposals": r.texts()[: config.k],
                "before": b["aggregation"],
                "after": a["aggregation"],
                "before_score": b["aggregation_score"],
                "after_score": a["aggregation_score"],
            }
            for r, b, a in list(zip(eval_records, before, after, strict=True))[:4]
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (out / "report.md").write_text(render_report(summary))
    con.print(f"[bold green]report:[/bold green] {out / 'report.md'}")
    return summary


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


def render_report(s: dict[str, Any]) -> str:
    """The markdown report of a demo run."""
    c, r, sft, h = s["config"], s["rewards"], s["sft"], s["heldout"]
    lines = [
        "# AFT training demo",
        "",
        f"Model `{c['model']}`; {c['train_size']} training and {c['eval_size']} held-out queries "
        "(reasoning-gym: basic_arithmetic + chain_sum); targets: "
        + ("teacher-free self-aggregation filtered by the verifier" if c["mode"] == "self" else f"pseudo ({c['mode']})")
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
        f"{h['outputs_changed']}/{h['questions']}.",
        "",
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
