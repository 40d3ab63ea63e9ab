"""What does LangGraph cost? The graph end to end vs the same requests sent straight to the backend.

    .venv/bin/python benchmarks/graph_overhead.py                      # default model, ~15 min on a CPU
    .venv/bin/python benchmarks/graph_overhead.py --model small --max-tokens 64 --out docs/graph_overhead.md

Part 1 (overhead): for AFT and RSA, the graph is run once while a recording proxy captures every
request it sends (prompts, seeds, max_tokens). The "direct" run then sends exactly those requests
with one ``asyncio.gather`` per layer, layer after layer: same prompts, seeds and tokens, no graph.
Runs alternate graph/direct ``--repeats`` times; prefix caching is off so neither order profits
from the other's cache. The table prints graph time / direct time (target <= 1.05).

Part 2 (scaling): time and generated tokens as K, L and the number of concurrent questions grow.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aft_graph import AggregateConfig, SamplingConfig, build_graph
from aft_graph.backends.base import GenerationRequest, derive_seed

QUESTIONS = [
    "A farmer has 17 sheep and buys 3 times as many goats. How many animals does he have? Put the final answer in \\boxed{}.",
    "What is the sum of the first 20 positive odd numbers? Put the final answer in \\boxed{}.",
    "Tom reads 12 pages a day. How many days does he need for a 150-page book? Put the final answer in \\boxed{}.",
    "A rectangle is 7 cm by 12 cm. What is its perimeter? Put the final answer in \\boxed{}.",
]


class _Recorder:
    """Backend proxy that records every request with the layer it belongs to."""

    def __init__(self, backend):
        self._backend = backend
        self.requests: list[GenerationRequest] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    async def generate(self, request):
        self.requests.append(request)
        return await self._backend.generate(request)


def _layer_by_seed(cfg: AggregateConfig) -> dict[int, int]:
    """Map each call's seed back to its layer: the graph derives seeds from (seed, layer, index)."""
    calls = max(cfg.initial_count, cfg.population, cfg.proposals)
    return {derive_seed(cfg.seed, layer, i): layer for layer in range(cfg.depth + 1) for i in range(calls)}


async def _graph_run(backend, cfg, questions):
    """Run the graph on all questions at once; return time, tokens and its requests per layer."""
    recorder = _Recorder(backend)
    graph = build_graph(recorder, cfg)
    t = time.perf_counter()
    results = await asyncio.gather(*(graph.ainvoke({"question": q}) for q in questions))
    elapsed = time.perf_counter() - t
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    layer_of = _layer_by_seed(cfg)
    layers: list[list[GenerationRequest]] = [[] for _ in range(cfg.depth + 1)]
    for req in recorder.requests:
        layers[layer_of[req.sampling.seed]].append(req)
    return elapsed, tokens, layers


async def _direct_run(backend, layers):
    t = time.perf_counter()
    tokens = 0
    for requests in layers:
        outs = await asyncio.gather(*(backend.generate(r) for r in requests))
        tokens += sum(c.completion_tokens for out in outs for c in out)
    return time.perf_counter() - t, tokens


def _cfg(strategy, max_tokens, **kw):
    s = SamplingConfig(max_tokens=max_tokens, temperature=0.8)
    return AggregateConfig(strategy=strategy, proposer=s, aggregator=s, seed=0, **kw)


async def main(args) -> None:
    from aft_graph.backends import VLLMBackend

    console = Console()
    backend = VLLMBackend(
        args.model, max_model_len=4096, engine_kwargs={"enable_prefix_caching": False}
    )
    questions = QUESTIONS[: args.questions]
    lines = []
    try:
        # warm-up: the first requests pay one-off costs
        await _direct_run(backend, [[GenerationRequest(messages=({"role": "user", "content": "hi"},))]])

        overhead = Table(title=f"graph vs direct, {args.model} model, {len(questions)} questions at once")
        for col in ("strategy", "calls", "graph s", "direct s", "graph tok", "direct tok", "graph/direct"):
            overhead.add_column(col)
        cases = {
            "AFT K=4 L=1": _cfg("propose_aggregate", args.max_tokens, proposals=4, layers=1),
            "RSA N=4 K=2 T=1": _cfg("rsa", args.max_tokens, population=4, subset_size=2, steps=1),
        }
        for label, cfg in cases.items():
            g_times, d_times, g_tok, d_tok = [], [], 0, 0
            _, _, layers = await _graph_run(backend, cfg, questions)  # requests to replay
            for rep in range(args.repeats):
                # alternate the order so neither side always runs on a warmer machine
                for which in ("graph", "direct") if rep % 2 == 0 else ("direct", "graph"):
                    if which == "graph":
                        t, tok, layers = await _graph_run(backend, cfg, questions)
                        g_times.append(t)
                        g_tok += tok
                    else:
                        t, tok = await _direct_run(backend, layers)
                        d_times.append(t)
                        d_tok += tok
            last_layers = layers
            calls = sum(len(ly) for ly in last_layers)
            g, d = statistics.mean(g_times), statistics.mean(d_times)
            overhead.add_row(label, str(calls), f"{g:.1f}", f"{d:.1f}", str(g_tok // args.repeats), str(d_tok // args.repeats), f"{g / d:.3f}")
        console.print(overhead)
        lines.append(overhead)

        scaling = Table(title=f"scaling, {args.model} model, max_tokens={args.scale_tokens}")
        for col in ("config", "questions", "calls", "generated tok", "seconds", "tok/s"):
            scaling.add_column(col)
        grid = [(k, 1, 1) for k in (2, 4, 8)] + [(4, L, 1) for L in (0, 2)] + [(4, 1, n) for n in (2, 4)]
        for k, L, n in grid:
            cfg = _cfg("propose_aggregate", args.scale_tokens, proposals=k, layers=L)
            graph = build_graph(backend, cfg)
            t = time.perf_counter()
            results = await asyncio.gather(*(graph.ainvoke({"question": q}) for q in (QUESTIONS * 2)[:n]))
            dt = time.perf_counter() - t
            tok = sum(r["usage"]["completion_tokens"] for r in results)
            calls = sum(r["usage"]["calls"] for r in results)
            scaling.add_row(f"AFT K={k} L={L}", str(n), str(calls), str(tok), f"{dt:.1f}", f"{tok / dt:.1f}")
        console.print(scaling)
        lines.append(scaling)
    finally:
        await backend.aclose()

    if args.out:
        rec = Console(record=True, width=110)
        for t in lines:
            rec.print(t)
        cmd = "python benchmarks/graph_overhead.py " + " ".join(args.argv)
        Path(args.out).write_text(
            f"# Graph overhead\n\nMeasured with `{cmd.strip()}` on this 2-core CPU machine "
            f"(vLLM CPU build, float32, enforce_eager, prefix caching off).\n\n```\n{rec.export_text()}```\n"
        )
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--scale-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    asyncio.run(main(args))
