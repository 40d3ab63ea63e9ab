"""The AFT recipe: the stages of :mod:`trainer.stages` in order, on one engine, into one run
directory (``aft-train demo`` runs it with the CPU demo's sizes).

1. queries: a seeded reasoning-gym mix (training + held-out), proven disjoint from every
   evaluation suite;
2. proposals: sampled on-policy from the model being trained (vLLM, LoRA serving on);
3. selection: top-K proposals per query by the verifier (reasoning-gym's own ``score_answer``);
4. targets: teacher-free, the model's own aggregations with the inference prompt, kept only when
   the verifier accepts them (rejection sampling); with ``solution_fallback``, the queries left
   without one get a verified answer sampled without the proposals (the AFT paper's targets);
5. SFT: LoRA on (query + proposals -> aggregation), loss on the aggregation tokens only;
6. evaluation on held-out queries, same proposals before and after: greedy aggregation by the base
   model vs. by the base model + adapter (served per request by the same vLLM engine);
7. export: the adapter and a merged model directory (loaded back with transformers as a check);
8. ``report.md`` (+ ``summary.json``) in the run directory.

Every stage resumes on a rerun. The engine is closed while SFT trains (the CPU and memory go to
training) and started again to serve the adapter.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from aft_graph.backends.base import Backend, BackendUnavailableError
from aft_graph.prompts import AFT_TEMPLATE, aggregation_messages
from aft_graph.tasks import Verifier

from . import datapack, stages
from ._run import console
from .config import AggregationConfig, DemoConfig, SFTConfig
from .records import DataReport, ProposalRecord, read_records
from .report import build_summary, render_report

__all__ = ["run_recipe"]


async def run_recipe(
    config: DemoConfig,
    *,
    backend: Backend | None = None,
    fresh: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the recipe; returns the summary (also written to ``summary.json`` and ``report.md``).

    Args:
        config: Model, task mix, sizes and settings.
        backend: An engine on ``config.model`` that serves LoRA adapters per request (default: a
            new in-process ``VLLMBackend``, closed at the end and while SFT trains).
        fresh: Delete the run directory first instead of resuming.
        show_progress: Show progress bars.
    """
    con = console()
    out = Path(config.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    reports: list[DataReport] = []
    started = t = time.monotonic()

    if config.inherit_data is not None:
        restored = datapack.unpack(config.inherit_data, out, only=config.inherit_files)
        if restored:
            con.print(f"inherited from {config.inherit_data}: {', '.join(restored)}")
    if config.data_dir is not None:
        restored = datapack.unpack(config.data_dir, out)
        if restored:
            con.print(f"restored from {config.data_dir}: {', '.join(restored)}")

    def lap(name: str) -> None:
        nonlocal t
        timings[name] = round(time.monotonic() - t, 1)
        con.print(f"[green]done[/green] {name} in {timings[name]} s")
        if config.data_dir is not None:
            datapack.pack(
                out, config.data_dir, config=json.loads(config.model_dump_json()),
                inherited=config.inherit_data,
            )  # fmt: skip
        t = time.monotonic()

    with con.status("queries: generating and checking them against the evaluation suites"):
        q = stages.queries(
            out, config.mix, config.train_size, config.eval_size, seed=config.task_seed,
            answer_format=config.answer_format, eval_suites=config.eval_suites,
        )  # fmt: skip
    lap("queries")
    verifier = Verifier("auto", last_number=config.last_number)
    strict = Verifier("auto")

    own = backend is None

    def start_engine() -> Backend:
        from .backend import make_backend

        with con.status(f"starting the vLLM engine on {config.model!r} (about a minute on a CPU)"):
            return make_backend(config.model, max_model_len=config.max_model_len)

    if own:
        backend = start_engine()
        lap("engine start")
    assert backend is not None
    agg_k = config.aggregation_k or config.k
    eval_kwargs = dict(k=agg_k, max_tokens=config.aggregation_tokens, verifier=verifier, strict=strict)
    try:
        reports.append(
            await stages.proposals(
                backend, q.train[: config.proposal_limit], out / "proposals.jsonl",
                samples=config.proposals,
                max_tokens=config.proposal_tokens, show_progress=show_progress,
            )
        )  # fmt: skip
        lap("proposals")
        report, rewards = await stages.select(out, verifier, config.k, show_progress=show_progress)
        reports.append(report)
        lap("selection")
        acfg = AggregationConfig(
            mode=config.mode, samples=config.aggregation_samples, keep=config.keep,
            max_tokens=config.aggregation_tokens, k=agg_k,
            temperature=config.aggregation_temperature, last_number=config.last_number,
            append_answer=config.append_answer,
            max_agreeing_fraction=config.max_agreeing_fraction, rng_seed=config.seed,
            require_accepted_proposal=config.require_accepted_proposal, copies=config.copies,
        )  # fmt: skip
        report, examples = await stages.targets(backend, out, acfg, verifier, show_progress=show_progress)
        reports.append(report)
        lap("aggregation targets")
        if config.solution_fallback:
            scfg = acfg.model_copy(
                update=dict(mode="solution", samples=config.solution_samples, lora=config.solution_lora)
            )
            report, solutions = await stages.solution_targets(
                backend, out, scfg, verifier, show_progress=show_progress
            )
            reports.append(report)
            examples = examples + solutions
            lap("solution targets")

        report = await stages.proposals(
            backend, q.heldout, out / "eval_proposals.jsonl", samples=config.heldout_samples or config.k,
            max_tokens=config.proposal_tokens, show_progress=show_progress,
        )  # fmt: skip
        report.stage = "held-out proposals"
        reports.append(report)
        heldout = list(read_records(out / "eval_proposals.jsonl", ProposalRecord))
        baselines = stages.proposal_baselines(heldout, verifier, agg_k)
        n_heldout = config.heldout_samples or config.k
        if n_heldout != agg_k:  # voting over every held-out sample: the larger SC baseline
            more = stages.proposal_baselines(heldout, verifier, n_heldout)
            baselines |= {f"{key}@{n_heldout}": value for key, value in more.items()}
        before = await stages.evaluate(
            backend, heldout, out / "heldout_base.json", lora=None, **eval_kwargs
        )
        lap("evaluation before")

        if own:
            # Training gets the whole CPU and memory; a fresh engine serves the adapter after.
            await backend.aclose()
            backend = None
        sft_result = await stages.sft(_sft_config(config, out), show_progress=show_progress)
        lap("sft")
        if own:
            backend = start_engine()
            lap("engine restart")

        adapter = str(sft_result.adapter_dir.resolve())
        after_path = out / "heldout_adapter.json"
        try:
            after = await stages.evaluate(backend, heldout, after_path, lora=adapter, **eval_kwargs)
        except BackendUnavailableError:
            if not own:
                raise
            # A CPU shared with other engines can starve ours into an RPC timeout: retry once.
            con.print("[yellow]the engine died; restarting it once[/yellow]")
            await backend.aclose()
            backend = start_engine()
            after = await stages.evaluate(backend, heldout, after_path, lora=adapter, **eval_kwargs)
        lap("evaluation after")
        votes = {f"majority of {agg_k}": stages.vote_scores(heldout, verifier, agg_k)}
        if n_heldout != agg_k:
            votes[f"majority of {n_heldout}"] = stages.vote_scores(heldout, verifier, n_heldout)
        paired = stages.paired_comparisons(after, before, votes)
        graph = await stages.graph_runs(
            backend, heldout[:2], adapter, k=agg_k, proposal_tokens=config.proposal_tokens,
            aggregation_tokens=config.aggregation_tokens, verifier=verifier,
        )  # fmt: skip
        lap("graph with the adapter")
    finally:
        if own and backend is not None:
            await backend.aclose()

    merged_dir = merged_text = None
    if config.merged:
        with con.status("exporting the merged model"):
            first = heldout[0]
            merged_dir, merged_text = stages.export(
                sft_result.adapter_dir, out / "merged",
                check_messages=aggregation_messages(first.question, first.texts()[:agg_k], AFT_TEMPLATE),
                max_tokens=config.aggregation_tokens,
            )  # fmt: skip
        lap("export + merged check")
    timings["total"] = round(time.monotonic() - started, 1)

    summary = build_summary(
        json.loads(config.model_dump_json()), out, timings=timings, reports=reports,
        rewards=rewards, examples=examples, sft_result=sft_result, heldout=heldout,
        baselines=baselines, before=before, after=after, merged_dir=merged_dir,
        merged_text=merged_text, graph=graph, checked=q.checked, paired=paired,
    )  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (out / "report.md").write_text(render_report(summary))
    con.print(f"[bold green]report:[/bold green] {out / 'report.md'}")
    return summary


def _sft_config(config: DemoConfig, out: Path) -> SFTConfig:
    return SFTConfig(
        model=config.model,
        data=(out / "aggregations.jsonl",)
        + ((out / stages.SOLUTION_TARGETS,) if config.solution_fallback else ()),
        output_dir=out / "sft",
        max_steps=config.steps,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        learning_rate=config.learning_rate,
        lora_r=config.lora_r,
        lora_alpha=2 * config.lora_r,
        warmup_steps=min(3, config.steps // 10),
        save_steps=max(config.steps // 2, 1),
        seed=config.seed,
        drop_copies=config.copies == "reject",
    )
