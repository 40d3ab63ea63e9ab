"""Per-question and per-strategy metrics, as RSA reports them.

Per layer (layer 0 = proposals, layer l = the l-th aggregation layer or RSA step), averaged over
questions:

- ``pass@1``: mean score of the layer's texts (the expected accuracy of one member);
- ``majority``: score of the majority-vote answer of the layer;
- ``pass@N``: best score in the layer (any member correct);
- ``gain`` (l >= 1): mean over the layer's aggregations of (its score minus the mean score of the
  texts it read, from ``LayerEvent.sources``): positive when aggregating beats the inputs;
- compute up to and including the layer: generated tokens, prompt tokens, calls.

The strategy's own answer (``result["answer"]``: last / majority / reward selection) is scored as
the ``final`` accuracy. Intervals (:mod:`.stats`): Wilson 95% for accuracies, BCa bootstrap over
questions for means of fractional quantities and for paired differences between strategies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..answers import majority_vote
from ..config import AggregateConfig
from .stats import bootstrap_interval, wilson_interval
from .strategies import expected_calls, strategy_label

__all__ = ["question_metrics", "summarize"]


def question_metrics(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-layer metrics of one question's record (see the module docstring).

    Returns:
        One dict per layer: ``layer``, ``pass1``, ``majority``, ``pass_n``, ``gain`` and
        ``source_acc`` (``None`` for layer 0), ``n`` (texts), and the compute spent up to and
        including the layer: ``gen_tokens``, ``prompt_tokens``, ``calls``.
    """
    out = []
    gen = prompt = calls = 0
    previous: list[float] | None = None
    for layer in record["layers"]:
        scores = layer["scores"]
        gen += sum(layer["completion_tokens"])
        prompt += sum(layer["prompt_tokens"])
        calls += len(scores) + len(layer.get("failures", []))
        winner = _majority_index(layer.get("votes"), layer["answers"])
        row: dict[str, Any] = {
            "layer": layer["layer"],
            "n": len(scores),
            "pass1": sum(scores) / len(scores) if scores else 0.0,
            "majority": scores[winner] if winner is not None else 0.0,
            "pass_n": max(scores, default=0.0),
            "gain": None,
            "source_acc": None,
            "gen_tokens": gen,
            "prompt_tokens": prompt,
            "calls": calls,
        }
        if previous is not None and scores:
            read = [sum(previous[i] for i in src) / len(src) if src else 0.0 for src in layer["sources"]]
            row["source_acc"] = sum(read) / len(read)
            row["gain"] = sum(s - r for s, r in zip(scores, read, strict=True)) / len(scores)
        out.append(row)
        previous = scores
    return out


def _majority_index(votes: Sequence[str | None] | None, answers: Sequence[str | None]) -> int | None:
    if votes is None:
        return majority_vote(answers).index  # math-equivalent answers vote together
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(votes):
        if v is not None:
            groups.setdefault(v, []).append(i)
    if not groups:
        return None
    return max(groups.values(), key=len)[0]  # first of the largest groups, like majority_vote


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(
    records: Sequence[Mapping[str, Any]],
    strategies: Mapping[str, AggregateConfig] | None = None,
    *,
    reference: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Aggregate per-question records into per-strategy, per-layer metrics with intervals.

    Args:
        records: One record per (strategy, task) (as :func:`evaluate` writes them).
        strategies: The configurations, to order strategies and describe them (optional).
        reference: Strategy (or strategies) the paired differences are measured against (default:
            ``single`` if present, else the first strategy, plus the first self-consistency with
            K > 1: the compute-matched voting baseline).

    Returns:
        ``{"strategies": {name: {...}}, "differences": [...], "references": [names]}``. Each strategy
        has ``n``, ``errors``, ``final`` (accuracy with Wilson CI), mean compute per question
        (``gen_tokens``, ``prompt_tokens``, ``calls``, ``elapsed_s``), ``expected_calls`` and
        ``layers`` (per-layer ``pass1``/``gain`` with bootstrap CIs, ``majority``/``pass_n`` with
        Wilson CIs, cumulative compute).
    """
    names = list(strategies) if strategies else list(dict.fromkeys(r["strategy"] for r in records))
    by_name: dict[str, list[Mapping[str, Any]]] = {n: [] for n in names}
    for rec in records:
        if rec["strategy"] in by_name:
            by_name[rec["strategy"]].append(rec)
    out: dict[str, Any] = {}
    finals: dict[str, dict[str, float]] = {}
    for name in names:
        ok = [r for r in by_name[name] if r.get("error") is None]
        errors = len(by_name[name]) - len(ok)
        config = strategies[name] if strategies else AggregateConfig.model_validate(ok[0]["config"]) if ok else None
        finals[name] = {r["task_id"]: float(r["final_score"]) for r in ok}
        n = len(ok)
        final = sum(finals[name].values())
        per_q = [question_metrics(r) for r in ok]
        depth = max((len(m) for m in per_q), default=0)
        layers = []
        for layer in range(depth):
            rows = [m[layer] for m in per_q if len(m) > layer]
            k = len(rows)
            pass1 = [r["pass1"] for r in rows]
            gains = [r["gain"] for r in rows if r["gain"] is not None]
            maj = sum(r["majority"] for r in rows)
            pn = sum(r["pass_n"] for r in rows)
            layers.append(
                {
                    "layer": layer,
                    "n": k,
                    "texts": _mean([r["n"] for r in rows]),
                    "pass1": _mean(pass1),
                    "pass1_ci": bootstrap_interval(pass1),
                    "majority": maj / k,
                    "majority_ci": wilson_interval(maj, k),
                    "pass_n": pn / k,
                    "pass_n_ci": wilson_interval(pn, k),
                    "gain": _mean(gains) if gains else None,
                    "gain_ci": bootstrap_interval(gains) if gains else None,
                    "source_acc": _mean([r["source_acc"] for r in rows if r["source_acc"] is not None]) if gains else None,
                    "gen_tokens": _mean([r["gen_tokens"] for r in rows]),
                    "prompt_tokens": _mean([r["prompt_tokens"] for r in rows]),
                    "calls": _mean([r["calls"] for r in rows]),
                }
            )
        truncated = sum(
            fr == "length" for r in ok for layer in r["layers"] for fr in layer["finish_reasons"]
        )
        total_texts = sum(len(layer["scores"]) for r in ok for layer in r["layers"])
        out[name] = {
            "label": strategy_label(config) if config else name,
            "strategy": config.strategy if config else None,
            "config": _short_config(config) if config else {},
            "expected_calls": expected_calls(config) if config else None,
            "n": n,
            "errors": errors,
            "final": final / n if n else float("nan"),
            "final_ci": wilson_interval(final, n),
            "gen_tokens": _mean([r["usage"]["completion_tokens"] for r in ok]),
            "prompt_tokens": _mean([r["usage"]["prompt_tokens"] for r in ok]),
            "calls": _mean([r["usage"]["calls"] for r in ok]),
            "elapsed_s": _mean([r["elapsed_s"] for r in ok]),
            "hit_max_tokens": truncated / total_texts if total_texts else 0.0,
            "layers": layers,
        }
    if reference is None:
        references = ["single" if "single" in names else names[0]] if names else []
        voting = [n for n in names if out[n]["strategy"] == "self_consistency" and out[n]["config"]["proposals"] > 1]
        references += voting[:1]
    else:
        references = [reference] if isinstance(reference, str) else list(reference)
    references = [r for r in dict.fromkeys(references) if r in finals]
    differences = []
    for i, ref in enumerate(references):
        for name in names:
            if name == ref or name in references[:i]:  # each pair once
                continue
            shared = sorted(set(finals[name]) & set(finals[ref]))
            diffs = [finals[name][t] - finals[ref][t] for t in shared]
            differences.append(
                {
                    "strategy": name,
                    "reference": ref,
                    "n": len(shared),
                    "diff": _mean(diffs) if diffs else float("nan"),
                    "diff_ci": bootstrap_interval(diffs) if diffs else (float("nan"), float("nan")),
                }
            )
    return {"strategies": out, "differences": differences, "references": references}


def _short_config(config: AggregateConfig) -> dict[str, Any]:
    fields = {
        "propose_aggregate": ("proposals", "layers"),
        "rsa": ("population", "subset_size", "steps"),
        "self_consistency": ("proposals",),
        "best_of_n": ("proposals",),
        "self_refine": ("layers",),
    }[config.strategy]
    short = {f: getattr(config, f) for f in fields}
    short.update(
        select=config.resolved_select,
        max_tokens=config.proposer.max_tokens,
        temperature=config.proposer.temperature,
        seed=config.seed,
    )
    return short
