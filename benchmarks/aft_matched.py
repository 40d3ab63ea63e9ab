"""The shipped AFT aggregator inside the graph, at matched compute, on a fresh held-out draw.

Every strategy runs through ``build_graph`` at 6 generation calls per question (384 tokens each,
temperature 0.7, one shared seed, so all strategies read the same proposals): one sample,
self-consistency K=6, AFT K=3 L=1 and RSA N=3 K=2 T=1 with the untrained and with the trained
aggregator. The depth runs, AFT K=3 L=3 untrained and trained (12 calls: layers 0 to 3, scored
one by one), cover the first ``--depth-n`` questions, in their own records folder (``depth/``).

Two phases, one engine each, so the trained aggregator runs merged at the base model's speed
(vLLM's CPU LoRA path is about 2.5x slower):

1. ``base``: the base model; every completion goes to a :class:`~aft_graph.backends.CachingBackend`.
2. ``trained``: ``AdapterRouter(None, {"aft": <merged model>})`` behind the same cache: the
   proposals replay from the cache (a proposal the cache lacks fails loudly rather than being
   written by the trained model) and only the trained aggregations are generated.

The questions are the fresh draw of ``benchmarks/aft_confirm.py`` (100 questions of the recipe's
families, disjoint from its training and held-out sets and from the evaluation suites), read from
``data/aft-solve/confirm``. Records and the completion cache are packed into ``--data`` after every
phase, and unpacked from there first: a run stopped by a time limit continues on another machine.

``--suite humaneval`` (or any other suite name of ``aft-graph eval``) runs the same strategies on
that suite instead, in its own run and data directories.

Run (after ``aft-train export --adapter aft --out runs/aft-merged``)::

    python benchmarks/aft_matched.py --phase base --time-limit 60
    python benchmarks/aft_matched.py --phase trained --model runs/aft-merged --time-limit 60
    python benchmarks/aft_matched.py --phase report

On a 2-core AVX2 CPU the base phase generates about 20 calls a minute with 32 runs in flight
(HumanEval: about 11; the trained phase, whose calls are all aggregations, about 6 to 13).
``--depth-n 0`` leaves the depth runs out.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from aft_graph.backends import AdapterRouter, CachingBackend
from aft_graph.eval import compute_matched, evaluate, load_records, summarize
from aft_graph.tasks import load_suite
from trainer import datapack
from trainer.records import TaskRecord

ROOT = Path(__file__).resolve().parent.parent
CALLS, MAX_TOKENS, TEMPERATURE, SEED = 6, 384, 0.7, 0
REFERENCES = ("sc_K6", "aft_K3_L1")


def strategies(trained: bool, *, depth: bool = False) -> dict:
    """The phase's strategies (base model, or the same aggregations by the ``aft`` adapter).

    ``depth``: the depth run instead, AFT at K (L + 1) = 12 calls with L = 3, so K = 3 as in the
    6-call AFT.
    """
    lora = {"aggregator_lora": "aft"} if trained else {}
    kwargs = dict(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=SEED, rsa_subset=2, **lora)
    if depth:
        return compute_matched(CALLS * 2, include=("aft",), aft_layers=3, **kwargs)
    include = ("aft", "rsa") if trained else ("single", "self_consistency", "aft", "rsa")
    return compute_matched(CALLS, include=include, **kwargs)


def _tasks(confirm: Path) -> list:
    with gzip.open(confirm / "tasks_confirm.jsonl.gz", "rt") as f:
        return [TaskRecord.model_validate_json(line).to_task() for line in f if line.strip()]


def _finished_everywhere(records: list[dict], names: list[str]) -> list[dict]:
    """Records of the tasks every strategy has finished (so each row is paired on the same n)."""
    done = {n: {r["task_id"] for r in records if r["strategy"] == n and r.get("error") is None} for n in names}
    common = set.intersection(*done.values()) if done else set()
    latest = {(r["strategy"], r["task_id"]): r for r in records if r.get("error") is None}
    return [r for (name, task), r in latest.items() if name in names and task in common]


def _base_finished(folder: Path, depth: bool) -> set[str]:
    """Ids of the questions every base-model strategy of ``folder`` has finished."""
    names = list(strategies(False, depth=depth))
    return {r["task_id"] for r in _finished_everywhere(load_records(folder), names)}


def _summary(out: Path, every: dict) -> tuple[dict, list[str], list[dict]]:
    records = load_records(out)
    names = [n for n in every if any(r["strategy"] == n for r in records)]
    records = _finished_everywhere(records, names)
    refs = [r for r in REFERENCES if r in names]
    return summarize(records, {n: every[n] for n in names}, reference=refs or None), names, records


def _layer_cells(layer: dict) -> str:
    """One layer's table cells: its number, pass@1 and majority, each with its interval."""
    (p0, p1), (m0, m1) = layer["pass1_ci"], layer["majority_ci"]
    return f"{layer['layer']} | {layer['pass1']:.3f} [{p0:.3f}, {p1:.3f}] | {layer['majority']:.3f} [{m0:.3f}, {m1:.3f}]"


def report(out: Path) -> str:
    """Markdown: accuracy and compute per strategy, paired differences, accuracy by depth."""
    every = {**strategies(False), **strategies(True)}
    summary, names, records = _summary(out, every)
    if not records:
        return "No question is finished by every strategy yet."
    n = summary["strategies"][names[0]]["n"]
    lines = [
        f"{n} questions finished by all {len(names)} strategies; {CALLS} calls per question, "
        f"{MAX_TOKENS} tokens a call, temperature {TEMPERATURE}.",
        "",
        "| strategy | calls | accuracy [95% CI] | generated tokens | prompt tokens |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        s = summary["strategies"][name]
        lo, hi = s["final_ci"]
        lines.append(
            f"| {name} | {s['calls']:.1f} | {s['final']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"| {s['gen_tokens']:.0f} | {s['prompt_tokens']:.0f} |"
        )
    score = {(r["strategy"], r["task_id"]): float(r["final_score"]) for r in records}
    lines += ["", "| strategy | minus | difference [95% CI] | wins / losses |", "|---|---|---|---|"]
    for d in summary["differences"]:
        lo, hi = d["diff_ci"]
        pairs = [(v, score[(d["reference"], t)]) for (name, t), v in score.items() if name == d["strategy"]]
        wins, losses = sum(a > b for a, b in pairs), sum(a < b for a, b in pairs)
        lines.append(f"| {d['strategy']} | {d['reference']} | {d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {wins} / {losses} |")
    lines += [
        "",
        "| strategy | last layer | pass@1 [95% CI] | majority [95% CI] | gain over its inputs [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        layer = summary["strategies"][name]["layers"][-1]
        gain = "" if layer["gain"] is None else f"{layer['gain']:+.3f} [{layer['gain_ci'][0]:+.3f}, {layer['gain_ci'][1]:+.3f}]"
        lines.append(f"| {name} | {_layer_cells(layer)} | {gain} |")
    deep, deep_names, deep_records = _summary(out / "depth", {**strategies(False, depth=True), **strategies(True, depth=True)})
    if deep_records:
        k = deep["strategies"][deep_names[0]]["n"]
        lines += [
            "",
            f"Depth runs (AFT K=3, L=3, {CALLS * 2} calls; {k} questions finished by both): each layer's "
            "pass@1 and the majority of its 3 texts.",
            "",
            "| depth run | layer | pass@1 [95% CI] | majority of 3 [95% CI] |",
            "|---|---|---|---|",
        ]  # fmt: skip
        for name in deep_names:
            for layer in deep["strategies"][name]["layers"]:
                lines.append(f"| {name} | {_layer_cells(layer)} |")
    return "\n".join(lines)


def main(
    phase: Annotated[str, typer.Option(help="base, trained or report.")],
    model: Annotated[str, typer.Option(help="Phase trained: the merged AFT model (aft-train export --adapter aft).")] = "runs/aft-merged",
    suite: Annotated[str, typer.Option(help="confirm (the fresh reasoning-gym draw) or any aft-graph suite, e.g. humaneval.")] = "confirm",
    out: Annotated[Path | None, typer.Option(help="Run directory (records.jsonl, completions.jsonl); default runs/aft-matched/<suite>.")] = None,
    data: Annotated[Path | None, typer.Option(help="Packed copy of the run, restored first and updated after each phase; default data/aft-solve/matched/<suite>.")] = None,
    confirm: Annotated[Path, typer.Option(help="The fresh draw's packed files (tasks_confirm.jsonl.gz).")] = ROOT / "data/aft-solve/confirm",
    n: Annotated[int, typer.Option(help="Questions (the first n of the draw).")] = 100,
    depth_n: Annotated[int, typer.Option(help="Questions of the depth runs (the first of the n).")] = 50,
    concurrency: Annotated[int, typer.Option(help="(Question, strategy) runs in flight.")] = 8,
    time_limit: Annotated[float | None, typer.Option(help="Minutes; start no new question after (rerun to continue).")] = None,
) -> None:
    if phase not in ("base", "trained", "report"):
        raise typer.BadParameter(f"--phase {phase!r}: choose base, trained or report")
    slug = suite.replace(":", "-").replace("/", "-")
    out = out or Path("runs/aft-matched") / slug
    data = data or ROOT / "data/aft-solve/matched" / slug
    if (data / datapack.MANIFEST).is_file():
        datapack.unpack(data, out)
    if phase == "report":
        typer.echo(report(out))
        return
    tasks = _tasks(confirm)[:n] if suite == "confirm" else list(load_suite(suite, n, seed=SEED).tasks)
    runs = {out: tasks, out / "depth": tasks[:depth_n]}
    if phase == "trained":  # only questions whose base-model runs finished: their proposals are cached
        runs = {
            folder: [t for t in some if t.id in _base_finished(folder, folder != out)]
            for folder, some in runs.items()
        }
        if not runs[out]:
            raise typer.BadParameter(f"no question of {out} has finished its base runs: run --phase base first")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from aft_graph.backends import VLLMBackend

    async def run() -> None:
        if phase == "base":
            backend = CachingBackend(VLLMBackend("default", max_model_len=4096), out / "completions.jsonl")
        else:
            if not Path(model).is_dir():
                raise typer.BadParameter(f"--model {model}: no such directory; run `aft-train export --adapter aft --out {model}` first")
            merged = VLLMBackend(model, max_model_len=4096)
            backend = CachingBackend(AdapterRouter(None, {"aft": merged}), out / "completions.jsonl")
        t0 = time.monotonic()
        trained, limit = phase == "trained", None if time_limit is None else time_limit * 60
        try:
            # Both runs at once, sharing the cache (one file, one writer): the depth run's layer 0
            # and 1 are the 6-call AFT's, generated once.
            await asyncio.gather(*(
                evaluate(backend, some, strategies(trained, depth=folder != out), folder,
                         concurrency=concurrency if folder == out else max(concurrency // 4, 1),
                         time_limit_s=limit, plots=False, progress=False)
                for folder, some in runs.items() if some
            ))  # fmt: skip
        finally:
            await backend.aclose()
            typer.echo(f"phase {phase}: {time.monotonic() - t0:.0f} s, cache hits {backend.hits}, generated {backend.misses}")
            command = "python benchmarks/aft_matched.py " + shlex.join(sys.argv[1:])
            datapack.pack(out, data, config={"command": command})

    def stop(signum, _frame):  # SIGTERM: close the engine and pack what finished
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    asyncio.run(run())
    typer.echo(report(out))


if __name__ == "__main__":
    typer.run(main)
