"""Build a generation backend for the trainer's commands (any aft_graph backend)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from aft_graph.backends.base import Backend

__all__ = ["Engine", "make_backend"]

Engine = Literal["vllm", "hf", "openai"]


def make_backend(
    model: str,
    *,
    engine: Engine = "vllm",
    base_url: str | Sequence[str] | None = None,
    max_model_len: int = 2048,
    max_lora_rank: int = 16,
) -> Backend:
    """A backend on ``model`` (``small``, ``default``, a directory, or a served model name).

    ``vllm``: in-process engine with LoRA serving on; ``hf``: transformers; ``openai``: an
    OpenAI-compatible server (``vllm serve``) at ``base_url``, or a fleet of them (a list: requests
    take turns (round-robin), see :class:`aft_graph.backends.OpenAIBackend`).
    """
    if engine == "vllm":
        from aft_graph.backends.vllm import VLLMBackend

        return VLLMBackend(
            model, max_model_len=max_model_len, enable_lora=True, max_lora_rank=max_lora_rank
        )
    if engine == "hf":
        from aft_graph.backends.hf import HFBackend

        return HFBackend(model, max_model_len=max_model_len)
    if engine == "openai":
        from aft_graph.backends.openai import OpenAIBackend

        if not base_url:
            raise ValueError("--engine openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        return OpenAIBackend(base_url, model=model)
    raise ValueError(f"unknown engine {engine!r}: vllm, hf or openai")
