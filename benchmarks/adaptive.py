"""Adaptive compute and smarter selection, measured (issue 15): what early exit, adaptive width,
confidence-weighted voting, universal self-consistency and behaviour-based code selection cost and
give, each against the same strategy without it, on the same questions and samples.

Two suites, each one resumable evaluation run (``aft_graph.eval.evaluate``; seeded requests
shared between strategies, so a variant and its full run see the same proposals)::

    # reasoning-gym held-out questions: AFT, RSA, self-consistency vs their adaptive variants
    AFT_GRAPH_CACHE=~/.cache/aft-graph .venv/bin/python benchmarks/adaptive.py reasoning \\
        --suite rg-mix:easy_arithmetic --n 60 --max-tokens 320

    # HumanEval at 6 calls: text vote vs behaviour vote, AFT with and without code checks
    AFT_GRAPH_CACHE=~/.cache/aft-graph .venv/bin/python benchmarks/adaptive.py code --n 24

    # the tables again, from the records (also written to docs/adaptive.md)
    .venv/bin/python benchmarks/adaptive.py report

Every row pairs a variant with its full run: accuracy of both, the paired difference with a 95%
bootstrap interval over questions, and the mean prompt and generated tokens of both with their
ratio (the issue's bar: early exit >= 30% fewer total tokens, accuracy inside the interval).
Confidence-weighted voting is compared with the plain vote *on the same samples*: the plain vote is
the majority of the confidence run's own proposals (layer 0), so the comparison costs no extra
generation. ``--base-url http://HOST:PORT/v1`` runs against a ``vllm serve`` instead. The records
are packed into ``data/adaptive/`` (gzipped, with a manifest; committed) after every run and
restored from there first, so the tables and replays come back on a fresh clone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aft_graph.answers import majority_vote  # noqa: E402
from aft_graph.consensus import consensus  # noqa: E402
from aft_graph.eval import (  # noqa: E402
    bootstrap_interval,
    evaluate,
    load_records,
    parse_strategies,
    question_metrics,
    wilson_interval,
)
from aft_graph.tasks import load_suite  # noqa: E402
from aft_graph.tasks.code import program_key  # noqa: E402
from benchmarks._notes import keep_notes  # noqa: E402
from trainer.datapack import pack, unpack  # noqa: E402

RUNS = ROOT / "runs" / "adaptive"
DATA = ROOT / "data" / "adaptive"
DOC = ROOT / "docs" / "adaptive.md"
FIGURE = ROOT / "docs" / "adaptive_accuracy_vs_tokens.png"

# name -> strategy spec (evaluate.parse_strategies syntax); pairs: (variant, full run).
REASONING = {
    "aft": "aft:K=4,L=2",
    "aft+exit": "aft:K=4,L=2,early_exit=true",
    "aft+exit75": "aft:K=4,L=2,early_exit=true,agreement=0.75",
    "aft+waves+exit": "aft:K=4,L=2,adaptive_width=true,early_exit=true",
    "rsa": "rsa:N=4,K=2,T=2",
    "rsa+exit": "rsa:N=4,K=2,T=2,early_exit=true",
    "sc": "sc:K=8",
    "sc+waves": "sc:K=8,adaptive_width=true",
    "sc+confidence": "sc:K=8,select=confidence",
    "sc+drop-half": "sc:K=8,select=confidence,keep_confident=0.5",
    "sc+usc": "sc:K=8,select=usc",
    "aft+drop-half": "aft:K=4,L=2,keep_confident=0.5",
}
REASONING_PAIRS = [
    ("aft+exit", "aft"),
    ("aft+exit75", "aft"),
    ("aft+waves+exit", "aft"),
    ("rsa+exit", "rsa"),
    ("sc+waves", "sc"),
    ("sc+confidence", "sc"),
    ("sc+drop-half", "sc"),
    ("sc+usc", "sc"),
    ("aft+drop-half", "aft"),
]
CODE = {
    "single": "single",
    "sc": "sc:K=6",
    "sc+behaviour": "sc:K=6,select=behaviour",
    "sc+behaviour+inputs": "sc:K=6,select=behaviour,proposed_inputs=5",
    "aft": "aft:K=3,L=1",
    "aft+checks": "aft:K=3,L=1,code_checks=true",
    "aft+checks+exit": "aft:K=3,L=1,code_checks=true,early_exit=true",
}
EXIT_AGREEMENTS = (1.0, 0.75)
"""Early-exit thresholds replayed on the full runs (of 4 texts: all, or 3 agreeing)."""
CODE_PAIRS = [
    ("sc+behaviour", "sc"),
    ("sc+behaviour+inputs", "sc"),
    ("aft+checks", "aft"),
    ("aft+checks+exit", "aft"),
]


def _by_task(records: Sequence[Mapping[str, Any]], name: str) -> dict[str, Mapping[str, Any]]:
    return {r["task_id"]: r for r in records if r["strategy"] == name and r.get("error") is None}


def _tokens(rec: Mapping[str, Any]) -> tuple[int, int]:
    return rec["usage"]["prompt_tokens"], rec["usage"]["completion_tokens"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def pair_rows(records: Sequence[Mapping[str, Any]], pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Markdown rows: variant vs full run on the questions both answered."""
    rows = []
    for variant, full in pairs:
        a, b = _by_task(records, variant), _by_task(records, full)
        shared = sorted(set(a) & set(b))
        if not shared:
            continue
        diffs = [a[t]["final_score"] - b[t]["final_score"] for t in shared]
        lo, hi = bootstrap_interval(diffs)
        acc_a = sum(a[t]["final_score"] for t in shared) / len(shared)
        acc_b = sum(b[t]["final_score"] for t in shared) / len(shared)
        pa, ga = (sum(_tokens(a[t])[k] for t in shared) / len(shared) for k in (0, 1))
        pb, gb = (sum(_tokens(b[t])[k] for t in shared) / len(shared) for k in (0, 1))
        calls_a = sum(a[t]["usage"]["calls"] for t in shared) / len(shared)
        calls_b = sum(b[t]["usage"]["calls"] for t in shared) / len(shared)
        exits = sum(a[t]["usage"].get("stopped_after") is not None for t in shared)
        ratio = (pa + ga) / (pb + gb) if pb + gb else float("nan")
        rows.append(
            f"| {variant} | {full} | {len(shared)} | {_pct(acc_a)} | {_pct(acc_b)} | "
            f"{100 * sum(diffs) / len(diffs):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
            f"{pa:.0f} / {ga:.0f} | {pb:.0f} / {gb:.0f} | {ratio:.2f} | {calls_a:.1f} / {calls_b:.1f} | "
            f"{exits} |"
        )
    return rows


AnswersOf = Callable[[Mapping[str, Any], Mapping[str, Any]], list[Any]]
"""(record, layer) -> the layer's answers as the graph compares them."""


def _stored_answers(record: Mapping[str, Any], layer: Mapping[str, Any]) -> list[Any]:
    return layer["answers"]


def program_answers(suite: str = "humaneval") -> AnswersOf:
    """Answers of code records recomputed from their texts as the graph now reads them (the
    program without comments and blank lines): records made before that fix stored last-line
    fragments."""
    entry = {t.id: t.metadata["entry_point"] for t in load_suite(suite, seed=None)}
    return lambda record, layer: [program_key(t, entry[record["task_id"]]) for t in layer["texts"]]


def replay_exit(
    record: Mapping[str, Any], agreement: float, answers_of: AnswersOf = _stored_answers
) -> tuple[float, int, int]:
    """What consensus early exit at ``agreement`` would have given on a full run's question: the
    first layer before the last whose answers agree (:func:`aft_graph.consensus.consensus`, as the
    graph decides) ends the run with its representative text. Returns (score, prompt tokens,
    generated tokens). Exact on the same samples: an exiting run's layers are the full run's."""
    prompt = gen = 0
    layers = record["layers"]
    for layer in layers[:-1]:
        prompt += sum(layer["prompt_tokens"])
        gen += sum(layer["completion_tokens"])
        c = consensus(answers_of(record, layer), agreement)
        if c.agreed and c.index is not None:
            return layer["scores"][c.index], prompt, gen
    return record["final_score"], *_tokens(record)


def exit_replay_rows(
    records: Sequence[Mapping[str, Any]],
    full: str,
    agreements: Sequence[float],
    answers_of: AnswersOf = _stored_answers,
) -> list[str]:
    """Markdown rows: early exit replayed on ``full``'s records at each agreement threshold."""
    runs = _by_task(records, full)
    if not runs:
        return []
    shared = sorted(runs)
    base = [runs[t]["final_score"] for t in shared]
    base_tokens = sum(sum(_tokens(runs[t])) for t in shared)
    rows = []
    for agreement in agreements:
        replay = [replay_exit(runs[t], agreement, answers_of) for t in shared]
        diffs = [r[0] - b for r, b in zip(replay, base, strict=True)]
        lo, hi = bootstrap_interval(diffs)
        exits = sum(r[1] + r[2] < sum(_tokens(runs[t])) for r, t in zip(replay, shared, strict=True))
        ratio = sum(r[1] + r[2] for r in replay) / base_tokens if base_tokens else float("nan")
        rows.append(
            f"| {full} | {agreement:g} | {len(shared)} | {_pct(sum(r[0] for r in replay) / len(shared))} | "
            f"{_pct(sum(base) / len(shared))} | {100 * sum(diffs) / len(diffs):+.1f} "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {ratio:.2f} | {exits} |"
        )
    return rows


def program_vote_rows(
    records: Sequence[Mapping[str, Any]], name: str, answers_of: AnswersOf, others: Sequence[str]
) -> list[str]:
    """The majority of ``name``'s layer-0 texts by program (ties: the earliest) against its
    measured answer, then each of ``others`` (same samples) against that program vote."""
    runs = _by_task(records, name)
    if not runs:
        return []
    voted = {}
    for task, record in runs.items():
        layer = record["layers"][0]
        vote = majority_vote(answers_of(record, layer))
        voted[task] = layer["scores"][vote.index if vote.index is not None else 0]
    rows = []
    for label, other in [(f"{name} (measured)", runs), *((o, _by_task(records, o)) for o in others)]:
        shared = sorted(set(voted) & set(other))
        if not shared:
            continue
        diffs = [other[t]["final_score"] - voted[t] for t in shared]
        lo, hi = bootstrap_interval(diffs)
        n = len(shared)
        rows.append(
            f"| {label} | {n} | {_pct(sum(other[t]['final_score'] for t in shared) / n)} | "
            f"{_pct(sum(voted[t] for t in shared) / n)} | "
            f"{100 * sum(diffs) / n:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |"
        )
    return rows


def same_sample_vote(records: Sequence[Mapping[str, Any]], name: str) -> str | None:
    """Confidence-weighted (the run's answer) vs plain majority of the same proposals."""
    runs = _by_task(records, name)
    if not runs:
        return None
    weighted = [r["final_score"] for r in runs.values()]
    plain = [question_metrics(r)[0]["majority"] for r in runs.values()]
    diffs = [w - p for w, p in zip(weighted, plain, strict=True)]
    lo, hi = bootstrap_interval(diffs)
    n = len(diffs)
    return (
        f"| {name} | {n} | {_pct(sum(weighted) / n)} | {_pct(sum(plain) / n)} | "
        f"{100 * sum(diffs) / n:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |"
    )


def code_reference(records: Sequence[Mapping[str, Any]]) -> str | None:
    """pass@1 and pass@6 of the self-consistency run's proposals: the range selection works in."""
    runs = _by_task(records, "sc")
    if not runs:
        return None
    n = len(runs)
    layer0 = [question_metrics(r)[0] for r in runs.values()]
    pass1 = sum(m["pass1"] for m in layer0) / n
    pass_n = sum(m["pass_n"] for m in layer0) / n
    lo, hi = wilson_interval(pass_n * n, n)
    return (
        f"Proposals of `sc` (n={n}): pass@1 {_pct(pass1)}%, pass@6 {_pct(pass_n)}% "
        f"[{_pct(lo)}, {_pct(hi)}]; halfway target {_pct((pass1 + pass_n) / 2)}%."
    )


def plot(runs: Path = RUNS, out: Path = FIGURE) -> Path | None:
    """Accuracy against mean prompt + generated tokens and against generated tokens per question,
    every strategy of each suite on the questions all of them answered (95% bootstrap intervals);
    an arrow from each full run to its adaptive variant."""
    suites = []
    for suite, pairs in (("reasoning", REASONING_PAIRS), ("code", CODE_PAIRS)):
        records = load_records(runs / suite) if (runs / suite / "records.jsonl").is_file() else []
        if records:
            suites.append((suite, pairs, records))
    if not suites:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(suites), 2, figsize=(11, 4.2 * len(suites)), squeeze=False)
    for row, (suite, pairs, records) in zip(axes, suites, strict=True):
        names = sorted({r["strategy"] for r in records})
        by_name = {n: _by_task(records, n) for n in names}
        shared = set.intersection(*(set(v) for v in by_name.values()))
        if not shared:
            continue
        points = {}
        for name, runs_ in by_name.items():
            scores = [runs_[t]["final_score"] for t in shared]
            lo, hi = bootstrap_interval(scores)
            prompt = sum(_tokens(runs_[t])[0] for t in shared) / len(shared)
            gen = sum(_tokens(runs_[t])[1] for t in shared) / len(shared)
            points[name] = (sum(scores) / len(scores), lo, hi, prompt + gen, gen)
        for ax, xi, label in ((row[0], 3, "prompt + generated tokens per question"), (row[1], 4, "generated tokens per question")):
            labels: dict[tuple[float, float], list[str]] = {}
            for name, p in points.items():
                ax.errorbar(p[xi], 100 * p[0], yerr=[[100 * (p[0] - p[1])], [100 * (p[2] - p[0])]], fmt="o", capsize=3)
                labels.setdefault((round(p[xi]), round(100 * p[0], 1)), []).append(name)
            for (x, y), group in labels.items():  # strategies with the same cost and accuracy: one label
                ax.annotate(", ".join(group), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            for variant, full in pairs:
                if variant in points and full in points:
                    a, b = points[full], points[variant]
                    ax.annotate("", xy=(b[xi], 100 * b[0]), xytext=(a[xi], 100 * a[0]),
                                arrowprops={"arrowstyle": "->", "alpha": 0.4})  # fmt: skip
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy %")
            ax.set_title(f"{suite} (n={len(shared)})")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(runs: Path = RUNS) -> str:
    header = (
        "| variant | full run | n | acc % | full acc % | diff pp [95% CI] | prompt / gen tokens | "
        "full prompt / gen | token ratio | calls / full | early exits |"
    )
    rule = "|" + "---|" * 11
    lines = [
        "# Adaptive compute and selection (issue 15)",
        "",
        f"Produced by `benchmarks/{Path(__file__).name}` (regenerated on every run; the notes "
        "section is kept).",
        "",
        keep_notes(DOC),
        "",
    ]
    for suite, pairs in (("reasoning", REASONING_PAIRS), ("code", CODE_PAIRS)):
        records = load_records(runs / suite) if (runs / suite / "records.jsonl").is_file() else []
        if not records:
            continue
        lines += [f"## {suite}", "", header, rule, *pair_rows(records, pairs), ""]
        # Code records are read as the graph reads code now (one suite load per report).
        answers_of = program_answers() if suite == "code" else _stored_answers
        replayed = [
            row
            for full in ("aft", "aft+checks", "rsa")
            for row in exit_replay_rows(records, full, EXIT_AGREEMENTS, answers_of)
        ]
        if replayed:
            lines += [
                "Consensus early exit replayed on the full run's own layers at other agreement "
                "thresholds (the decision the graph takes, on the same samples; where a measured "
                "`+exit` row of the same strategy exists, the replay must match it):",
                "",
                "| full run | agreement | n | acc % | full acc % | diff pp [95% CI] | token ratio | exits |",
                "|---|---|---|---|---|---|---|---|",
                *replayed,
                "",
            ]
        if suite == "reasoning":
            votes = [same_sample_vote(records, n) for n in ("sc+confidence", "sc+drop-half")]
            lines += [
                "Confidence-weighted vote vs plain vote on the same samples:",
                "",
                "| run | n | weighted % | plain % | diff pp [95% CI] |",
                "|---|---|---|---|---|",
                *[v for v in votes if v],
                "",
            ]
        else:
            ref = code_reference(records)
            if ref:
                lines += [ref, ""]
            program_rows = program_vote_rows(
                records, "sc", answers_of, ["sc+behaviour", "sc+behaviour+inputs"]
            )
            if program_rows:
                lines += [
                    "Self-consistency's vote replayed on its own samples with program answers "
                    "(identical programs agree: what the graph does since the code-answer fix), "
                    "and each run on the same samples against it:",
                    "",
                    "| run | n | acc % | program vote % | diff pp [95% CI] |",
                    "|---|---|---|---|---|",
                    *program_rows,
                    "",
                ]
    return "\n".join(lines)


async def _run(args: argparse.Namespace, table: Mapping[str, str], suite_name: str, out: Path) -> None:
    from aft_graph.cli import make_backend

    if args.only:
        unknown = sorted(set(args.only) - set(table))
        if unknown:
            raise SystemExit(f"unknown strategies {unknown}: choose from {sorted(table)}")
        table = {name: value for name, value in table.items() if name in args.only}
    spec = "; ".join(f"{name}={value}" for name, value in table.items())
    configs = parse_strategies(spec, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    suite = load_suite(suite_name, n=args.n, seed=args.seed)
    backend = make_backend(args.model, args.base_url, args.max_model_len, verbose=False)
    try:
        await evaluate(backend, suite, configs, out, concurrency=args.concurrency, plots=False)
    finally:
        await backend.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["reasoning", "code", "report"])
    parser.add_argument("--suite", default="rg-mix:easy_arithmetic", help="reasoning suite")
    parser.add_argument("--n", type=int, default=None, help="questions (default 60 reasoning, 24 code)")
    parser.add_argument("--seed", type=int, default=1, help="task seed (1: held out from training's 0)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--base-url", action="append", default=None)
    parser.add_argument("--max-tokens", type=int, default=320)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="NAME",
        help="run only these strategies of the suite's table (a shorter run; pairs missing a side "
        "are left out of the report)",
    )  # fmt: skip
    args = parser.parse_args()
    # The records travel in git (data/adaptive, gzipped with a manifest): a fresh clone reports,
    # replays and resumes from them instead of regenerating an hour of samples.
    unpack(DATA, args.runs)
    if args.step == "reasoning":
        args.n = args.n or 60
        asyncio.run(_run(args, REASONING, args.suite, args.runs / "reasoning"))
    elif args.step == "code":
        args.n = args.n or 24
        asyncio.run(_run(args, CODE, "humaneval", args.runs / "code"))
    if args.step != "report":
        pack(args.runs, DATA)
    text = report(args.runs)
    figure = plot(args.runs)
    if figure is not None:
        text += f"\n![accuracy against tokens]({figure.name})\n"
    DOC.write_text(text + "\n")
    print(text)
    print(json.dumps({"written": str(DOC)}))


if __name__ == "__main__":
    main()
