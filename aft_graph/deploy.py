"""The aggregation graph for LangGraph Server: ``langgraph.json`` points here.

``langgraph dev`` (``pip install -e '.[deploy]'``) serves it as the assistant ``aft``::

    AFT_GRAPH_BASE_URL=http://127.0.0.1:8000/v1 langgraph dev --no-browser   # generation on vllm serve
    AFT_GRAPH_MODEL=small langgraph dev --no-browser --allow-blocking          # in-process vLLM

Where generations go (read when the first run starts, then kept for the server's life):

- ``AFT_GRAPH_BASE_URL``: one or several comma-separated ``/v1`` URLs of OpenAI-compatible
  servers (``vllm serve`` replicas), reached with :class:`~aft_graph.backends.OpenAIBackend`
  round-robin. The recommended set-up: the graph server stays light and generation scales with
  the vLLM fleet.
- otherwise ``AFT_GRAPH_MODEL`` (``default``, ``small`` or a directory; default ``default``): an
  in-process :class:`~aft_graph.backends.VLLMBackend`. Starting it blocks for a minute, which
  ``langgraph dev`` reports as a blocking call unless started with ``--allow-blocking``.

Per assistant or per run, ``config={"configurable": {...}}`` chooses the strategy and sampling:
``strategy`` (a name of :mod:`aft_graph.names`, default ``AFT_GRAPH_STRATEGY`` or ``aft``),
``max_tokens``, ``temperature``, ``seed``. Input ``{"question": ...}`` or ``{"messages": [...]}``;
output ``answer``, ``layers``, ``usage``, ``messages``. Stream with ``stream_mode=["custom",
"values"]`` to receive each finished layer (a ``LayerEvent`` as JSON) as it happens.

Past one machine, the same ``langgraph.json`` deploys to LangGraph Server with Postgres (threads,
checkpoints) and Redis (run queue), with as many server replicas as concurrent runs need; the
generations go to the ``vllm serve`` fleet named in ``AFT_GRAPH_BASE_URL``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from langchain_core.runnables import RunnableConfig

# Absolute imports: LangGraph Server loads this file by path, not as part of the package.
from aft_graph.config import SamplingConfig
from aft_graph.graph import build_graph
from aft_graph.names import parse_model_name

__all__ = ["make_graph"]

_backend: Any = None
_lock: asyncio.Lock | None = None


def _build_backend() -> Any:
    urls = [u.strip() for u in os.environ.get("AFT_GRAPH_BASE_URL", "").split(",") if u.strip()]
    if urls:
        from aft_graph.backends import OpenAIBackend

        backend = OpenAIBackend(urls if len(urls) > 1 else urls[0])
        backend.context_window  # noqa: B018 - connects now (model, context window, tokenizer)
        return backend
    from aft_graph.backends import VLLMBackend

    return VLLMBackend(os.environ.get("AFT_GRAPH_MODEL", "default"))


async def _get_backend() -> Any:
    global _backend, _lock
    if _backend is None:
        _lock = _lock or asyncio.Lock()
        async with _lock:
            if _backend is None:
                if os.environ.get("AFT_GRAPH_BASE_URL"):
                    # Connecting does blocking HTTP and tokenizer loading: off the server's loop.
                    _backend = await asyncio.to_thread(_build_backend)
                else:  # vLLM's AsyncLLM binds to the running loop: build it on this one
                    _backend = _build_backend()
    return _backend


async def make_graph(config: RunnableConfig) -> Any:
    """Graph factory for LangGraph Server (called per run with the run's config).

    Raises:
        ValueError: an unknown strategy name or bad sampling setting (the message says which).
    """
    settings = (config or {}).get("configurable") or {}
    strategy = settings.get("strategy") or os.environ.get("AFT_GRAPH_STRATEGY", "aft")
    sampling = {k: settings[k] for k in ("max_tokens", "temperature") if settings.get(k) is not None}
    overrides: dict[str, Any] = {}
    if sampling:
        overrides["proposer"] = overrides["aggregator"] = SamplingConfig(**sampling)
    if "seed" in settings:
        overrides["seed"] = settings["seed"]
    aggregate_config = parse_model_name(strategy, **overrides)
    return build_graph(await _get_backend(), aggregate_config, name="aft")
