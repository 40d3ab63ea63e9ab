"""Loading a model with transformers, for the stages that train or export (not the engines)."""

from __future__ import annotations

from pathlib import Path


def load_causal_lm(model: str | Path, dtype: str = "float32"):
    """``(model, tokenizer, path)`` from ``'small'``, ``'default'`` or a model directory.

    Raises:
        ModelNotFoundError: the path does not exist or is not a model directory.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aft_graph.models import resolve_model

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return lm, tokenizer, path
