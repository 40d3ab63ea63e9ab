"""A fresh held-out draw for an AFT recipe: new questions, new base-model proposals, the untrained
and the trained aggregator on them, paired. It confirms (or not) a margin measured on the recipe's
own held-out set, which also served to choose between adapters.

The questions come from the recipe's families with another generator seed, are kept disjoint (by
question and by reasoning-gym item seed) from the recipe's training and held-out queries and from
every evaluation suite. Every stage resumes from the files it wrote under ``--out``.

Run (52 min on a 2-core AVX2 CPU for 100 questions; after restoring the recipe's run directory, e.g. by
``aft-train heldout --config recipes/aft-solve.json ...`` or ``aft-train demo``)::

    aft-train export --adapter aft --out runs/aft-merged
    python benchmarks/aft_confirm.py --config recipes/aft-solve.json --model runs/aft-merged \
        --n 100 --seed 1300000 --out runs/aft-confirm

Another aggregator on the same draw (its own rows file, paired with the first one's too)::

    python benchmarks/aft_confirm.py --config recipes/aft-solve.json --model runs/aft-plain/merged \
        --rows heldout_plain.json --against heldout_trained.json --out runs/aft-confirm
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from aft_graph.tasks import Verifier, assert_disjoint, evaluation_suites
from trainer import stages
from trainer.backend import make_backend
from trainer.config import DemoConfig
from trainer.records import JsonlWriter, ProposalRecord, TaskRecord, read_records
from trainer.report import paired_table
from trainer.tasks import generate_tasks


def _questions(cfg: DemoConfig, run: Path, n: int, seed: int, out: Path) -> list[TaskRecord]:
    path = out / "tasks_confirm.jsonl"
    if path.is_file():
        return list(read_records(path, TaskRecord))
    used = [r for name in ("tasks_train.jsonl", "tasks_eval.jsonl") for r in read_records(run / name, TaskRecord)]
    suites = evaluation_suites(cfg.eval_suites)
    exclude = [t.question for s in suites for t in s] + [r.question for r in used]
    tasks = generate_tasks(
        cfg.mix, n, seed=seed, answer_format=cfg.answer_format, exclude=exclude, prefix="confirm-"
    )
    assert_disjoint(tasks, used, names=("confirmation", "recipe's training and held-out"))
    for suite in suites:
        assert_disjoint(tasks, suite, names=("confirmation", f"evaluation suite {suite.name}"))
    out.mkdir(parents=True, exist_ok=True)
    with JsonlWriter(path, overwrite=True) as w:
        w.write_all(tasks)
    return tasks


def main(
    config: Annotated[Path, typer.Option(help="The recipe (its families, model and budgets).")],
    model: Annotated[str, typer.Option(help="The trained aggregator: a merged model directory.")],
    out: Annotated[Path, typer.Option(help="Directory for this draw's files (resumable).")] = Path("runs/aft-confirm"),
    n: Annotated[int, typer.Option(help="Questions.")] = 100,
    seed: Annotated[int, typer.Option(help="Generator seed (not the recipe's).")] = 1_300_000,
    rows: Annotated[str, typer.Option(help="Rows file (in --out) for this model's aggregations: one per model, e.g. heldout_plain.json.")] = "heldout_trained.json",
    against: Annotated[list[str] | None, typer.Option(help="Rows of another trained aggregator on this draw (in --out), paired too (repeatable).")] = None,
) -> None:
    cfg = DemoConfig(**json.loads(config.read_text()))
    if seed in (cfg.task_seed, cfg.task_seed + stages.HELDOUT_SEED_OFFSET):
        raise typer.BadParameter(f"--seed {seed} is one of the recipe's own seeds: pick another")
    others = {}
    for name in against or []:
        if not (out / name).is_file():
            raise typer.BadParameter(f"--against {name}: no such rows file in {out}")
        others[name.removesuffix(".json").removeprefix("heldout_")] = json.loads((out / name).read_text())["rows"]
    tasks = _questions(cfg, Path(cfg.out), n, seed, out)
    verifier, strict = Verifier("auto", last_number=cfg.last_number), Verifier("auto")
    k, n_all = cfg.aggregation_k or cfg.k, cfg.heldout_samples or cfg.k
    kwargs = dict(k=k, max_tokens=cfg.aggregation_tokens, verifier=verifier, strict=strict)

    async def run() -> tuple[list, list, list]:
        backend = make_backend(cfg.model, max_model_len=cfg.max_model_len)
        try:
            await stages.proposals(
                backend, tasks, out / "proposals.jsonl", samples=n_all, max_tokens=cfg.proposal_tokens
            )
            records = list(read_records(out / "proposals.jsonl", ProposalRecord))
            before = await stages.evaluate(
                backend, records, out / "heldout_base.json", lora=None, direct=False, **kwargs
            )
        finally:
            await backend.aclose()
        backend = make_backend(model, max_model_len=cfg.max_model_len)
        try:
            after = await stages.evaluate(
                backend, records, out / rows, lora=None, direct=False, model=model, **kwargs
            )
        finally:
            await backend.aclose()
        return records, before, after

    records, before, after = asyncio.run(run())
    votes = {f"majority of {m}": stages.vote_scores(records, verifier, m) for m in sorted({k, n_all})}
    ids = [r.id for r in records]
    full = {}
    for name, rs in others.items():
        by_id = {r["id"]: r for r in rs}
        if set(by_id) != set(ids):
            raise typer.BadParameter(f"--against heldout_{name}.json scores other questions than this draw's")
        full[name] = [float(by_id[i]["aggregation_score"] >= 1.0) for i in ids]
    paired = stages.paired_comparisons(after, before, {**full, **votes})
    accuracy = sum(r["aggregation_score"] >= 1.0 for r in after) / len(after)
    typer.echo(f"trained aggregator {accuracy:.3f} on {len(after)} fresh held-out questions (K={k})")
    typer.echo("\n".join(paired_table(paired, "trained minus baseline")))
    (out / f"paired_{Path(rows).stem}.json").write_text(json.dumps({"accuracy": accuracy, "paired": paired}, indent=2))


if __name__ == "__main__":
    typer.run(main)
