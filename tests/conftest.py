"""Shared fixtures.

Fast unit tests use ``ScriptedBackend``. Tests marked ``slow`` use the real small model
(SmolLM2-135M-Instruct, converted once into the cache) and ONE in-process vLLM engine for the whole
test session (started with enforce_eager and LoRA enabled), so every integration test shares its
~45 s start-up.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def small_model_dir():
    from aft_graph.models import small_model_path

    return small_model_path()


@pytest.fixture(scope="session")
async def vllm_backend(small_model_dir):
    """One vLLM AsyncLLM engine on the small model, shared by the whole session."""
    pytest.importorskip("vllm")
    from aft_graph.backends import VLLMBackend

    backend = VLLMBackend(
        small_model_dir, max_model_len=2048, enable_lora=True, max_lora_rank=16, kv_cache_gib=2
    )
    yield backend
    await backend.aclose()
