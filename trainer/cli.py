"""``aft-train``: build the AFT aggregator, stage by stage or all at once (``demo``).

Stages read and write jsonl and resume when rerun::

    aft-train tasks --out data/tasks.jsonl --size 256
    aft-train proposals --tasks data/tasks.jsonl --out data/proposals.jsonl --model small
    aft-train proposals --from-data ultrafeedback.jsonl --out data/proposals.jsonl  # off-policy
    aft-train select --data data/proposals.jsonl --out data/selected.jsonl --k 4
    aft-train aggregations --data data/selected.jsonl --out data/aggregations.jsonl --mode self
    aft-train sft --data data/aggregations.jsonl --out runs/aft --model small
    aft-train export --adapter runs/aft/adapter --out runs/aft/merged --merged
    aft-train demo --out runs/train-demo
    aft-train heldout --config recipes/aft-default.json --template aft-vote   # a prompt ablation
    aft-train compare heldout_aft_merged_direct.json --config recipes/aft-self.json   # paired table

Every command also takes ``--config FILE.json`` with fields of its configuration class
(:mod:`trainer.config`); options given on the command line win. ``accelerate launch -m trainer sft
...`` runs the SFT stage on several devices.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .config import (
    AggregationConfig,
    DemoConfig,
    OffPolicyConfig,
    ProposalConfig,
    SelectConfig,
    SFTConfig,
    help_of,
)

app = typer.Typer(
    name="aft-train",
    help="Build the AFT aggregator: proposals -> selection -> aggregation targets -> LoRA SFT -> export.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="JSON file with fields of this stage's config.")
]
Engine = Annotated[
    str, typer.Option("--engine", help="vllm (in-process, LoRA serving), hf (transformers) or openai.")
]
BaseUrl = Annotated[
    list[str] | None,
    typer.Option(
        "--base-url",
        help="OpenAI-compatible server (engine=openai); repeat it for a fleet of servers.",
    ),
]
MaxLen = Annotated[int, typer.Option("--max-model-len", help="Engine context window.")]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Start the output afresh instead of resuming.")
]


def _h(config: type, field: str) -> str:
    return help_of(config, field)


def _build(cls, config_file: Path | None, **options: Any):
    """A config from a JSON file overlaid with the options given (None = not given)."""
    data: dict[str, Any] = {}
    if config_file is not None:
        data.update(json.loads(Path(config_file).read_text()))
    data.update({k: v for k, v in options.items() if v is not None})
    try:
        return cls(**data)
    except Exception as exc:
        raise typer.BadParameter(str(exc)) from exc


def _terminate_gracefully() -> None:
    """Turn SIGTERM into SystemExit so the engine's clean-up runs (no orphaned vLLM processes)."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _print_report(report) -> None:
    report.print()


async def _with_backend(model: str, engine: str, base_url: list[str] | None, max_len: int, fn):
    from .backend import make_backend

    backend = make_backend(model, engine=engine, base_url=base_url, max_model_len=max_len)  # type: ignore[arg-type]
    try:
        return await fn(backend)
    finally:
        await backend.aclose()


@app.command()
def tasks(
    out: Annotated[Path, typer.Option(help="Output jsonl of TaskRecords.")],
    size: Annotated[int, typer.Option(help="Number of queries.")] = 64,
    seed: Annotated[int, typer.Option(help="Generator seed (another seed: a held-out set).")] = 0,
    mix: Annotated[
        str | None,
        typer.Option(help="Comma-separated reasoning-gym data sets with default configs "
                     "(default: simple basic_arithmetic + chain_sum)."),
    ] = None,
    answer_format: Annotated[str, typer.Option(help="tag, boxed or none.")] = "tag",
) -> None:
    """Generate verifiable queries offline with reasoning-gym."""
    from .records import JsonlWriter
    from .tasks import DEFAULT_MIX, TaskSpec, generate_tasks

    specs = tuple(TaskSpec(name=n.strip()) for n in mix.split(",")) if mix else DEFAULT_MIX
    records = generate_tasks(specs, size, seed=seed, answer_format=answer_format)
    with JsonlWriter(out, overwrite=True) as writer:
        writer.write_all(records)
    typer.echo(f"wrote {len(records)} queries to {out}")


@app.command()
def proposals(
    out: Annotated[Path, typer.Option(help="Output jsonl of ProposalRecords.")],
    tasks: Annotated[
        Path | None, typer.Option(help="On-policy: jsonl of queries (TaskRecords: id, question[, answer, task]).")
    ] = None,
    model: Annotated[str, typer.Option(help="Model being trained: small, default, a directory, or a served name.")] = "small",
    from_data: Annotated[str | None, typer.Option("--from-data", help=_h(OffPolicyConfig, "source"))] = None,
    prompt_field: Annotated[str | None, typer.Option(help=_h(OffPolicyConfig, "prompt_field"))] = None,
    responses_field: Annotated[str | None, typer.Option(help=_h(OffPolicyConfig, "responses_field"))] = None,
    response_key: Annotated[str | None, typer.Option(help=_h(OffPolicyConfig, "response_key"))] = None,
    score_key: Annotated[str | None, typer.Option(help=_h(OffPolicyConfig, "score_key"))] = None,
    answer_field: Annotated[str | None, typer.Option(help=_h(OffPolicyConfig, "answer_field"))] = None,
    limit: Annotated[int | None, typer.Option(help=_h(OffPolicyConfig, "limit"))] = None,
    mode: Annotated[str | None, typer.Option(help=_h(ProposalConfig, "mode"))] = None,
    samples: Annotated[int | None, typer.Option(help=_h(ProposalConfig, "samples"))] = None,
    temperature: Annotated[float | None, typer.Option(help=_h(ProposalConfig, "temperature"))] = None,
    top_k: Annotated[int | None, typer.Option(help=_h(ProposalConfig, "top_k"))] = None,
    top_p: Annotated[float | None, typer.Option(help=_h(ProposalConfig, "top_p"))] = None,
    max_tokens: Annotated[int | None, typer.Option(help=_h(ProposalConfig, "max_tokens"))] = None,
    seed: Annotated[int | None, typer.Option(help=_h(ProposalConfig, "seed"))] = None,
    lora: Annotated[str | None, typer.Option(help=_h(ProposalConfig, "lora"))] = None,
    engine: Engine = "vllm",
    base_url: BaseUrl = None,
    max_model_len: MaxLen = 2048,
    overwrite: Overwrite = False,
    config: ConfigFile = None,
) -> None:
    """Proposals: sample on-policy from the model (--tasks) or load off-policy (--from-data)."""
    from .proposals import sample_proposals, write_offpolicy
    from .records import DataReport, TaskRecord, read_records

    if from_data:
        cfg = _build(
            OffPolicyConfig, config, source=from_data, prompt_field=prompt_field,
            responses_field=responses_field, response_key=response_key, score_key=score_key,
            answer_field=answer_field, limit=limit,
        )
        _print_report(write_offpolicy(cfg, out, overwrite=overwrite))
        return
    if tasks is None:
        raise typer.BadParameter("give --tasks FILE (on-policy sampling) or --from-data SOURCE (off-policy)")
    cfg = _build(
        ProposalConfig, config, mode=mode, samples=samples, temperature=temperature, top_k=top_k,
        top_p=top_p, max_tokens=max_tokens, seed=seed, lora=lora,
    )
    rep = DataReport(stage="tasks")
    queries = list(read_records(tasks, TaskRecord, rep))
    if rep.skipped:
        rep.kept = len(queries)
        _print_report(rep)
    _terminate_gracefully()
    report = asyncio.run(
        _with_backend(
            model, engine, base_url, max_model_len,
            lambda b: sample_proposals(b, queries, cfg, out, overwrite=overwrite),
        )
    )
    _print_report(report)


@app.command()
def select(
    data: Annotated[Path, typer.Option(help="Input jsonl of ProposalRecords.")],
    out: Annotated[Path, typer.Option(help="Output jsonl: the top-K proposals per query, with rewards.")],
    k: Annotated[int | None, typer.Option(help=_h(SelectConfig, "k"))] = None,
    reward: Annotated[str | None, typer.Option(help=_h(SelectConfig, "reward"))] = None,
    min_reward: Annotated[float | None, typer.Option(help=_h(SelectConfig, "min_reward"))] = None,
    reward_model: Annotated[str | None, typer.Option(help=_h(SelectConfig, "reward_model"))] = None,
    judge_model: Annotated[str | None, typer.Option(help="reward=judge: the judge model (small, default, a directory or served name).")] = None,
    order: Annotated[str | None, typer.Option(help=_h(SelectConfig, "order"))] = None,
    last_number: Annotated[bool | None, typer.Option("--last-number/--strict", help=_h(SelectConfig, "last_number"))] = None,
    answer_format: Annotated[str | None, typer.Option(help=_h(SelectConfig, "answer_format"))] = None,
    engine: Engine = "vllm",
    base_url: BaseUrl = None,
    max_model_len: MaxLen = 2048,
    overwrite: Overwrite = False,
    config: ConfigFile = None,
) -> None:
    """Keep the top-K proposals per query by a reward (verifier, reward model, judge, data set)."""
    from .records import DataReport, ProposalRecord, read_records
    from .select import make_reward, select_proposals

    cfg = _build(
        SelectConfig, config, k=k, reward=reward, min_reward=min_reward, reward_model=reward_model,
        order=order, answer_format=answer_format, last_number=last_number,
    )
    rep = DataReport(stage=f"select (top-{cfg.k} by {cfg.reward})")
    records = list(read_records(data, ProposalRecord, rep))

    async def run(backend=None):
        return await select_proposals(records, make_reward(cfg, backend), cfg, out, overwrite=overwrite, report=rep)

    if cfg.reward == "judge":
        if not judge_model:
            raise typer.BadParameter("--reward judge needs --judge-model")
        report = asyncio.run(_with_backend(judge_model, engine, base_url, max_model_len, run))
    else:
        report = asyncio.run(run())
    _print_report(report)


@app.command()
def aggregations(
    data: Annotated[Path, typer.Option(help="Input jsonl of (selected) ProposalRecords.")],
    out: Annotated[Path, typer.Option(help="Output jsonl of AggregationRecords (training examples).")],
    mode: Annotated[str | None, typer.Option(help=_h(AggregationConfig, "mode"))] = None,
    model: Annotated[str, typer.Option(help="mode=self: the model being trained; mode=teacher: the teacher model.")] = "small",
    samples: Annotated[int | None, typer.Option(help=_h(AggregationConfig, "samples"))] = None,
    keep: Annotated[int | None, typer.Option(help=_h(AggregationConfig, "keep"))] = None,
    verify: Annotated[bool | None, typer.Option("--verify/--no-verify", help=_h(AggregationConfig, "verify"))] = None,
    temperature: Annotated[float | None, typer.Option(help=_h(AggregationConfig, "temperature"))] = None,
    max_tokens: Annotated[int | None, typer.Option(help=_h(AggregationConfig, "max_tokens"))] = None,
    template: Annotated[str | None, typer.Option(help=_h(AggregationConfig, "template"))] = None,
    k: Annotated[int | None, typer.Option(help=_h(AggregationConfig, "k"))] = None,
    seed: Annotated[int | None, typer.Option(help=_h(AggregationConfig, "seed"))] = None,
    lora: Annotated[str | None, typer.Option(help=_h(AggregationConfig, "lora"))] = None,
    last_number: Annotated[bool | None, typer.Option("--last-number/--strict", help=_h(AggregationConfig, "last_number"))] = None,
    skip_targeted: Annotated[Path | None, typer.Option(help="Leave out the queries that already have a target in this jsonl of AggregationRecords (e.g. --mode solution after --mode self).")] = None,
    engine: Engine = "vllm",
    base_url: BaseUrl = None,
    max_model_len: MaxLen = 2048,
    overwrite: Overwrite = False,
    config: ConfigFile = None,
) -> None:
    """Aggregation targets: teacher, teacher-free (self + verifier, or verified solutions), or
    pseudo (ablations)."""
    from .aggregations import build_aggregations
    from .records import DataReport, ProposalRecord, read_records

    cfg = _build(
        AggregationConfig, config, mode=mode, samples=samples, keep=keep, verify=verify,
        temperature=temperature, max_tokens=max_tokens, template=template, k=k, seed=seed, lora=lora,
        last_number=last_number,
    )
    rep = DataReport(stage="selected proposals")
    records = list(read_records(data, ProposalRecord, rep))
    if rep.skipped:
        rep.kept = len(records)
        _print_report(rep)
    if skip_targeted is not None:
        from .records import AggregationRecord

        targeted = {r.query_id for r in read_records(skip_targeted, AggregationRecord)}
        records = [r for r in records if r.id not in targeted]
        typer.echo(f"{len(targeted)} queries already have a target in {skip_targeted}: {len(records)} left")
    if cfg.mode in ("reference", "proposal"):
        report = asyncio.run(build_aggregations(records, cfg, out, overwrite=overwrite))
    else:
        _terminate_gracefully()
        report = asyncio.run(
            _with_backend(
                model, engine, base_url, max_model_len,
                lambda b: build_aggregations(records, cfg, out, backend=b, overwrite=overwrite),
            )
        )
    _print_report(report)


@app.command()
def sft(
    data: Annotated[list[Path], typer.Option(help=_h(SFTConfig, "data"))],
    out: Annotated[Path, typer.Option(help=_h(SFTConfig, "output_dir"))],
    model: Annotated[str | None, typer.Option(help=_h(SFTConfig, "model"))] = None,
    input_mode: Annotated[str | None, typer.Option(help=_h(SFTConfig, "input_mode"))] = None,
    plain_fraction: Annotated[float | None, typer.Option(help=_h(SFTConfig, "plain_fraction"))] = None,
    plain_data: Annotated[Path | None, typer.Option(help=_h(SFTConfig, "plain_data"))] = None,
    max_seq_len: Annotated[int | None, typer.Option(help=_h(SFTConfig, "max_seq_len"))] = None,
    lora_r: Annotated[int | None, typer.Option(help=_h(SFTConfig, "lora_r"))] = None,
    lora_alpha: Annotated[int | None, typer.Option(help=_h(SFTConfig, "lora_alpha"))] = None,
    init_adapter: Annotated[str | None, typer.Option(help=_h(SFTConfig, "init_adapter"))] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help=_h(SFTConfig, "learning_rate"))] = None,
    epochs: Annotated[float | None, typer.Option(help=_h(SFTConfig, "epochs"))] = None,
    max_steps: Annotated[int | None, typer.Option("--steps", help=_h(SFTConfig, "max_steps"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=_h(SFTConfig, "batch_size"))] = None,
    grad_accum: Annotated[int | None, typer.Option(help=_h(SFTConfig, "grad_accum"))] = None,
    save_steps: Annotated[int | None, typer.Option(help=_h(SFTConfig, "save_steps"))] = None,
    resume: Annotated[bool | None, typer.Option("--resume/--no-resume", help=_h(SFTConfig, "resume"))] = None,
    seed: Annotated[int | None, typer.Option(help=_h(SFTConfig, "seed"))] = None,
    config: ConfigFile = None,
) -> None:
    """LoRA SFT on (query + proposals -> aggregation), loss on the aggregation tokens only."""
    from .sft import train_sft

    cfg = _build(
        SFTConfig, config, data=tuple(data), output_dir=out, model=model, input_mode=input_mode,
        plain_fraction=plain_fraction, plain_data=plain_data, max_seq_len=max_seq_len,
        lora_r=lora_r, lora_alpha=lora_alpha, init_adapter=init_adapter,
        learning_rate=learning_rate, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        grad_accum=grad_accum, save_steps=save_steps,
        resume=resume, seed=seed,
    )
    result = train_sft(cfg)
    if result.report is not None:
        result.report.print()
    typer.echo(
        f"trained {result.steps} steps on {result.examples} examples; loss "
        f"{result.first_loss} -> {result.last_loss}; adapter: {result.adapter_dir}"
    )


@app.command()
def export(
    adapter: Annotated[str, typer.Option(help="The adapter directory `aft-train sft` wrote, or a shipped adapter's name (aft).")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    merged: Annotated[bool, typer.Option("--merged/--adapter-only", help="Write a merged model (default) or copy the adapter.")] = True,
    base_model: Annotated[str | None, typer.Option(help="Base model (default: the adapter's own).")] = None,
    dtype: Annotated[str, typer.Option(help="Merged weights dtype (float32 keeps small deltas).")] = "float32",
    max_rank: Annotated[int | None, typer.Option(help="Refuse adapters above this rank (vLLM max_lora_rank).")] = None,
) -> None:
    """Export the adapter (served per request) or a merged model directory (a plain model path)."""
    from aft_graph.adapters import SHIPPED_ADAPTERS, resolve_adapter

    from .export import export_adapter, export_merged

    if adapter in SHIPPED_ADAPTERS and not Path(adapter).exists():
        # A shipped adapter records its base model by name: the embedded model it was trained on.
        base_model = base_model or SHIPPED_ADAPTERS[adapter].model
    adapter = resolve_adapter(adapter)
    if merged:
        path = export_merged(adapter, out, base_model=base_model, dtype=dtype)
        typer.echo(f"merged model written to {path} (load it as a model path)")
    else:
        path = export_adapter(adapter, out, max_rank=max_rank)
        typer.echo(f"adapter copied to {path} (GenerationRequest(lora='{path}'))")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help=_h(DemoConfig, "out"))] = Path("runs/train-demo"),
    model: Annotated[str | None, typer.Option(help=_h(DemoConfig, "model"))] = None,
    train_size: Annotated[int | None, typer.Option(help=_h(DemoConfig, "train_size"))] = None,
    eval_size: Annotated[int | None, typer.Option(help=_h(DemoConfig, "eval_size"))] = None,
    proposals: Annotated[int | None, typer.Option(help=_h(DemoConfig, "proposals"))] = None,
    k: Annotated[int | None, typer.Option(help=_h(DemoConfig, "k"))] = None,
    aggregation_samples: Annotated[int | None, typer.Option(help=_h(DemoConfig, "aggregation_samples"))] = None,
    mode: Annotated[str | None, typer.Option(help=_h(DemoConfig, "mode"))] = None,
    steps: Annotated[int | None, typer.Option(help=_h(DemoConfig, "steps"))] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="SFT learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help=_h(DemoConfig, "seed"))] = None,
    merged: Annotated[bool | None, typer.Option("--merged/--no-merged", help=_h(DemoConfig, "merged"))] = None,
    last_number: Annotated[bool | None, typer.Option("--last-number/--strict", help=_h(DemoConfig, "last_number"))] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete the run directory first (default: resume).")] = False,
    config: ConfigFile = None,
) -> None:
    """The whole recipe on the small model over a reasoning-gym mix; writes OUT/report.md."""
    from .recipe import run_recipe

    cfg = _build(
        DemoConfig, config, out=out, model=model, train_size=train_size, eval_size=eval_size,
        proposals=proposals, k=k, aggregation_samples=aggregation_samples, mode=mode, steps=steps,
        learning_rate=learning_rate, seed=seed, merged=merged, last_number=last_number,
    )
    _terminate_gracefully()
    summary = asyncio.run(run_recipe(cfg, fresh=fresh))
    h, s = summary["heldout"], summary["sft"]
    typer.echo(
        f"loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}; held-out aggregator accuracy "
        f"{h['aggregator_before']:.2f} -> {h['aggregator_after']:.2f}; "
        f"total {summary['timings_s']['total']} s"
    )


def _heldout_run(cfg: DemoConfig, config: Path) -> Path:
    """The recipe's run directory with its held-out proposals and untrained rows restored from
    its data directories (an inherited recipe's included)."""
    from . import datapack

    out = Path(cfg.out)
    if cfg.inherit_data is not None:
        datapack.unpack(cfg.inherit_data, out, only=cfg.inherit_files)
    if cfg.data_dir is not None:
        datapack.unpack(cfg.data_dir, out)
    if not (out / "eval_proposals.jsonl").is_file() or not (out / "heldout_base.json").is_file():
        raise typer.BadParameter(
            f"{out} has no held-out proposals or untrained-aggregator rows: run `aft-train demo "
            f"--config {config}` (or `make train-aft`) through its 'evaluation before' stage first"
        )
    return out


def _votes(records, verifier, k: int, n_all: int, kind: str = "") -> dict[str, list[float]]:
    """Per-question scores of the majority vote of the first ``k`` proposals and of all ``n_all``."""
    from . import stages

    votes = {f"majority of {k}{kind}": stages.vote_scores(records, verifier, k)}
    if n_all != k:
        votes[f"majority of {n_all}{kind}"] = stages.vote_scores(records, verifier, n_all)
    return votes


@app.command()
def heldout(
    config: Annotated[Path, typer.Option("--config", help="The recipe's JSON file (its run directory, data directory, model, widths and token budget).")],
    template: Annotated[str, typer.Option(help="Aggregation prompt (aft_graph.prompts.TEMPLATES): aft, aft-vote, rsa.")] = "aft",
    adapter: Annotated[str | None, typer.Option(help="Aggregator adapter: a shipped adapter's name or a directory (default: the base model).")] = None,
    model: Annotated[str | None, typer.Option(help="Aggregate with this model instead of the recipe's (e.g. an adapter's merged directory from `aft-train export`: LoRA serving on a CPU is about 2.5x slower).")] = None,
    base_url: Annotated[list[str] | None, typer.Option(help="A running OpenAI-compatible server (repeatable: a fleet) serving --model (or the recipe's model) instead of an in-process engine.")] = None,
    direct: Annotated[bool, typer.Option("--direct/--no-direct", help="Also answer each question directly (single call, no proposals).")] = False,
    own_proposals: Annotated[bool, typer.Option("--own-proposals/--base-proposals", help="Sample the held-out proposals with the evaluated model too (the whole AFT pipeline on one model, as the AFT paper runs it; same count, seeds and budget as the recipe's), instead of aggregating the base model's stored ones. Paired against the base model's pipeline on the same questions.")] = False,
) -> None:
    """Ablate the aggregator on a recipe's stored held-out proposals: greedy aggregation with another
    prompt and/or adapter, paired against the recipe's untrained aggregator and the votes of the
    same proposals. Rows go to the run directory and are packed into the data directory.

    With ``--own-proposals`` the evaluated model also writes the proposals, and the comparison is
    pipeline against pipeline at the same calls: votes of both models' proposals are listed."""
    from aft_graph.adapters import resolve_adapter
    from aft_graph.prompts import TEMPLATES
    from aft_graph.tasks import Verifier

    from . import datapack, stages
    from .aggregations import copies_proposal
    from .backend import make_backend
    from .records import ProposalRecord, TaskRecord, read_records

    cfg = _build(DemoConfig, config)
    if template not in TEMPLATES:
        raise typer.BadParameter(f"unknown template {template!r}: choose from {sorted(TEMPLATES)}")
    out = _heldout_run(cfg, config)
    base_rows = out / "heldout_base.json"
    base_records = list(read_records(out / "eval_proposals.jsonl", ProposalRecord))
    records = base_records
    verifier = Verifier("auto", last_number=cfg.last_number)
    k = cfg.aggregation_k or cfg.k
    n_all = cfg.heldout_samples or cfg.k
    lora = str(resolve_adapter(adapter)) if adapter else None
    if own_proposals and not (model or adapter):
        raise typer.BadParameter(
            "--own-proposals samples proposals with the evaluated model: give --model (a merged "
            "directory) or --adapter; the base model's own proposals are the recipe's stored ones"
        )
    tag = "_".join(
        ([Path(adapter).name] if adapter else []) + ([Path(model).name] if model else [])
    )  # fmt: skip
    own_path = out / f"eval_proposals_{tag}.jsonl"
    name = "heldout_" + "_".join(
        [template]
        + ([tag] if tag else [])
        + (["direct"] if direct else [])
        + (["own-proposals"] if own_proposals else [])
    ) + ".json"  # fmt: skip
    served = model or cfg.model
    if base_url and model and Path(model).is_dir():
        served = str(Path(model).resolve())  # vLLM's server names a model by its path

    async def main() -> list[dict[str, Any]]:
        nonlocal records
        if base_url:
            backend = make_backend(served, engine="openai", base_url=base_url)
        else:
            backend = make_backend(served, max_model_len=cfg.max_model_len)
        try:
            if own_proposals:
                records = await stages.own_heldout_proposals(
                    backend, list(read_records(out / "tasks_eval.jsonl", TaskRecord)), base_records,
                    own_path, samples=n_all, max_tokens=cfg.proposal_tokens, lora=lora,
                )  # fmt: skip
            return await stages.evaluate(
                backend, records, out / name, lora=lora, k=k, max_tokens=cfg.aggregation_tokens,
                verifier=verifier, strict=Verifier("auto"), template=template, direct=direct,
                model=model,
            )  # fmt: skip
        finally:
            await backend.aclose()

    _terminate_gracefully()
    try:
        rows = asyncio.run(main())
    except ValueError as exc:  # e.g. the rows file holds another model's rows
        raise typer.BadParameter(str(exc)) from exc
    before = json.loads(base_rows.read_text())["rows"]
    sources = [(" (base proposals)" if own_proposals else "", base_records)]
    if own_proposals:
        sources.append((" (own proposals)", records))
    votes = {}
    for kind, recs in sources:
        votes |= _votes(recs, verifier, k, n_all, kind)
    paired = stages.paired_comparisons(rows, before, votes)
    if own_proposals:  # the baseline row is then the base model's whole pipeline
        paired = {"base model, AFT on its own proposals": paired.pop("untrained aggregator"), **paired}
    if cfg.data_dir is not None:
        datapack.pack(
            out, cfg.data_dir, config=json.loads(cfg.model_dump_json()), inherited=cfg.inherit_data
        )
    accuracy = sum(r["aggregation_score"] >= 1.0 for r in rows) / len(rows)
    copies = sum(copies_proposal(r["aggregation"], rec.texts()[:k]) for r, rec in zip(rows, records, strict=True))
    typer.echo(
        f"{name}: aggregator accuracy {accuracy:.3f} on {len(rows)} held-out queries; "
        f"{copies} aggregations copy a proposal verbatim"
    )
    for kind, recs in sources:
        mean = stages.proposal_baselines(recs, verifier, n_all)["proposal_accuracy"]
        typer.echo(f"proposals{kind or ''}: {mean:.3f} right per sample")
    if direct:
        base_direct = sum(r.get("direct_score", 0.0) >= 1.0 for r in before) / len(before)
        own = sum(r["direct_score"] >= 1.0 for r in rows) / len(rows)
        typer.echo(f"direct answers: {own:.3f} (the recipe's base model: {base_direct:.3f})")
    from .report import paired_table

    typer.echo("\n".join(paired_table(paired)))


@app.command()
def compare(
    rows: Annotated[list[str], typer.Argument(help="Held-out rows written by `aft-train heldout` (e.g. heldout_aft_merged_direct.json): a file name in the recipe's run directory (restored from its data directories) or a path. The first is compared with each of the others.")],
    config: Annotated[Path, typer.Option("--config", help="The recipe whose held-out questions and proposals the rows score.")],
) -> None:
    """Compare held-out aggregators on the same questions and proposals: the first rows, paired (95%
    BCa), against the recipe's untrained aggregator, each other rows file and the votes; then every
    aggregator's questions right by how many of its proposals were right."""
    import gzip

    from aft_graph.tasks import Verifier

    from . import stages
    from .records import ProposalRecord, read_records
    from .report import breakdown_table, paired_table

    cfg = _build(DemoConfig, config)
    out = _heldout_run(cfg, config)
    records = list(read_records(out / "eval_proposals.jsonl", ProposalRecord))
    ids = [r.id for r in records]

    def load(name: str) -> list[dict[str, Any]]:
        path = Path(name) if Path(name).is_file() else out / name
        if not path.is_file():
            raise typer.BadParameter(f"no rows file {name!r} (looked in {out} too): give a path or "
                                     f"the name `aft-train heldout` printed")  # fmt: skip
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            by_id = {r["id"]: r for r in json.load(f)["rows"]}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise typer.BadParameter(
                f"{name} scores {len(ids) - len(missing)} of the recipe's {len(ids)} held-out "
                f"questions (missing e.g. {missing[0]}): finish it with `aft-train heldout` (it resumes)"
            )
        return [by_id[i] for i in ids]

    def label(name: str) -> str:
        stem = Path(name).name.removesuffix(".gz").removesuffix(".json")
        return stem.removeprefix("heldout_")

    loaded = {label(name): load(name) for name in rows}
    before = load("heldout_base.json")
    verifier = Verifier("auto", last_number=cfg.last_number)
    k, n_all = cfg.aggregation_k or cfg.k, cfg.heldout_samples or cfg.k
    (first, after), others = next(iter(loaded.items())), list(loaded.items())[1:]
    full = {name: [float(r["aggregation_score"] >= 1.0) for r in rs] for name, rs in loaded.items()}
    votes = _votes(records, verifier, k, n_all)
    paired = stages.paired_comparisons(after, before, {**{n: full[n] for n, _ in others}, **votes})
    typer.echo(f"{first}: aggregator accuracy {sum(full[first]) / len(ids):.3f} on {len(ids)} held-out questions\n")
    typer.echo("\n".join(paired_table(paired, f"{first} minus baseline")))
    untrained = [float(r["aggregation_score"] >= 1.0) for r in before]
    groups = stages.by_right_proposals(records, verifier, k, {"untrained": untrained, **full})
    typer.echo("\n" + "\n".join(breakdown_table(groups, k)))
    direct = {n: rs for n, rs in {"untrained": before, **loaded}.items() if all("direct_score" in r for r in rs)}
    if direct:
        typer.echo("\ndirect answers (no proposals): " + ", ".join(
            f"{n} {sum(r['direct_score'] >= 1.0 for r in rs) / len(ids):.3f}" for n, rs in direct.items()
        ))  # fmt: skip


if __name__ == "__main__":  # `python -m trainer.cli` / `accelerate launch -m trainer.cli sft ...`
    app()
