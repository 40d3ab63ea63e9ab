"""Export: the LoRA adapter (served per request) and a merged model directory (a plain model).

- :func:`export_adapter` copies a peft adapter directory after checking it: it loads in
  ``VLLMBackend`` per request (``GenerationRequest(lora=dir)``, ``vllm serve --lora-modules``) and
  in ``HFBackend`` / peft on top of its base model.
- :func:`export_merged` folds the adapter into the base weights (peft ``merge_and_unload``) and
  saves a complete model directory with its tokenizer: any engine loads it as a model path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["adapter_info", "export_adapter", "export_merged"]

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")


def adapter_info(adapter_dir: str | Path, *, max_rank: int | None = None) -> dict:
    """The adapter's config (base model, rank, target modules), checked.

    Raises:
        FileNotFoundError: not an adapter directory.
        ValueError: its rank exceeds ``max_rank`` (a vLLM engine's ``max_lora_rank``).
    """
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json): pass the "
            "`adapter/` directory that `aft-train sft` wrote"
        )
    if not any((adapter_dir / f).is_file() for f in _ADAPTER_FILES[1:3]):
        raise FileNotFoundError(f"{adapter_dir} has no adapter weights (adapter_model.safetensors)")
    info = json.loads(config_file.read_text())
    if max_rank is not None and int(info.get("r", 0)) > max_rank:
        raise ValueError(
            f"the adapter's rank r={info['r']} exceeds max_lora_rank={max_rank}: start the vLLM "
            "engine with a larger max_lora_rank or train with a smaller --lora-r"
        )
    return info


def export_adapter(adapter_dir: str | Path, out: str | Path, *, max_rank: int | None = None) -> Path:
    """Copy a checked adapter to ``out`` (adapter_config.json + weights)."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    adapter_info(adapter_dir, max_rank=max_rank)
    if out.resolve() == adapter_dir.resolve():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name in _ADAPTER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, out / name)
    return out


def export_merged(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    base_model: str | Path | None = None,
    dtype: str = "float32",
) -> Path:
    """Merge the adapter into its base model and save a full model directory with the tokenizer.

    Args:
        adapter_dir: The peft adapter directory.
        out: Output model directory (written to a staging directory first, then moved).
        base_model: Base model (``'small'``, ``'default'`` or a directory); default: the one the
            adapter config names.
        dtype: Saved weight dtype. float32 keeps small LoRA deltas exactly (bfloat16 can round
            part of them away); engines cast on load.
    """
    import torch
    from peft import PeftModel

    from ._models import load_causal_lm

    adapter_dir, out = Path(adapter_dir), Path(out)
    info = adapter_info(adapter_dir)
    model, tokenizer, base = load_causal_lm(base_model or info.get("base_model_name_or_path") or "")
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model = model.to(getattr(torch, dtype))
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    (staging / "aft_merged_from.json").write_text(
        json.dumps({"base_model": str(base), "adapter": str(adapter_dir.resolve())}, indent=2)
    )
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    return out
