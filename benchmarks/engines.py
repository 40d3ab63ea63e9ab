"""Engine benchmark: raw ``vllm.LLM.generate`` vs ``VLLMBackend`` vs ``HFBackend``, side by side.

One sampling workload (default: 8 chat prompts x 8 samples x 64 new tokens, temperature 0.8, a
fixed seed per prompt) runs on each model through:

- ``raw vLLM``: ``vllm.LLM.generate`` with every prompt in one call (the reference);
- ``VLLMBackend``: the in-process ``AsyncLLM`` behind the graph, every request sent at once with
  ``asyncio.gather`` (one request per prompt, ``n`` samples each), as the graph's parallel nodes do;
- ``HFBackend``: transformers ``generate``, the same concurrent requests micro-batched.

Both vLLM runs use the same engine arguments (float32, enforce_eager, same max_model_len and the
CPU scheduler settings of ``VLLMBackend``) and the same prompt token ids, so they generate the
same tokens. Engines run one at a time: each is shut down (and its memory checked) before the
next starts. Each workload is timed ``--repeats`` times after a warm-up and the best run is kept
(other processes on a shared machine only ever slow a run down). The table shows generated
tokens, seconds, tokens/s and each backend's tokens/s ratio to raw vLLM on the same model.

vLLM's CPU worker computes on all cores but one (the last is left to its front end): one core on
a 2-core machine. ``--hf-threads`` sets torch's threads for HFBackend, one row per value.

Run (vLLM spawns processes, hence the ``__main__`` guard below)::

    export AFT_GRAPH_CACHE=~/.cache/aft-graph
    .venv/bin/python benchmarks/engines.py --models small default --out docs/engines.md

``--out`` writes the table and the exact command to a markdown file.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

PROMPTS = [
    "A train travels 60 km in 45 minutes. What is its average speed in km/h? Explain briefly.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is 17 * 23? Show your steps.",
    "Give three tips for writing clear technical documentation.",
    "Explain what a hash table is to a beginner.",
    "If a shirt costs 25 dollars after a 20% discount, what was the original price?",
    "Summarize the water cycle in four sentences.",
    "What is the difference between a list and a tuple in Python?",
]


@dataclass
class Result:
    model: str
    backend: str
    tokens: int
    runs: list[float] = field(default_factory=list)  # wall-clock seconds of each timed run

    @property
    def seconds(self) -> float:
        return min(self.runs)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


class _Clock:
    """Wall-clock time of one timed run, appended to ``result.runs``."""

    def __init__(self, result: Result) -> None:
        self.result = result

    def __enter__(self) -> _Clock:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.result.runs.append(time.perf_counter() - self.start)


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _wait_children_gone(timeout: float = 30.0) -> None:
    """An engine is shut down only when its spawned processes are gone."""
    import psutil

    def engine_children() -> list[psutil.Process]:
        alive = []
        for child in psutil.Process().children(recursive=True):
            try:
                # multiprocessing's resource tracker lives as long as this process: not an engine.
                if "resource_tracker" not in " ".join(child.cmdline()):
                    alive.append(child)
            except psutil.NoSuchProcess:
                pass
        return alive

    deadline = time.monotonic() + timeout
    while (children := engine_children()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if children:
        raise RuntimeError(f"engine processes still alive after shutdown: {children}")


def _sampling(args, i: int):
    from aft_graph.backends import Sampling

    return Sampling(
        n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed + i
    )


def _requests(args):
    from aft_graph.backends import GenerationRequest

    return [
        GenerationRequest(
            messages=({"role": "user", "content": PROMPTS[i % len(PROMPTS)]},),
            sampling=_sampling(args, i),
        )
        for i in range(args.prompts)
    ]


def _prompt_ids(model_path: Path, requests) -> list[list[int]]:
    """The exact token ids the backends send (chat template applied)."""
    from transformers import AutoTokenizer

    from aft_graph.backends._tokenizer import TokenizerMixin

    renderer = TokenizerMixin()
    renderer.tokenizer = AutoTokenizer.from_pretrained(model_path)
    return [renderer.encode_prompt(r) for r in requests]


def run_raw_vllm(name: str, model_path: Path, args) -> Result:
    from vllm import LLM, TokensPrompt

    from aft_graph.backends.vllm import engine_args, vllm_sampling_params

    requests = _requests(args)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in _prompt_ids(model_path, requests)]
    params = [vllm_sampling_params(r.sampling) for r in requests]
    llm = LLM(**engine_args(model_path, max_model_len=args.max_model_len))  # as VLLMBackend's
    try:
        llm.generate(prompts[:1], vllm_sampling_params(_sampling(args, 0).model_copy(update={"n": 1, "max_tokens": 4})), use_tqdm=False)
        result = Result(name, "raw vLLM (LLM.generate)", 0)
        for _ in range(args.repeats):
            with _Clock(result):
                outputs = llm.generate(prompts, params, use_tqdm=False)
            result.tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        _wait_children_gone()
    return result


async def _time_backend(backend, args, name: str, label: str) -> Result:
    requests = _requests(args)
    warm = requests[0].model_copy(update={"sampling": requests[0].sampling.model_copy(update={"n": 1, "max_tokens": 4})})
    await backend.generate(warm)
    result = Result(name, label, 0)
    for _ in range(args.repeats):
        with _Clock(result):
            outputs = await asyncio.gather(*(backend.generate(r) for r in requests))
        result.tokens = sum(c.completion_tokens for out in outputs for c in out)
    return result


def run_vllm_backend(name: str, model_path: Path, args) -> Result:
    from aft_graph.backends import VLLMBackend

    async def main() -> Result:
        backend = VLLMBackend(model_path, max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib)
        try:
            return await _time_backend(backend, args, name, "VLLMBackend (AsyncLLM, gather)")
        finally:
            await backend.aclose()

    result = asyncio.run(main())
    gc.collect()
    _wait_children_gone()
    return result


def run_hf_backend(name: str, model_path: Path, args, threads: int) -> Result:
    import torch

    from aft_graph.backends import HFBackend

    async def main() -> Result:
        backend = HFBackend(model_path, max_batch_size=args.hf_batch, max_model_len=args.max_model_len)
        try:
            label = f"HFBackend (batch {args.hf_batch}, {threads} thread{'s' * (threads > 1)})"
            return await _time_backend(backend, args, name, label)
        finally:
            await backend.aclose()

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = asyncio.run(main())
    finally:
        torch.set_num_threads(previous)
    gc.collect()
    return result


RUNNERS = {"raw": run_raw_vllm, "vllm": run_vllm_backend, "hf": run_hf_backend}


def _runs(key: str, args):
    """(label, runner) pairs for one --backends entry (HF once per --hf-threads value)."""
    if key != "hf":
        return [(key, RUNNERS[key])]
    return [(f"hf/{t}", lambda name, path, a, t=t: run_hf_backend(name, path, a, t)) for t in args.hf_threads]


HEADER = [
    "model", "backend", "generated tokens", "seconds (best)", "runs (s)", "tokens/s",
    "ratio to raw vLLM",
]  # fmt: skip


def _table(results: list[Result]):
    from rich.table import Table

    table = Table(title="Engines: same sampling workload, tokens/s relative to raw vLLM")
    for col in HEADER:
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for row in _rows(results):
        table.add_row(*row)
    return table


def _rows(results: list[Result]) -> list[list[str]]:
    raw = {r.model: r for r in results if r.backend.startswith("raw")}
    rows = []
    for r in results:
        base = raw.get(r.model)
        ratio = f"{r.tok_s / base.tok_s:.2f}" if base else "-"
        runs = ", ".join(f"{s:.1f}" for s in r.runs)
        rows.append([
            r.model, r.backend, str(r.tokens), f"{r.seconds:.1f}", runs, f"{r.tok_s:.1f}", ratio,
        ])  # fmt: skip
    return rows


def _markdown(results: list[Result], args, load_before, load_after) -> str:
    import torch
    import vllm

    header = HEADER
    lines = [
        "# Engine benchmark",
        "",
        f"Workload: {args.prompts} chat prompts x {args.samples} samples x {args.max_tokens} new tokens, "
        f"temperature {args.temperature}, seed {args.seed}+i for prompt i; float32, enforce_eager, "
        f"max_model_len {args.max_model_len}; best of {args.repeats} timed run(s) after a warm-up "
        "(runs (s) lists them all). Ratio: tokens/s over raw vLLM's on the same model.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in _rows(results)),
        "",
        "Command:",
        "",
        "```",
        "AFT_GRAPH_CACHE=~/.cache/aft-graph .venv/bin/python benchmarks/engines.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, vllm {vllm.__version__}, torch {torch.__version__}; load average "
        f"(1 min) {load_before:.1f} before, {load_after:.1f} after.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["small"], help="'small', 'default' or model directories")
    parser.add_argument("--backends", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8, help="n completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--hf-batch", type=int, default=64, help="HFBackend max_batch_size (sequences)")
    parser.add_argument(
        "--hf-threads", type=int, nargs="+", default=[1, 2],
        help="torch threads for HFBackend, one row each (vLLM's CPU worker computes on 1 core "
        "and leaves the other to its front end)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per engine (best kept)")
    parser.add_argument("--out", type=Path, help="write the table as markdown here")
    args = parser.parse_args()

    from rich.console import Console

    from aft_graph.backends.vllm import apply_engine_env, engine_env
    from aft_graph.models import resolve_model

    # The raw-vLLM rows get VLLMBackend's CPU binding too: "same engine arguments" on both sides.
    apply_engine_env(engine_env(kv_cache_gib=args.kv_cache_gib))
    console = Console(width=max(Console().width, 132))
    load_before = os.getloadavg()[0]
    results: list[Result] = []
    for model in args.models:
        path = resolve_model(model)
        for key, runner in (run for b in args.backends for run in _runs(b, args)):
            console.print(
                f"[bold]{model}[/bold] / {key}: starting ({_mem_available_gib():.1f} GiB available)"
            )
            result = runner(model, path, args)
            console.print(
                f"  {result.tokens} tokens, runs {[round(s, 1) for s in result.runs]} s, "
                f"{result.tok_s:.1f} tok/s; after shutdown {_mem_available_gib():.1f} GiB available"
            )
            results.append(result)
    console.print(_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(_markdown(results, args, load_before, os.getloadavg()[0]))
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
