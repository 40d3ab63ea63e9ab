"""Quality benchmark: does aggregation help the default model, at matched compute?

Two steps, both on the embedded default model (Qwen2.5-Coder-0.5B-Instruct) through VLLMBackend:

1. Probe: single-sample accuracy of candidate suites, to pick one where one sample is right between
   10% and 90% of the time (otherwise there is nothing for aggregation to show)::

       AFT_GRAPH_CACHE=~/.cache/aft-graph .venv/bin/python benchmarks/quality.py probe \\
           --suites rg-mix:easy_arithmetic,humaneval --n 16

2. Compute-matched comparison on the chosen suite (single sample, self-consistency, best-of-N, AFT,
   RSA, sized by ``aft_graph.eval.compute_matched`` to the same calls per question), resumable::

       AFT_GRAPH_CACHE=~/.cache/aft-graph .venv/bin/python benchmarks/quality.py compare \\
           --suite rg-mix:easy_arithmetic --n 30 --calls 6 --max-tokens 320

3. Optional, the AFT width x depth grid (K proposals x L layers, the AFT paper's heatmap)::

       AFT_GRAPH_CACHE=~/.cache/aft-graph .venv/bin/python benchmarks/quality.py grid \\
           --suite rg-mix:easy_arithmetic --n 10 --widths 2,4 --depths 1,2 --max-tokens 320

Each step writes its records under ``--runs`` (default ``runs/quality``) and regenerates
``docs/results.md`` (tables with 95% intervals, per-layer metrics, the commands) and the PNG plots
under ``docs/``. Text between ``<!-- notes -->`` and ``<!-- /notes -->`` in docs/results.md is kept
across regenerations (hand-written reading of the numbers).

``--base-url http://HOST:PORT/v1`` runs against a ``vllm serve`` instead of an in-process engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aft_graph.eval import (  # noqa: E402
    REWARD_DESCRIPTION,
    compute_matched,
    evaluate,
    grid_strategies,
    load_records,
    summarize,
    summary_markdown,
    write_plots,
)
from aft_graph.tasks import load_suite  # noqa: E402
from benchmarks._notes import keep_notes  # noqa: E402

DOCS = ROOT / "docs"


def _backend(args):
    if args.base_url:
        from aft_graph.backends import OpenAIBackend

        return OpenAIBackend(args.base_url)
    from aft_graph.backends import VLLMBackend

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return VLLMBackend(args.model, max_model_len=args.max_model_len, kv_cache_gib=2)


def _command() -> str:
    return "AFT_GRAPH_CACHE=~/.cache/aft-graph .venv/bin/python benchmarks/quality.py " + shlex.join(sys.argv[1:])


async def _probe(args) -> None:
    backend = _backend(args)
    t0 = time.monotonic()
    try:
        single = compute_matched(2, max_tokens=args.max_tokens, include=("single",), seed=args.seed)
        for name in args.suites.split(","):
            suite = load_suite(name, n=args.n, seed=args.seed)
            out = Path(args.runs) / "probe" / name.replace(":", "_")
            summary = await evaluate(backend, suite, single, out, concurrency=args.concurrency, plots=False)
            s = summary["strategies"]["single"]
            print(f"{name}: single-sample accuracy {s['final']:.2f} on {s['n']} tasks, {s['gen_tokens']:.0f} tokens/q")
    finally:
        await backend.aclose()
    probe = {
        "command": _command(),
        "wall_s": round(time.monotonic() - t0, 1),
        "suites": {},
    }
    for name in args.suites.split(","):
        out = Path(args.runs) / "probe" / name.replace(":", "_")
        summary = json.loads((out / "summary.json").read_text())
        s = summary["strategies"]["single"]
        probe["suites"][name] = {k: s[k] for k in ("n", "final", "final_ci", "gen_tokens", "hit_max_tokens", "elapsed_s")}
    (Path(args.runs) / "probe.json").write_text(json.dumps(probe, indent=2))
    _write_results(Path(args.runs))


async def _compare(args) -> None:
    include = tuple(args.include.split(","))
    strategies = compute_matched(
        args.calls,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        aft_layers=args.aft_layers,
        rsa_steps=args.rsa_steps,
        rsa_subset=args.rsa_subset,
        include=include,
    )
    suite = load_suite(args.suite, n=args.n, seed=args.seed)
    out = Path(args.runs) / "compare"
    backend = _backend(args)
    t0 = time.monotonic()
    try:
        summary = await evaluate(
            backend,
            suite,
            strategies,
            out,
            concurrency=args.concurrency,
            time_limit_s=args.time_limit * 60 if args.time_limit else None,
        )
    finally:
        await backend.aclose()
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"sessions": []}
    meta.update(command=_command(), suite=args.suite, n=args.n, calls=args.calls, max_tokens=args.max_tokens)
    meta["sessions"].append({"wall_s": round(time.monotonic() - t0, 1), "shared": summary.get("shared_samples")})
    meta_path.write_text(json.dumps(meta, indent=2))
    _write_results(Path(args.runs))


async def _grid(args) -> None:
    widths = [int(x) for x in args.widths.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    strategies = grid_strategies(widths, depths, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    suite = load_suite(args.suite, n=args.n, seed=args.seed)
    out = Path(args.runs) / "grid"
    backend = _backend(args)
    t0 = time.monotonic()
    try:
        await evaluate(
            backend,
            suite,
            strategies,
            out,
            concurrency=args.concurrency,
            time_limit_s=args.time_limit * 60 if args.time_limit else None,
            reference=next(iter(strategies)),
        )
    finally:
        await backend.aclose()
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"sessions": []}
    meta.update(command=_command(), suite=args.suite, n=args.n)
    meta["sessions"].append({"wall_s": round(time.monotonic() - t0, 1)})
    meta_path.write_text(json.dumps(meta, indent=2))
    _write_results(Path(args.runs))


def _fresh_summary(out: Path) -> dict:
    # Recompute the metrics from the records, so that `report` reflects the current metric code;
    # keep the run facts (suite, wall time, shared samples) from the saved summary.
    saved = json.loads((out / "summary.json").read_text())
    order = list(saved["strategies"])
    records = [r for r in load_records(out) if r.get("error") is None and r["strategy"] in order]
    fresh = summarize(sorted(records, key=lambda r: order.index(r["strategy"])))
    return {**saved, **fresh}


def _write_results(runs: Path) -> None:
    DOCS.mkdir(exist_ok=True)
    target = DOCS / "results.md"
    lines = [
        "# Quality results: does aggregation help, at what compute?",
        "",
        "Produced by `benchmarks/quality.py` (regenerated on every run; the notes section is kept). "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs; "
        "model: embedded default Qwen2.5-Coder-0.5B-Instruct on vLLM (CPU build, float32).",
        "",
        keep_notes(target),
        "",
    ]
    probe_path = runs / "probe.json"
    if probe_path.is_file():
        probe = json.loads(probe_path.read_text())
        lines += [
            "## 1. Probe: single-sample accuracy per suite",
            "",
            f"```\n{probe['command']}\n```",
            "",
            f"Wall time {probe['wall_s']:.0f} s (engine start included).",
            "",
            "| suite | n | single-sample accuracy % [95% Wilson] | gen tokens/q | hit max_tokens % | s/q |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in probe["suites"].items():
            lo, hi = s["final_ci"]
            lines.append(
                f"| {name} | {s['n']} | {100 * s['final']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
                f"{s['gen_tokens']:.0f} | {100 * s['hit_max_tokens']:.1f} | {s['elapsed_s']:.1f} |"
            )
        lines.append("")
    compare = runs / "compare"
    if (compare / "summary.json").is_file():
        summary = _fresh_summary(compare)
        meta = json.loads((compare / "meta.json").read_text()) if (compare / "meta.json").is_file() else {}
        plots = write_plots(summary, DOCS, prefix="quality_")
        records = load_records(compare)
        wall = sum(s["wall_s"] for s in meta.get("sessions", []))
        lines += [
            f"## 2. Compute-matched comparison on `{summary.get('suite')}`",
            "",
            f"```\n{meta.get('command', '')}\n```",
            "",
            f"{summary.get('n_tasks')} tasks requested; {len(records)} question runs recorded; wall time "
            f"{wall / 60:.1f} min over {len(meta.get('sessions', []))} session(s) (engine start included). "
            f"Every strategy gets about {meta.get('calls')} calls of at most {meta.get('max_tokens')} new "
            "tokens per question (`single` is the 1-call reference). Strategies share a seed, so their "
            "proposals are the same samples (generated once, counted for each strategy): the comparison "
            f"is paired. Shared samples (last session): {summary.get('shared_samples')}.",
            "",
            f"{REWARD_DESCRIPTION}",
            "",
            "Final accuracy = the strategy's own answer (AFT: the first aggregation of the last layer; "
            "self-consistency and RSA: majority vote; best-of-N: proxy reward). Accuracy intervals are "
            "95% Wilson; pass@1 and gain intervals are bootstrap over questions.",
            "",
            summary_markdown(summary),
            "",
        ]
        for path in plots:
            lines += [f"![{path.stem}]({path.name})", ""]
    grid = runs / "grid"
    if (grid / "summary.json").is_file():
        summary = _fresh_summary(grid)
        meta = json.loads((grid / "meta.json").read_text()) if (grid / "meta.json").is_file() else {}
        plots = write_plots(summary, DOCS, prefix="grid_")
        wall = sum(s["wall_s"] for s in meta.get("sessions", []))
        lines += [
            f"## 3. AFT width x depth grid on `{summary.get('suite')}`",
            "",
            f"```\n{meta.get('command', '')}\n```",
            "",
            f"{summary.get('n_tasks')} tasks requested; wall time {wall / 60:.1f} min. The heatmap shows "
            "the last layer's pass@1 (mean accuracy of its aggregations). Shapes share samples: K=2 "
            "reads the first 2 of the K=4 proposals, and L=2 continues the L=1 run of the same K.",
            "",
            summary_markdown(summary),
            "",
        ]
        for path in plots:
            lines += [f"![{path.stem}]({path.name})", ""]
    target.write_text("\n".join(lines))
    print(f"wrote {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    for name in ("probe", "compare", "grid", "report"):
        p = sub.add_parser(name)
        p.add_argument("--runs", default=str(ROOT / "runs" / "quality"), help="where records are kept")
        if name == "report":
            continue
        p.add_argument("--model", default="default")
        p.add_argument("--base-url", default=None)
        p.add_argument("--max-model-len", type=int, default=4096)
        p.add_argument("--max-tokens", type=int, default=320)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--concurrency", type=int, default=4, help="questions in flight")
        p.add_argument("--n", type=int, default=16 if name == "probe" else 30)
        if name == "probe":
            p.add_argument("--suites", default="rg-mix:easy_arithmetic,humaneval")
        elif name == "grid":
            p.add_argument("--suite", default="rg-mix:easy_arithmetic")
            p.add_argument("--widths", default="2,4")
            p.add_argument("--depths", default="1,2")
            p.add_argument("--temperature", type=float, default=0.7)
            p.add_argument("--time-limit", type=float, default=None, help="minutes; start no new question after")
        else:
            p.add_argument("--suite", default="rg-mix:easy_arithmetic")
            p.add_argument("--calls", type=int, default=6, help="calls per question for every strategy")
            p.add_argument("--temperature", type=float, default=0.7)
            p.add_argument("--aft-layers", type=int, default=1)
            p.add_argument("--rsa-steps", type=int, default=1)
            p.add_argument("--rsa-subset", type=int, default=2)
            p.add_argument("--include", default="single,self_consistency,best_of_n,aft,rsa")
            p.add_argument("--time-limit", type=float, default=None, help="minutes; start no new question after")
    args = parser.parse_args()
    if args.step == "probe":
        asyncio.run(_probe(args))
    elif args.step == "compare":
        asyncio.run(_compare(args))
    elif args.step == "grid":
        asyncio.run(_grid(args))
    else:
        _write_results(Path(args.runs))


if __name__ == "__main__":
    main()
