"""The workload that matters: many questions through propose-and-aggregate, end to end, per engine.

    .venv/bin/python benchmarks/aggregation_throughput.py                       # full run, ~1 h on 2 CPUs
    .venv/bin/python benchmarks/aggregation_throughput.py --engines vllm-shipped vllm --questions 8 \\
        --strategies aft --max-tokens 128 --out docs/aggregation_throughput.md  # a settings sweep

Each engine runs in its own process (vLLM reads its CPU binding from the environment at start-up),
answers ``--questions`` questions with AFT K=4 L=1 and RSA N=4 K=2 T=3, all questions at once, and
reports start-up time, wall time, generated and prompt tokens per second, and how many prompt
tokens the engine really computed (the rest came from its prefix cache).

Two ways of driving the same engine are compared on the same requests:

- ``graph``: each question runs its own graph, so question A aggregates while B still proposes
  (what ``build_graph`` does);
- ``lockstep``: the RSA reference implementation's loop, every question's calls of one step sent
  together and awaited together before the next step. The requests (prompts, seeds, max_tokens)
  are exactly those the graph sent, recorded by a proxy; the prefix cache is reset between runs.

Engines: ``vllm-shipped`` (float32 and vLLM's own binding, which keeps one of two cores for its
scheduler: what this project shipped before choosing by CPU), ``vllm`` (the defaults chosen for
this CPU by :mod:`aft_graph.hardware`), ``vllm-other-dtype`` (the dtype the profile did *not*
pick), ``vllm-kv4`` (4 GiB KV cache instead of 2), ``vllm-no-prefix-cache`` (every prompt
prefilled in full: what prefix caching saves, and that seeded texts do not change), ``vllm-compiled`` (torch.compile instead of
eager, start-up counted), ``llama.cpp`` (llama.cpp's own ``llama-server`` on the same Q4_K_M GGUF
the default model ships as, ``--parallel`` slots, driven through ``OpenAIBackend``; build it with
``make llama-server``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STRATEGIES = {
    "aft": ("AFT K=4 L=1", dict(strategy="propose_aggregate", proposals=4, layers=1)),
    "rsa": ("RSA N=4 K=2 T=3", dict(strategy="rsa", population=4, subset_size=2, steps=3)),
}
ENGINES = (
    "vllm-shipped",
    "vllm",
    "vllm-other-dtype",
    "vllm-kv4",
    "vllm-no-prefix-cache",
    "vllm-compiled",
    "llama.cpp",
)
LLAMA_SERVER = Path(".venv-llama/bin/llama-server")


def questions(n: int) -> list[str]:
    """Deterministic multi-step arithmetic word problems (the model gets some right, not all)."""
    out = []
    for i in range(n):
        a, b, c = 12 + 7 * i, 3 + i % 5, 40 + 11 * i
        out.append(
            f"A shop has {a} boxes with {b} apples each. It sells {c} apples and then receives "
            f"{i + 2} more boxes of the same size. How many apples does it have now? "
            "Put the final answer in \\boxed{}."
        )
    return out


class _Recorder:
    """Backend proxy that records every request and the prompt tokens the engine computed."""

    def __init__(self, backend):
        self._backend = backend
        self.requests = []
        self.cached = 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    async def generate(self, request):
        self.requests.append(request)
        out = await self._backend.generate(request)
        self.cached += out[0].cached_prompt_tokens if out else 0
        return out


def _config(strategy: str, max_tokens: int):
    from aft_graph import AggregateConfig, SamplingConfig

    sampling = SamplingConfig(max_tokens=max_tokens, temperature=0.8)
    return AggregateConfig(
        proposer=sampling, aggregator=sampling, seed=0, **STRATEGIES[strategy][1]
    )


def _layers(cfg, requests) -> list[list]:
    """Group recorded requests by layer (the graph derives each call's seed from its layer)."""
    from aft_graph.backends.base import derive_seed

    calls = max(cfg.initial_count, cfg.population, cfg.proposals)
    layer_of = {
        derive_seed(cfg.seed, layer, i): layer
        for layer in range(cfg.depth + 1)
        for i in range(calls)
    }
    layers = [[] for _ in range(cfg.depth + 1)]
    for req in requests:
        layers[layer_of[req.sampling.seed]].append(req)
    return layers


async def _graph_run(backend, cfg, qs):
    from aft_graph import build_graph

    recorder = _Recorder(backend)
    graph = build_graph(recorder, cfg)
    t = time.perf_counter()
    results = await asyncio.gather(*(graph.ainvoke({"question": q}) for q in qs))
    wall = time.perf_counter() - t
    texts = [layer_texts for r in results for layer_texts in (ly["texts"] for ly in r["layers"])]
    return dict(
        wall=wall,
        generated=sum(r["usage"]["completion_tokens"] for r in results),
        prompt=sum(r["usage"]["prompt_tokens"] for r in results),
        cached=recorder.cached,
        calls=sum(r["usage"]["calls"] for r in results),
        texts=hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:12],
    ), recorder.requests


async def _lockstep_run(backend, layers):
    recorder = _Recorder(backend)
    t = time.perf_counter()
    generated = prompt = calls = 0
    for requests in layers:
        outs = await asyncio.gather(*(recorder.generate(r) for r in requests))
        generated += sum(c.completion_tokens for out in outs for c in out)
        prompt += sum(out[0].prompt_tokens for out in outs if out)
        calls += len(requests)
    wall = time.perf_counter() - t
    return dict(wall=wall, generated=generated, prompt=prompt, cached=recorder.cached, calls=calls)


async def _reset_cache(backend) -> None:
    engine = getattr(backend, "engine", None)
    if engine is not None and hasattr(engine, "reset_prefix_cache"):
        await engine.reset_prefix_cache()


def _start_llama_server(model: str, slots: int, ctx_per_slot: int):
    import socket

    from aft_graph.models import model_gguf

    if not LLAMA_SERVER.exists():
        raise SystemExit(f"{LLAMA_SERVER} is missing: build it with `make llama-server`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(LLAMA_SERVER), "-m", str(model_gguf(model)), "--host", "127.0.0.1",
        "--port", str(port), "--parallel", str(slots), "-c", str(slots * ctx_per_slot),
        "-t", str(len(os.sched_getaffinity(0))), "--no-webui",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}/v1"


async def _child(args) -> dict:
    """Run one engine: start it, warm it up, then graph and lockstep runs per strategy."""
    from aft_graph.backends import GenerationRequest
    from aft_graph.hardware import cpu_profile

    engine = args.child
    t0 = time.perf_counter()
    server = None
    if engine == "llama.cpp":
        from aft_graph.backends import OpenAIBackend

        server, url = _start_llama_server(args.model, args.slots, args.max_model_len)
        backend = None
        while backend is None:
            try:
                import urllib.request

                urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2)
                from aft_graph.models import resolve_model

                backend = OpenAIBackend(
                    url, tokenizer=resolve_model(args.model),  # the one model llama-server serves
                    context_window=args.max_model_len,
                )  # fmt: skip
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("llama-server exited at start-up") from None
                time.sleep(1)
    else:
        from aft_graph.backends import VLLMBackend

        kw: dict = dict(max_model_len=args.max_model_len)
        if engine == "vllm-shipped":
            # What shipped before: vLLM's own binding (one core kept for the scheduler), float32.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "auto"
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"
            kw["dtype"] = "float32"
        elif engine == "vllm-other-dtype":
            kw["dtype"] = "float32" if cpu_profile().native_bf16 else "bfloat16"
        elif engine == "vllm-kv4":
            kw["kv_cache_gib"] = 4
        elif engine == "vllm-no-prefix-cache":
            kw["engine_kwargs"] = {"enable_prefix_caching": False}
        elif engine == "vllm-compiled":
            kw["enforce_eager"] = False
        backend = VLLMBackend(args.model, **kw)
    hello = GenerationRequest(messages=({"role": "user", "content": "hi"},))
    await backend.generate(
        hello.model_copy(update={"sampling": hello.sampling.model_copy(update={"max_tokens": 4})})
    )
    result: dict = dict(engine=engine, startup=time.perf_counter() - t0, runs=[])
    qs = questions(args.questions)
    try:
        for strategy in args.strategies:
            cfg = _config(strategy, args.max_tokens)
            modes = (
                ["graph"] if engine == "llama.cpp" or args.no_lockstep else ["graph", "lockstep"]
            )
            layers = None
            for rep in range(args.repeats):
                order = modes if rep % 2 == 0 else modes[::-1]
                for mode in order:
                    await _reset_cache(backend)
                    if mode == "graph" or layers is None:
                        run, requests = await _graph_run(backend, cfg, qs)
                        layers = _layers(cfg, requests)
                        run["mode"] = "graph"
                        if mode == "lockstep":  # the first lockstep run needs recorded requests
                            continue
                    else:
                        run = await _lockstep_run(backend, layers)
                        run["mode"] = "lockstep"
                    run.update(strategy=strategy, rep=rep)
                    result["runs"].append(run)
                    print(json.dumps(run), file=sys.stderr, flush=True)
    finally:
        if hasattr(backend, "aclose"):
            await backend.aclose()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    return result


def _table(results: list[dict], args) -> str:
    """Markdown table: best wall time per (engine, strategy, mode), and ratios to the baselines."""
    rows = []
    best: dict[tuple, dict] = {}
    for res in results:
        for run in res["runs"]:
            key = (res["engine"], run["strategy"], run["mode"])
            if key not in best or run["wall"] < best[key]["wall"]:
                best[key] = dict(run, startup=res["startup"])
    header = (
        "| engine | workload | driven by | start s | wall s | calls | generated tok | gen tok/s | "
        "prompt tok (computed) | prompt+gen tok/s | x vllm-shipped | graph/lockstep | texts |"
    )
    rows.append(header)
    rows.append("|---" * 13 + "|")
    for (engine, strategy, mode), run in best.items():
        base = best.get(("vllm-shipped", strategy, mode))
        lock = best.get((engine, strategy, "lockstep"))
        gen_rate = run["generated"] / run["wall"]
        speedup = f"{gen_rate / (base['generated'] / base['wall']):.2f}" if base else ""
        pipelining = f"{lock['wall'] / run['wall']:.2f}" if mode == "graph" and lock else ""
        rows.append(
            f"| {engine} | {STRATEGIES[strategy][0]}, {args.questions} q | {mode} | "
            f"{run['startup']:.0f} | {run['wall']:.1f} | {run['calls']} | {run['generated']} | "
            f"{gen_rate:.1f} | {run['prompt']} ({run['prompt'] - run['cached']}) | "
            f"{(run['generated'] + run['prompt']) / run['wall']:.1f} | {speedup} | {pipelining} | "
            f"{run.get('texts', '')} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="default | small | a model directory")
    parser.add_argument(
        "--engines", nargs="+", default=["vllm-shipped", "vllm", "llama.cpp"], choices=ENGINES
    )
    parser.add_argument("--strategies", nargs="+", default=["aft", "rsa"], choices=list(STRATEGIES))
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--slots", type=int, default=16, help="llama-server --parallel")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (best kept)")
    parser.add_argument("--no-lockstep", action="store_true", help="graph runs only")
    parser.add_argument("--out", type=Path, help="append the table to this markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        args.result.write_text(json.dumps(asyncio.run(_child(args))))
        return

    import tempfile

    from aft_graph.hardware import cpu_profile

    results = []
    load = os.getloadavg()[0]
    for engine in args.engines:
        print(f"== {engine}", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            child = [a for a in sys.argv[1:] if a != "--out"]
            if args.out:
                i = sys.argv.index("--out")
                child = sys.argv[1:i] + sys.argv[i + 2 :]
            cmd = [sys.executable, __file__, *child, "--child", engine, "--result", tmp.name]
            if subprocess.run(cmd).returncode != 0:
                print(f"!! {engine} failed; its row is missing", flush=True)
                continue
            results.append(json.loads(Path(tmp.name).read_text()))
    profile = cpu_profile()
    cpu = "AMX/AVX-512 BF16" if profile.native_bf16 else "AVX2 (no native bf16)"
    flags = " ".join(
        sorted(f for f in profile.flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    )
    text = (
        f"\n### `{' '.join(['python benchmarks/aggregation_throughput.py', *sys.argv[1:]])}`\n\n"
        f"CPU: {cpu} ({flags}), {len(profile.cpus)} CPUs, load average {load:.2f} at the start; "
        f"model `{args.model}`, max_tokens {args.max_tokens}, temperature 0.8, seed 0.\n\n"
        + _table(results, args)
        + "\n"
    )
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
