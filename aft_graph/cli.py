"""``aft-graph``: run propose-and-aggregate from the command line.

    aft-graph run "What is 17 * 23? Put the answer in \\boxed{}."          # embedded default model
    aft-graph run "..." --strategy rsa --population 8 --subset-size 4 --steps 3
    aft-graph run "..." --base-url http://127.0.0.1:8000/v1             # any `vllm serve`
    aft-graph run "..." --json                                          # machine-readable
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

app = typer.Typer(
    help="Propose-and-aggregate test-time scaling (AFT, RSA) over local models.",
    no_args_is_help=True,
    add_completion=False,
)
_err = Console(stderr=True)
_Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show vLLM's log (start-up warnings and progress).")
]


@app.callback()
def _main() -> None:
    """Propose-and-aggregate test-time scaling (AFT, RSA) over local models."""


class _Strategy(StrEnum):
    propose_aggregate = "propose_aggregate"
    rsa = "rsa"
    self_consistency = "self_consistency"
    best_of_n = "best_of_n"
    self_refine = "self_refine"


def _arun(main):
    """``asyncio.run`` that also turns SIGTERM into cancellation.

    vLLM's engine core is a separate process; without this a terminated CLI would leave it (and
    its memory) behind, because the ``finally: await backend.aclose()`` blocks never ran.
    """

    async def guarded():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        return await main()

    from .backends.base import BackendError

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        _err.print("[yellow]terminated: the engine was shut down[/yellow]")
        raise typer.Exit(143) from None
    except BackendError as exc:  # a failed layer, an unreachable server: a message, no traceback
        _err.print(Text.assemble((f"{type(exc).__name__}: ", "red"), str(exc)))
        raise typer.Exit(1) from None


def make_backend(
    model: str,
    base_url: list[str] | None,
    max_model_len: int,
    lora: bool = False,
    verbose: bool = False,
):
    """The backend the command line asks for: a server (``--base-url``) or in-process vLLM."""
    if base_url:
        from .backends import OpenAIBackend

        return OpenAIBackend(base_url if len(base_url) > 1 else base_url[0])
    from .backends import VLLMBackend
    from .models import resolve_model

    path = resolve_model(model)  # converts the embedded model on first use, with progress
    # vLLM's start-up warnings on a CPU (no Triton, no tcmalloc...) drown the live view; a
    # user-set VLLM_LOGGING_LEVEL still wins.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "ERROR")
    with _err.status(f"starting vLLM on {path.name} (1-2 minutes on a CPU)"):
        return VLLMBackend(path, max_model_len=max_model_len, enable_lora=lora)


def _layers_table(events: list) -> Table:
    table = Table(title="layers", expand=True)
    for col in ("layer", "kind", "answers", "tokens", "cut", "failed", "s"):
        table.add_column(col, overflow="fold")
    for ev in events:
        table.add_row(
            str(ev.layer),
            ev.kind,
            ", ".join("-" if a is None else a[:24] for a in ev.answers),
            str(sum(ev.completion_tokens)),
            str(ev.truncated),
            str(len(ev.failures)),
            f"{ev.elapsed_s:.1f}",
        )
    return table


async def _run(graph, question: str, context, console: Console, as_json: bool) -> dict:
    events, result = [], {}
    with Live(_layers_table(events), console=console, transient=as_json, refresh_per_second=4) as live:
        async for mode, chunk in graph.astream(
            {"question": question}, stream_mode=["custom", "values"], context=context
        ):
            if mode == "custom":
                events.append(chunk)
                live.update(
                    Group(_layers_table(events), Panel(Text(chunk.texts[0][-600:]), title=f"layer {chunk.layer}, text 1"))
                )
            else:
                result = chunk
        live.update(_layers_table(events))
    return result


@app.command()
def run(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    model: Annotated[str, typer.Option(help="'default', 'small' or a local model directory.")] = "default",
    base_url: Annotated[list[str] | None, typer.Option(help="OpenAI-compatible server(s), e.g. vllm serve; repeatable.")] = None,
    strategy: Annotated[_Strategy, typer.Option(help="Test-time scaling strategy.")] = _Strategy.propose_aggregate,
    proposals: Annotated[int, typer.Option("--proposals", "-k", help="K proposals.")] = 4,
    layers: Annotated[int, typer.Option("--layers", "-l", help="L aggregation layers.")] = 1,
    population: Annotated[int, typer.Option(help="N (RSA).")] = 8,
    subset_size: Annotated[int, typer.Option(help="K (RSA).")] = 4,
    steps: Annotated[int, typer.Option(help="T (RSA).")] = 2,
    max_tokens: Annotated[int, typer.Option(help="New tokens per call.")] = 384,
    temperature: Annotated[float, typer.Option(help="Proposer temperature.")] = 0.7,
    seed: Annotated[int, typer.Option(help="Base seed.")] = 0,
    lora: Annotated[str | None, typer.Option("--aggregator", "--lora", help="LoRA adapter of the aggregation calls: a shipped adapter's name (see `aft-graph adapter`) or an adapter directory.")] = None,
    max_model_len: Annotated[int, typer.Option(help="Context window of the in-process engine.")] = 4096,
    select: Annotated[str | None, typer.Option(help="Final pick: last, majority, confidence, usc or behaviour (default: per strategy).")] = None,
    early_exit: Annotated[bool, typer.Option("--early-exit", help="Stop after a layer whose answers all agree.")] = False,
    adaptive_width: Annotated[bool, typer.Option("--adaptive-width", help="Sample proposals in waves until the majority answer is settled.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")] = False,
    verbose: _Verbose = False,
) -> None:
    """Answer QUESTION with propose-and-aggregate, showing each layer as it finishes."""
    from pydantic import ValidationError

    from . import AggregateConfig, AggregateContext, build_graph
    from .config import SamplingConfig

    try:
        config = AggregateConfig(
            strategy=strategy.value,
            proposals=proposals,
            layers=layers,
            population=population,
            subset_size=subset_size,
            steps=steps,
            proposer=SamplingConfig(temperature=temperature, max_tokens=max_tokens),
            aggregator=SamplingConfig(temperature=temperature, max_tokens=max_tokens),
            seed=seed,
            select=select,
            early_exit=early_exit,
            adaptive_width=adaptive_width,
        )
        if not question.strip():
            raise typer.BadParameter("the question is empty")
    except ValidationError as exc:
        _err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(2) from None
    if strategy == _Strategy.best_of_n:
        _err.print("[red]best_of_n needs a reward function: use the Python API (build_graph(reward_fn=...))[/red]")
        raise typer.Exit(2)

    async def main() -> dict:
        backend = make_backend(model, base_url, max_model_len, lora=lora is not None, verbose=verbose)
        try:
            graph = build_graph(backend, config)
            context = AggregateContext(aggregator_lora=lora)
            return await _run(graph, question, context, Console(stderr=as_json), as_json)
        finally:
            await backend.aclose()

    result = _arun(main)
    if as_json:
        json.dump({k: result[k] for k in ("answer", "layers", "usage", "selection")}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    console = Console()
    # Text, not markup: answers hold LaTeX like \[ ... \] that markup would eat.
    console.print(Panel(Text(result["answer"]), title="answer", border_style="green"))
    usage = result["usage"]
    console.print(
        f"{usage['calls']} calls ({usage['proposer_calls']} proposer, {usage['aggregator_calls']} "
        f"aggregator), {usage['prompt_tokens']} prompt ({usage['prompt_tokens'] - usage['cached_prompt_tokens']} "
        f"computed, {usage['cached_prompt_tokens']} read from the prefix cache) + {usage['completion_tokens']} "
        f"generated tokens"
        + (f"; {usage['saved_calls']} calls saved" if usage.get("saved_calls") else "")
    )


@app.command("eval")
def eval_(
    tasks: Annotated[str, typer.Option("--tasks", help="Suite: humaneval, rg:<dataset>, rg-mix:<mix> (easy_arithmetic, arithmetic, words_and_logic), champ or jsonl:<path>.")] = "rg-mix:easy_arithmetic",
    strategies: Annotated[str, typer.Option("--strategies", help="';'-separated items name=strategy:key=value,... (name= and options optional), e.g. 'single; sc:K=4; aft:K=4,L=1; rsa:N=4,K=2,T=1', or 'matched:8' (compute-matched set).")] = "matched:6,include=single+sc+bon+aft+rsa",
    out: Annotated[str, typer.Option("--out", help="Output directory (records.jsonl, summary.json/.md, plots); rerun to resume.")] = "runs/eval",
    n: Annotated[int | None, typer.Option("--n", help="Number of tasks (default: all of a fixed suite, 50 generated).")] = None,
    seed: Annotated[int, typer.Option(help="Chooses the tasks and seeds every strategy.")] = 0,
    model: Annotated[str, typer.Option(help="'default', 'small' or a local model directory.")] = "default",
    base_url: Annotated[list[str] | None, typer.Option(help="OpenAI-compatible server(s), e.g. vllm serve; repeatable.")] = None,
    max_tokens: Annotated[int, typer.Option(help="New tokens per call (every strategy).")] = 384,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (every strategy).")] = 0.7,
    concurrency: Annotated[int, typer.Option(help="Questions in flight at once.")] = 4,
    checker: Annotated[str, typer.Option(help="jsonl suites: math, exact or contains.")] = "math",
    time_limit: Annotated[float | None, typer.Option(help="Minutes; start no new question after (rerun to continue).")] = None,
    max_model_len: Annotated[int, typer.Option(help="Context window of the in-process engine.")] = 4096,
    plots: Annotated[bool, typer.Option(help="Write PNG plots.")] = True,
    cache: Annotated[str | None, typer.Option(help="JSONL file of seeded completions: replayed when a later run (other strategies, another out dir) sends the same request; one file per model.")] = None,
    verbose: _Verbose = False,
) -> None:
    """Evaluate strategies on a verifiable task suite: accuracy per layer, compute, intervals."""
    from .eval import evaluate, parse_strategies, summary_markdown
    from .tasks import load_suite

    try:
        configs = parse_strategies(strategies, max_tokens=max_tokens, temperature=temperature, seed=seed)
        suite = load_suite(tasks, n=n, seed=seed, checker=checker)  # type: ignore[arg-type]
    except (ValueError, ImportError) as exc:
        _err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    _err.print(f"{len(suite)} tasks from {tasks}; strategies: {', '.join(configs)}")

    async def main() -> dict:
        lora = any(c.aggregator_lora for c in configs.values())
        backend = make_backend(model, base_url, max_model_len, lora=lora, verbose=verbose)
        if cache:
            from .backends import CachingBackend

            backend = CachingBackend(backend, cache, namespace=model)
        try:
            return await evaluate(
                backend,
                suite,
                configs,
                out,
                concurrency=concurrency,
                time_limit_s=time_limit * 60 if time_limit else None,
                plots=plots,
            )
        finally:
            await backend.aclose()

    summary = _arun(main)
    sys.stdout.write(summary_markdown(summary))  # plain: rich would wrap the tables and eat [..]
    _err.print(f"records, summary.json, summary.md and plots in {out}")

@app.command()
def adapter(
    name: Annotated[str, typer.Argument(help="A shipped adapter's name, e.g. aft.")] = "aft",
) -> None:
    """Print a shipped LoRA adapter's directory after checking its pinned hashes (for `vllm serve
    --enable-lora --lora-modules aft=$(aft-graph adapter aft)` or `aft-train export --adapter aft`)."""
    from .adapters import AdapterIntegrityError, shipped_adapter

    try:
        path = shipped_adapter(name)
    except (KeyError, AdapterIntegrityError) as exc:
        _err.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(2) from None
    sys.stdout.write(f"{path}\n")


@app.command()
def engine(
    model: Annotated[str, typer.Option(help="'default', 'small' or a local model directory.")] = "default",
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    lora: Annotated[list[str] | None, typer.Option("--aggregator", "--lora", help="An adapter to serve by name: a shipped adapter's name (e.g. aft) or NAME=DIR; repeatable.")] = None,
    max_model_len: Annotated[int, typer.Option(help="Context window per request.")] = 4096,
    dry_run: Annotated[bool, typer.Option(help="Print the command and environment instead of running it.")] = False,
) -> None:
    """Keep a vLLM engine warm: its OpenAI-compatible server, set up as the in-process engine is
    (dtype and CPU binding for this CPU). Then `aft-graph run --base-url http://HOST:PORT/v1`
    (`--aggregator aft` if served) starts in seconds instead of a minute or more."""
    from .adapters import AdapterIntegrityError
    from .backends.vllm import server_command

    loras = {}
    for item in lora or []:
        name, _, directory = item.partition("=")
        loras[name] = directory or name
    try:
        argv, env = server_command(model, host=host, port=port, max_model_len=max_model_len, loras=loras)
    except (ValueError, KeyError, OSError, AdapterIntegrityError) as exc:  # unknown model or adapter
        _err.print(f"[red]{exc.args[0] if exc.args else exc}[/red]")
        raise typer.Exit(2) from None
    if dry_run:
        sys.stdout.write(" ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(argv) + "\n")
        return
    _err.print(f"starting vLLM's server on http://{host}:{port}/v1 (about a minute on a CPU); "
               f"then: aft-graph run --base-url http://{host}:{port}/v1 QUESTION")
    os.execve(argv[0], argv, {**env, **os.environ})  # the server replaces this process: signals reach it


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="'default', 'small' or a local model directory (in-process vLLM).")] = "default",
    base_url: Annotated[list[str] | None, typer.Option(help="Generate through OpenAI-compatible server(s) instead, e.g. vllm serve replicas; repeatable.")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    max_concurrency: Annotated[int, typer.Option(help="Requests running at once; more get 429 with Retry-After.")] = 4,
    request_timeout: Annotated[float, typer.Option(help="Seconds a request may run before it is cancelled (504).")] = 600.0,
    max_tokens: Annotated[int, typer.Option(help="Tokens per call when a request gives no max_tokens.")] = 512,
    lora: Annotated[str | None, typer.Option("--aggregator", "--lora", help="LoRA adapter of the aggregation calls: a shipped adapter's name (see `aft-graph adapter`) or an adapter directory.")] = None,
    max_model_len: Annotated[int, typer.Option(help="Context window of the in-process engine.")] = 4096,
    verbose: _Verbose = False,
) -> None:
    """Serve propose-and-aggregate behind an OpenAI-compatible API; the model name picks the strategy.

    Model names: aft (K=4, L=1), aft-k4-l2, rsa (N=8, K=4, T=2), rsa-n8-k4-t3, sc (K=4), sc-k8,
    refine (L=1), single. See `aft_graph.serve` for the request fields and the streamed layer events.
    """
    try:
        import uvicorn

        from .serve import create_app
    except ImportError as exc:
        _err.print(f"[red]{exc}: install the server extra: pip install -e '.[serve]'[/red]")
        raise typer.Exit(2) from None
    try:
        app_ = create_app(
            # Built inside the server's event loop (vLLM's engine binds to it), closed at shutdown.
            lambda: make_backend(model, base_url, max_model_len, lora=lora is not None, verbose=verbose),
            max_concurrency=max_concurrency,
            request_timeout=request_timeout,
            max_tokens=max_tokens,
            aggregator_lora=lora,
        )
    except ValueError as exc:
        _err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    _err.print(f"serving on http://{host}:{port}/v1 (model names: aft, aft-k4-l2, rsa-n8-k4-t3, sc-k8, ...)")
    uvicorn.run(app_, host=host, port=port, log_level="info" if verbose else "warning")


if __name__ == "__main__":  # pragma: no cover
    app()
