"""AdapterRouter: send requests for a LoRA adapter to a backend that serves it merged.

An AFT aggregator is a LoRA adapter applied to aggregation calls only (``aggregator_lora``).
Served per request, vLLM's LoRA path costs time (about 2.5x on a CPU, docs/training.md); the same
adapter merged into the model (``aft-train export``) runs at the base model's speed, but on its own
engine or ``vllm serve`` replicas. The router keeps the graph unchanged: proposals go to the base
model, requests naming a routed adapter go to the engine that holds it merged, with the adapter
name removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from .base import Backend, BackendUnavailableError, Completion, GenerationRequest

__all__ = ["AdapterRouter"]


class AdapterRouter:
    """A backend that routes requests by their ``lora`` field.

    A request whose ``lora`` is a key of ``adapters`` goes to that backend with ``lora=None``
    (the backend serves the adapter merged into its weights). Every other request, with or
    without an adapter, goes to ``base`` unchanged. Token counting uses ``base`` (or the first
    adapter backend without one): all backends must share the tokenizer, as a model and its
    merged adapters do.

    Args:
        base: The backend for proposals and unrouted adapters; ``None`` to refuse such requests
            (e.g. when they are all served from a :class:`CachingBackend` in front).
        adapters: ``{adapter name: backend serving it merged}``, e.g.
            ``{"aft": VLLMBackend("runs/aft-merged")}``.

    Example::

        backend = AdapterRouter(VLLMBackend("default"), {"aft": VLLMBackend("runs/aft-merged")})
        graph = build_graph(backend, AggregateConfig(aggregator_lora="aft"))
    """

    def __init__(self, base: Backend | None, adapters: Mapping[str, Backend]) -> None:
        if base is None and not adapters:
            raise ValueError("AdapterRouter needs a base backend or at least one adapter backend")
        self._base = base
        self._adapters = dict(adapters)
        self._tokens: Backend = base if base is not None else next(iter(self._adapters.values()))

    @property
    def supports_logprobs(self) -> bool:
        """True when every backend behind the router returns log-probabilities."""
        backends = [b for b in (self._base, *self._adapters.values()) if b is not None]
        return all(getattr(b, "supports_logprobs", False) for b in backends)

    @property
    def context_window(self) -> int:
        return self._tokens.context_window

    def count_tokens(self, text: str) -> int:
        return self._tokens.count_tokens(text)

    def truncate(self, text: str, max_tokens: int) -> str:
        return self._tokens.truncate(text, max_tokens)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self._tokens.count_prompt_tokens(request.model_copy(update={"lora": None}))

    def backend_for(self, request: GenerationRequest) -> tuple[Backend, GenerationRequest]:
        """The backend that serves ``request`` and the request as that backend receives it.

        Raises:
            BackendUnavailableError: The request needs ``base`` and there is none.
        """
        if request.lora in self._adapters:
            return self._adapters[request.lora], request.model_copy(update={"lora": None})
        if self._base is None:
            what = f"adapter {request.lora!r}" if request.lora else "no adapter"
            raise BackendUnavailableError(
                f"AdapterRouter has no base backend for a request with {what}: routed adapters are "
                f"{sorted(self._adapters)}; give `base` to serve the others"
            )
        return self._base, request

    async def generate(self, request: GenerationRequest) -> list[Completion]:
        backend, routed = self.backend_for(request)
        return await backend.generate(routed)

    async def aclose(self) -> None:
        """Close every backend behind the router (each once)."""
        unique = {id(b): b for b in (self._base, *self._adapters.values()) if b is not None}
        await asyncio.gather(*(b.aclose() for b in unique.values()))
