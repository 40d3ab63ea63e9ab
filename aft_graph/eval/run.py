"""The resumable run loop: every strategy over a suite through the same graph, every layer scored.

Each finished (strategy, task) pair is one line of ``out_dir/records.jsonl``; a restart skips the
pairs already there. Identical seeded requests of different strategies are generated once
(``_SharedSamples``), which makes the comparison paired. The run ends by writing
``summary.json``, ``summary.md`` and plots (:mod:`.report`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._jsonl import close_open_line
from ..backends.base import Backend, BackendError, Completion, GenerationRequest, supports_logprobs
from ..config import AggregateConfig
from ..graph import RewardFn, build_graph
from ..tasks import Suite, Task, ascore, proxy_reward, vote_key
from .metrics import summarize
from .report import write_summary

__all__ = ["REWARD_DESCRIPTION", "evaluate", "load_records"]

REWARD_DESCRIPTION = (
    "best-of-N reward (verifier-free proxy, aft_graph.tasks.proxy_reward): 1 if the response states "
    "an answer in the requested format (<answer> tags or \\boxed{}; for code: a ```python block "
    "that parses and defines the function), else 0; ties go to the shortest response. It never "
    "sees the reference or the tests."
)

_RECORDS = "records.jsonl"


def _config_hash(config: AggregateConfig) -> str:
    # Records name the configuration they were made with: a resume never mixes two configs.
    return hashlib.sha1(config.model_dump_json().encode()).hexdigest()[:12]


class _SharedSamples:
    """A backend wrapper that generates each identical seeded request only once.

    Strategies built with the same seed send byte-identical proposal requests (same question, same
    sampling, same derived seed): self-consistency's 8 samples and AFT's 4 proposals are then the
    same texts. Generating them once saves compute and makes the comparison paired: AFT aggregates
    exactly the proposals self-consistency votes over. Reported compute still counts every call, as
    if each strategy had run alone.

    On a backend that returns log-probabilities, every shared request asks for them: they come with
    the same sampled tokens (a seeded sample does not depend on whether its log-probabilities are
    returned), so a confidence-weighted strategy votes over exactly the samples the plain vote
    counts. Callers that did not ask get their completions without them.
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
        wants_logprobs = request.sampling.logprobs
        if supports_logprobs(self._backend):
            request = request.model_copy(
                update={"sampling": request.sampling.model_copy(update={"logprobs": True})}
            )
        key = request.model_dump_json()
        future = self._memo.get(key)
        if future is not None:
            self.reused += 1
            return _without_logprobs(await asyncio.shield(future), keep=wants_logprobs)
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
        return _without_logprobs(result, keep=wants_logprobs)


def _without_logprobs(completions: list[Completion], *, keep: bool) -> list[Completion]:
    if keep:
        return completions
    return [c.model_copy(update={"token_logprobs": None}) for c in completions]


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
    close_open_line(path)
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

