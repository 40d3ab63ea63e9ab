"""Evaluation harness: does aggregation help, and at what compute?

:func:`evaluate` runs every strategy of a comparison over a task suite through the same graph
(:func:`~aft_graph.graph.build_graph`), many questions at once, and scores every text of every layer.
It is resumable: each finished (strategy, task) pair is one line of ``out_dir/records.jsonl``, and a
restart skips the pairs already there. It ends by writing ``summary.json``, ``summary.md`` and plots.

Metrics, per layer (layer 0 = proposals, layer l = the l-th aggregation layer or RSA step), as RSA
reports them, averaged over questions:

- ``pass@1``: mean score of the layer's texts (the expected accuracy of one member);
- ``majority``: score of the majority-vote answer of the layer;
- ``pass@N``: best score in the layer (any member correct);
- ``gain`` (l >= 1): mean over the layer's aggregations of (its score minus the mean score of the
  texts it read, from ``LayerEvent.sources``): positive when aggregating beats the inputs;
- compute up to and including the layer: generated tokens, prompt tokens, calls.

The strategy's own answer (``result["answer"]``: last / majority / reward selection) is scored as
the ``final`` accuracy. Intervals: Wilson 95% for accuracies, bootstrap over questions (percentile,
2000 resamples) for means of fractional quantities and for paired differences between strategies.

Compute matching: :func:`compute_matched` sizes single sample, self-consistency, best-of-N,
self-refine, AFT and RSA to the same number of generation calls (each call with the same
``max_tokens``, so the same generated-token budget); the tokens actually spent are reported.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .answers import majority_vote
from .backends.base import Backend, BackendError, Completion, GenerationRequest
from .config import AggregateConfig, SamplingConfig
from .graph import RewardFn, build_graph
from .tasks import Suite, Task, ascore, proxy_reward, vote_key

__all__ = [
    "REWARD_DESCRIPTION",
    "bootstrap_interval",
    "compute_matched",
    "evaluate",
    "expected_calls",
    "grid_strategies",
    "load_records",
    "parse_strategies",
    "question_metrics",
    "strategy_label",
    "summarize",
    "summary_markdown",
    "wilson_interval",
    "write_summary",
]

REWARD_DESCRIPTION = (
    "best-of-N reward (verifier-free proxy, aft_graph.tasks.proxy_reward): 1 if the response states "
    "an answer in the requested format (<answer> tags or \\boxed{}; for code: a ```python block "
    "that parses and defines the function), else 0; ties go to the shortest response. It never "
    "sees the reference or the tests."
)

_RECORDS = "records.jsonl"

# ------------------------------------------------------------------------------------ strategies


def strategy_label(config: AggregateConfig) -> str:
    """A short name for a configuration: ``single``, ``sc_K8``, ``aft_K4_L1``, ``rsa_N4_K2_T1``..."""
    s = config.strategy
    if s == "self_consistency":
        return "single" if config.proposals == 1 else f"sc_K{config.proposals}"
    if s == "best_of_n":
        return f"bon_K{config.proposals}"
    if s == "self_refine":
        return f"refine_L{config.layers}"
    if s == "rsa":
        return f"rsa_N{config.population}_K{config.subset_size}_T{config.steps}"
    return f"aft_K{config.proposals}_L{config.layers}" + ("_1f" if config.single_final_aggregation else "")


def expected_calls(config: AggregateConfig) -> int:
    """Generation calls one question costs under ``config`` (without failures or retries)."""
    if config.strategy == "rsa":
        return config.population * (config.steps + 1)
    if config.strategy == "self_refine":
        return 1 + config.layers
    if config.strategy in ("self_consistency", "best_of_n"):
        return config.proposals
    last = 1 if config.single_final_aggregation and config.layers > 0 else config.proposals
    return config.proposals + config.proposals * max(config.layers - 1, 0) + (last if config.layers else 0)


def compute_matched(
    calls: int,
    *,
    max_tokens: int = 384,
    temperature: float = 0.7,
    seed: int | None = 0,
    aft_layers: int = 1,
    rsa_steps: int = 1,
    rsa_subset: int = 2,
    include: Sequence[str] = ("single", "self_consistency", "best_of_n", "self_refine", "aft", "rsa"),
    **overrides: Any,
) -> dict[str, AggregateConfig]:
    """Strategies sized to spend about ``calls`` generation calls per question each.

    Every call may generate up to ``max_tokens`` tokens, so equal calls means an equal budget of
    generated tokens; the tokens actually spent differ (aggregations read longer prompts and may
    write shorter texts) and are reported by :func:`summarize`. Sizes: self-consistency and best-of-N
    ``K = calls``; self-refine ``1 + L = calls``; AFT ``K (L + 1) = calls`` with ``L = aft_layers``;
    RSA ``N (T + 1) = calls`` with ``T = rsa_steps`` and subsets of ``rsa_subset``. When ``calls``
    is not divisible, K and N are rounded down (see :func:`expected_calls`). ``single`` (one sample)
    is the 1-call reference point.

    Args:
        calls: Target calls per question (at least 2).
        max_tokens: New tokens per call, proposer and aggregator alike.
        temperature: Sampling temperature, proposer and aggregator alike.
        seed: Base seed shared by all strategies (so their proposals are the same samples).
        aft_layers: AFT depth L.
        rsa_steps: RSA steps T.
        rsa_subset: RSA subset size K (capped at N).
        include: Which strategies: ``single``, ``self_consistency``, ``best_of_n``, ``self_refine``,
            ``aft``, ``rsa``.
        **overrides: Other :class:`~aft_graph.config.AggregateConfig` fields for every strategy.

    Returns:
        ``{label: config}`` in the order of ``include`` (labels from :func:`strategy_label`).
    """
    if calls < 2:
        raise ValueError("compute matching needs at least 2 calls per question")
    sampling = SamplingConfig(temperature=temperature, max_tokens=max_tokens)
    common = dict(proposer=sampling, aggregator=sampling, seed=seed, **overrides)
    n_rsa = max(calls // (rsa_steps + 1), 1)
    make = {
        "single": lambda: AggregateConfig(strategy="self_consistency", proposals=1, **common),
        "self_consistency": lambda: AggregateConfig(strategy="self_consistency", proposals=calls, **common),
        "best_of_n": lambda: AggregateConfig(strategy="best_of_n", proposals=calls, **common),
        "self_refine": lambda: AggregateConfig(strategy="self_refine", layers=calls - 1, **common),
        "aft": lambda: AggregateConfig(
            strategy="propose_aggregate",
            proposals=max(calls // (aft_layers + 1), 1),
            layers=aft_layers,
            **common,
        ),
        "rsa": lambda: AggregateConfig(
            strategy="rsa",
            population=n_rsa,
            subset_size=min(rsa_subset, n_rsa),
            steps=rsa_steps,
            **common,
        ),
    }
    unknown = set(include) - set(make)
    if unknown:
        raise ValueError(f"unknown strategies {sorted(unknown)}: choose from {sorted(make)}")
    configs = [make[name]() for name in include]
    return {strategy_label(c): c for c in configs}


def grid_strategies(
    widths: Sequence[int],
    depths: Sequence[int],
    *,
    max_tokens: int = 384,
    temperature: float = 0.7,
    seed: int | None = 0,
    **overrides: Any,
) -> dict[str, AggregateConfig]:
    """The AFT width x depth grid (K proposals x L layers), for the heatmap of the AFT paper."""
    sampling = SamplingConfig(temperature=temperature, max_tokens=max_tokens)
    out = {}
    for k in widths:
        for depth in depths:
            config = AggregateConfig(
                strategy="propose_aggregate",
                proposals=k,
                layers=depth,
                proposer=sampling,
                aggregator=sampling,
                seed=seed,
                **overrides,
            )
            out[strategy_label(config)] = config
    return out


_ALIASES = {
    "single": "self_consistency",
    "sc": "self_consistency",
    "self_consistency": "self_consistency",
    "bon": "best_of_n",
    "best_of_n": "best_of_n",
    "refine": "self_refine",
    "self_refine": "self_refine",
    "aft": "propose_aggregate",
    "propose_aggregate": "propose_aggregate",
    "rsa": "rsa",
}


def parse_strategies(
    spec: str, *, max_tokens: int = 384, temperature: float = 0.7, seed: int | None = 0
) -> dict[str, AggregateConfig]:
    """Parse a command-line strategy list.

    ``spec`` is ``;``-separated items ``[name=]strategy[:key=value,...]``. Strategies: ``single``,
    ``sc``, ``bon``, ``refine``, ``aft``, ``rsa`` (or their full names); keys: ``K`` (proposals,
    or the subset size for RSA), ``L`` (layers), ``N`` (population), ``T`` (steps), any
    :class:`~aft_graph.config.AggregateConfig` field, or a sampling field (``temperature``,
    ``max_tokens``...) applied to proposer and aggregator alike. ``matched:C`` expands to
    :func:`compute_matched` at C calls (``matched:8,include=sc+aft+rsa`` picks some).

    Example: ``"single; sc:K=4; aft:K=4,L=1; rsa:N=4,K=2,T=1"``.
    """
    sampling = SamplingConfig(temperature=temperature, max_tokens=max_tokens)
    out: dict[str, AggregateConfig] = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        head, _, args = item.partition(":")
        name, _, kind = head.rpartition("=")  # "name=kind" or just "kind"
        kind = kind.strip()
        params = {}
        for pair in filter(None, (p.strip() for p in args.split(","))):
            if "=" not in pair:
                if kind == "matched" and not params:
                    params["calls"] = int(pair)
                    continue
                raise ValueError(f"strategy option {pair!r} in {item!r} is not key=value")
            key, value = (s.strip() for s in pair.split("=", 1))
            params[key] = _parse_value(value)
        if kind == "matched":
            calls = params.pop("calls", None)
            include = params.pop("include", None)
            if calls is None:
                raise ValueError("`matched` needs a call count, e.g. matched:8")
            kwargs = {"include": [_MATCH_NAMES.get(s, s) for s in str(include).split("+")]} if include else {}
            out.update(
                compute_matched(
                    int(calls), max_tokens=max_tokens, temperature=temperature, seed=seed, **kwargs, **params
                )
            )
            continue
        if kind not in _ALIASES:
            raise ValueError(f"unknown strategy {kind!r} in {item!r}: one of {sorted(_ALIASES)} or matched")
        strategy = _ALIASES[kind]
        fields: dict[str, Any] = {"strategy": strategy, "proposer": sampling, "aggregator": sampling, "seed": seed}
        if kind == "single":
            fields["proposals"] = 1
        sampling_keys = {k: params.pop(k) for k in list(params) if k in SamplingConfig.model_fields}
        if sampling_keys:  # temperature=..., max_tokens=...: both roles alike
            fields["proposer"] = fields["aggregator"] = sampling.model_copy(update=sampling_keys)
        for key, value in params.items():
            mapped = {"L": "layers", "N": "population", "T": "steps"}.get(key, key)
            if key == "K":
                mapped = "subset_size" if strategy == "rsa" else "proposals"
            fields[mapped] = value
        config = AggregateConfig(**fields)
        out[name.strip() or strategy_label(config)] = config
    if not out:
        raise ValueError("no strategies given, e.g. 'single; sc:K=4; aft:K=4,L=1'")
    return out


_MATCH_NAMES = {"sc": "self_consistency", "bon": "best_of_n", "refine": "self_refine"}


def _parse_value(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _config_hash(config: AggregateConfig) -> str:
    return hashlib.sha1(config.model_dump_json().encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------- running


class _SharedSamples:
    """A backend wrapper that generates each identical seeded request only once.

    Strategies built with the same seed send byte-identical proposal requests (same question, same
    sampling, same derived seed): self-consistency's 8 samples and AFT's 4 proposals are then the
    same texts. Generating them once saves compute and makes the comparison paired: AFT aggregates
    exactly the proposals self-consistency votes over. Reported compute still counts every call, as
    if each strategy had run alone.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._memo: dict[str, asyncio.Future[list[Completion]]] = {}
        self.generated = 0
        self.reused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        if request.sampling.seed is None and request.sampling.temperature > 0:
            return await self._backend.generate(request)  # unseeded samples must stay independent
        key = request.model_dump_json()
        future = self._memo.get(key)
        if future is not None:
            self.reused += 1
            return await asyncio.shield(future)
        future = asyncio.get_running_loop().create_future()
        self._memo[key] = future
        try:
            result = await self._backend.generate(request)
        except BaseException as exc:
            del self._memo[key]  # failures are not cached: a retry generates afresh
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        self.generated += 1
        future.set_result(result)
        return result


def load_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """All records of an evaluation directory (a half-written last line is skipped)."""
    path = Path(out_dir) / _RECORDS
    if not path.is_file():
        return []
    records = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno} is not valid JSON (interrupted write?); skipped", stacklevel=2)
    return records


def _ends_mid_line(path: Path) -> bool:
    """Whether a non-empty file's last byte is not a newline (a write was interrupted)."""
    if not path.is_file() or not path.stat().st_size:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


async def evaluate(
    backend: Backend,
    suite: Suite | Sequence[Task],
    strategies: Mapping[str, AggregateConfig],
    out_dir: str | Path,
    *,
    concurrency: int = 4,
    reward_fn: RewardFn | None = None,
    share_samples: bool = True,
    keep_texts: bool = True,
    time_limit_s: float | None = None,
    reference: str | Sequence[str] | None = None,
    progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Run each strategy over the suite, score every layer, write records, summary and plots.

    Questions are run ``concurrency`` at a time (each one a graph run whose calls the engine
    batches), task by task across strategies, so an interrupted run still compares strategies on
    the same questions. Rerunning with the same ``out_dir`` skips the finished (strategy, task)
    pairs; failed questions are retried.

    Args:
        backend: Where generations go (``VLLMBackend``, ``OpenAIBackend``, ``ScriptedBackend``...).
        suite: A :class:`~aft_graph.tasks.Suite` or a list of tasks.
        strategies: ``{name: AggregateConfig}``, e.g. from :func:`compute_matched`.
        out_dir: Directory for ``records.jsonl``, ``summary.json``, ``summary.md`` and PNG plots.
        concurrency: Questions in flight at once.
        reward_fn: Reward for best-of-N; default :func:`~aft_graph.tasks.proxy_reward` (see
            :data:`REWARD_DESCRIPTION`).
        share_samples: Generate identical seeded requests once across strategies (see
            ``_SharedSamples``); reported compute counts them for every strategy.
        keep_texts: Store every layer's texts in the records (for inspection; larger files).
        time_limit_s: Start no new question after this many seconds (running ones finish); the
            summary covers what finished, and a rerun continues.
        reference: Strategy (or strategies) that paired differences are measured against (default:
            ``single`` if present, else the first, plus the first self-consistency with K > 1).
        progress: Show rich progress bars.
        plots: Write the PNG plots.

    Returns:
        The summary (also written to ``summary.json``); see :func:`summarize`.

    Raises:
        ValueError: A strategy name already in ``out_dir`` has a different configuration there.
    """
    tasks = list(suite.tasks if isinstance(suite, Suite) else suite)
    suite_name = suite.name if isinstance(suite, Suite) else "custom"
    if not tasks:
        raise ValueError("the suite has no tasks")
    if len({t.id for t in tasks}) != len(tasks):
        raise ValueError("task ids must be unique within a suite")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hashes = {name: _config_hash(c) for name, c in strategies.items()}
    done: set[tuple[str, str]] = set()
    existing = load_records(out)
    for rec in existing:
        name = rec["strategy"]
        if name in hashes and rec.get("config_hash") != hashes[name]:
            raise ValueError(
                f"{out / _RECORDS} holds results of strategy {name!r} with a different "
                "configuration: use a new output directory or another strategy name"
            )
        if rec.get("error") is None:
            done.add((name, rec["task_id"]))

    engine = _SharedSamples(backend) if share_samples else backend
    reward = reward_fn or proxy_reward(tasks)
    graphs = {
        name: build_graph(engine, config, reward_fn=reward if config.resolved_select == "reward" else None)
        for name, config in strategies.items()
    }
    todo = [(task, name) for task in tasks for name in strategies if (name, task.id) not in done]
    started = time.monotonic()
    semaphore = asyncio.Semaphore(max(concurrency, 1))
    path = out / _RECORDS
    if _ends_mid_line(path):
        with path.open("a") as f:
            f.write("\n")  # end an interrupted line, or the next record would be glued to it
    sink = path.open("a")
    new: list[dict[str, Any]] = []

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=False,
    )
    bar_ids = {}
    tally: dict[str, list[float]] = {name: [] for name in strategies}
    for name in strategies:
        finished = sum((name, t.id) in done for t in tasks)
        bar_ids[name] = bars.add_task(name, total=len(tasks), completed=finished, acc="-")

    async def one(task: Task, name: str) -> None:
        async with semaphore:
            if time_limit_s is not None and time.monotonic() - started > time_limit_s:
                return
            record = await _run_question(graphs[name], task, name, strategies[name], keep_texts)
        record.update(suite=suite_name, config_hash=hashes[name])
        line = json.dumps(record)
        sink.write(line + "\n")
        new.append(json.loads(line))  # as a later load_records() would read it back
        sink.flush()  # one line per finished question: a crash loses at most the running ones
        if record["error"] is None:
            tally[name].append(record["final_score"])
            acc = f"{sum(tally[name]) / len(tally[name]):.2f}"
            bars.update(bar_ids[name], advance=1, acc=acc)
        else:
            bars.update(bar_ids[name], acc="error")

    try:
        with bars:
            await asyncio.gather(*(one(task, name) for task, name in todo))
    finally:
        sink.close()

    records = _latest([r for r in existing + new if r["strategy"] in strategies], {t.id for t in tasks})
    summary = summarize(records, strategies, reference=reference)
    summary["suite"] = suite_name
    summary["n_tasks"] = len(tasks)
    summary["best_of_n_reward"] = REWARD_DESCRIPTION if reward_fn is None else "user-supplied reward_fn"
    summary["wall_s"] = round(time.monotonic() - started, 1)
    if isinstance(engine, _SharedSamples):
        summary["shared_samples"] = {"generated": engine.generated, "reused": engine.reused}
    write_summary(summary, out, plots=plots)
    return summary


def _latest(records: list[dict[str, Any]], task_ids: set[str]) -> list[dict[str, Any]]:
    # One record per (strategy, task) of the current suite: the last success, else the last error.
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        if rec["task_id"] not in task_ids:
            continue
        key = (rec["strategy"], rec["task_id"])
        old = chosen.get(key)
        if old is None or old.get("error") is not None or rec.get("error") is None:
            chosen[key] = rec
    return list(chosen.values())


async def _run_question(graph, task: Task, name: str, config: AggregateConfig, keep_texts: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    record: dict[str, Any] = {
        "strategy": name,
        "task_id": task.id,
        "kind": task.kind,
        "config": config.model_dump(mode="json"),
        "reference": task.reference,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        result = await graph.ainvoke({"question": task.question})
    except (BackendError, ValueError) as exc:
        return {**record, "error": f"{type(exc).__name__}: {exc}", "elapsed_s": round(time.monotonic() - t0, 2)}
    cache: dict[str, float] = {}

    async def scored(text: str) -> float:
        if text not in cache:
            cache[text] = await ascore(task, text)
        return cache[text]

    layers = []
    for ev in result["layers"]:
        texts = ev["texts"]
        layer = {
            "layer": ev["layer"],
            "kind": ev["kind"],
            "scores": [await scored(t) for t in texts],
            "answers": ev["answers"],
            "sources": ev["sources"],
            "prompt_tokens": ev["prompt_tokens"],
            "completion_tokens": ev["completion_tokens"],
            "finish_reasons": ev["finish_reasons"],
            "truncated": ev["truncated"],
            "failures": ev["failures"],
            "elapsed_s": ev["elapsed_s"],
        }
        if task.kind == "humaneval":
            # Code is grouped by exact (normalized) text; store short digests, not the code twice.
            votes = [vote_key(task, t, a) for t, a in zip(texts, ev["answers"], strict=True)]
            layer["votes"] = [None if v is None else hashlib.sha1(v.encode()).hexdigest()[:10] for v in votes]
        if keep_texts:
            layer["texts"] = texts
        layers.append(layer)
    answer = result["answer"]
    final_layer = result["layers"][-1]
    record.update(
        error=None,
        final_score=await scored(answer),
        final_index=final_layer["texts"].index(answer) if answer in final_layer["texts"] else None,
        layers=layers,
        usage=result["usage"],
        elapsed_s=round(time.monotonic() - t0, 2),
    )
    if keep_texts:
        record["answer"] = answer
    return record


# ------------------------------------------------------------------------------------- metrics


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


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (``successes`` may be fractional: mean scores x n)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (resampling the values, e.g. questions)."""
    values = list(values)
    if not values:
        return (float("nan"), float("nan"))
    if len(values) == 1:
        return (values[0], values[0])
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(int((1 + level) / 2 * resamples), resamples - 1)]
    return (lo, hi)


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


# ------------------------------------------------------------------------------------- writing


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci(ci: Sequence[float] | None) -> str:
    if ci is None or any(isinstance(c, float) and math.isnan(c) for c in ci):
        return ""
    return f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown tables (what ``summary.md`` holds)."""
    lines = []
    strategies = summary["strategies"]
    lines.append("| strategy | config | n | final accuracy % [95% CI] | gen tokens/q | prompt tokens/q | calls/q | hit max_tokens % | s/q |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, s in strategies.items():
        cfg = ", ".join(f"{k}={v}" for k, v in s["config"].items() if k not in ("max_tokens", "temperature", "seed"))
        err = f" ({s['errors']} failed)" if s["errors"] else ""
        lines.append(
            f"| {name} | {s['strategy']}: {cfg} | {s['n']}{err} | {_pct(s['final'])}{_ci(s['final_ci'])} | "
            f"{s['gen_tokens']:.0f} | {s['prompt_tokens']:.0f} | {s['calls']:.1f} | "
            f"{_pct(s['hit_max_tokens'])} | {s['elapsed_s']:.1f} |"
        )
    lines += ["", "Per layer (layer 0 = proposals; compute is cumulative up to the layer):", ""]
    lines.append("| strategy | layer | texts | pass@1 % [CI] | majority % [CI] | pass@N % [CI] | aggregation gain pp [CI] | gen tokens | calls |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, s in strategies.items():
        for row in s["layers"]:
            gain = "-" if row["gain"] is None else f"{100 * row['gain']:+.1f}{_ci(row['gain_ci'])}"
            lines.append(
                f"| {name} | {row['layer']} | {row['texts']:.1f} | {_pct(row['pass1'])}{_ci(row['pass1_ci'])} | "
                f"{_pct(row['majority'])}{_ci(row['majority_ci'])} | {_pct(row['pass_n'])}{_ci(row['pass_n_ci'])} | "
                f"{gain} | {row['gen_tokens']:.0f} | {row['calls']:.1f} |"
            )
    if summary.get("differences"):
        lines += ["", "Paired differences of final accuracy (same questions; 95% bootstrap over questions):", ""]
        lines.append("| strategy | minus | n paired | difference pp [95% CI] |")
        lines.append("|---|---|---|---|")
        for d in summary["differences"]:
            diff = "-" if math.isnan(d["diff"]) else f"{100 * d['diff']:+.1f}{_ci(d['diff_ci'])}"
            lines.append(f"| {d['strategy']} | {d['reference']} | {d['n']} | {diff} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: Mapping[str, Any], out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``summary.json``, ``summary.md`` and (optionally) the PNG plots; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    head = [f"# Evaluation: {summary.get('suite', '')}", ""]
    if "n_tasks" in summary:
        head.append(f"{summary['n_tasks']} tasks; wall time {summary.get('wall_s', '?')} s this session.")
    if "best_of_n_reward" in summary:
        head.append(f"\n{summary['best_of_n_reward']}")
    (out / "summary.md").write_text("\n".join(head) + "\n\n" + summary_markdown(summary))
    paths = [out / "summary.json", out / "summary.md"]
    if plots:
        from .plots import write_plots

        paths += write_plots(summary, out)
    return paths

