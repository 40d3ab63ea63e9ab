"""Generation backends behind one async interface (:class:`~aft_graph.backends.base.Backend`).

Engines are imported lazily: importing this package does not import vLLM, transformers or openai.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .base import (
    Backend,
    BackendError,
    BackendUnavailableError,
    Completion,
    GenerationRequest,
    PromptTooLongError,
    Sampling,
    supports_logprobs,
)
from .cache import CachingBackend
from .fake import ScriptedBackend
from .router import AdapterRouter

if TYPE_CHECKING:
    from .chat_model import ChatModelBackend
    from .hf import HFBackend
    from .openai import OpenAIBackend
    from .vllm import VLLMBackend

__all__ = [
    "AdapterRouter",
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "CachingBackend",
    "ChatModelBackend",
    "Completion",
    "GenerationRequest",
    "HFBackend",
    "OpenAIBackend",
    "PromptTooLongError",
    "Sampling",
    "ScriptedBackend",
    "VLLMBackend",
    "supports_logprobs",
]

_LAZY = {
    "VLLMBackend": ".vllm",
    "OpenAIBackend": ".openai",
    "HFBackend": ".hf",
    "ChatModelBackend": ".chat_model",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
