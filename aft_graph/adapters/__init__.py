"""LoRA adapters shipped inside the package, loadable by name and checked against pinned hashes.

``aft``: the AFT aggregator of the default model (Qwen2.5-Coder-0.5B-Instruct), built in four
LoRA stages: self-aggregation targets (``recipes/aft-self.json``, on ``make train-aft``'s data),
then two passes over verified solution targets (``recipes/aft-solve-stage2.sft.json`` and
``recipes/aft-solve-stage3.sft.json``), then a third with a quarter of plain (query -> answer)
examples mixed in (``recipes/aft-plain-stage4.sft.json``); how and what it scored:
docs/training.md.

>>> backend = VLLMBackend("default", enable_lora=True)
>>> graph.ainvoke(state, context=AggregateContext(aggregator_lora="aft"))

On the command line: ``aft-graph run --aggregator aft``. For ``vllm serve``:
``--enable-lora --lora-modules aft=$(aft-graph adapter aft)``; the merged model is
``aft-train export --adapter $(aft-graph adapter aft) --out DIR``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SHIPPED_ADAPTERS",
    "AdapterIntegrityError",
    "ShippedAdapter",
    "is_shipped",
    "resolve_adapter",
    "shipped_adapter",
]

_ROOT = Path(__file__).parent


class AdapterIntegrityError(RuntimeError):
    """A shipped adapter's files are missing or differ from the hashes pinned in the package."""


@dataclass(frozen=True)
class ShippedAdapter:
    """A LoRA adapter directory inside this package.

    Attributes:
        name: The name requests use (``lora=name``).
        folder: Its directory under ``aft_graph/adapters/``.
        base_model: The directory name of the model it was trained on (what
            :func:`aft_graph.models.resolve_model` gives for ``"default"``).
        sha256: The pinned hash of every file.
        summary: What it is, one line.
        model: The embedded model's name (:func:`aft_graph.models.resolve_model`), to merge into.
    """

    name: str
    folder: str
    base_model: str
    sha256: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""
    model: str = "default"

    @property
    def path(self) -> Path:
        return _ROOT / self.folder


SHIPPED_ADAPTERS: dict[str, ShippedAdapter] = {
    "aft": ShippedAdapter(
        name="aft",
        folder="aft-default",
        base_model="Qwen2.5-Coder-0.5B-Instruct",
        sha256={
            "adapter_config.json": "d414557f7919d709f54c0fbdcd639672dbc82684e1f69974090e337aefd3dd77",
            "adapter_model.safetensors": "cc28288d1427ba94c592854e8ffc325aec46e574a66de7d583ca9ea9120aa264",
        },
        summary=(
            "AFT adapter of the default model: LoRA r=8 on q/k/v/o, 60 steps x 4 on 275 verified "
            "self-aggregation targets (recipes/aft-self.json), 2 x 44 steps x 4 on 175 verified "
            "solution targets (recipes/aft-solve-stage*.sft.json), 115 of them where every "
            "proposal is wrong, then 55 steps x 4 on the same targets with 44 plain examples "
            "mixed in (recipes/aft-plain-stage4.sft.json). On 100 fresh held-out queries it "
            "aggregates the same 3 proposals at 0.550 vs the untrained 0.180 (paired +0.370 "
            "[+0.260, +0.480]) and a vote of 6 proposals' 0.320 (+0.230 [+0.120, +0.340]); on the "
            "recipe's 120: 0.542 vs 0.400 and 0.425; direct answer 0.567 vs 0.433 (docs/training.md)"
        ),
    ),
}
"""Adapters shipped with the package, by name."""


def is_shipped(name: str) -> bool:
    """Whether ``name`` names a shipped adapter (rather than a directory)."""
    return name in SHIPPED_ADAPTERS


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(directory: Path, sha256: Mapping[str, str], name: str) -> None:
    for file, expected in sha256.items():
        path = directory / file
        if not path.is_file():
            raise AdapterIntegrityError(
                f"shipped adapter {name!r} lacks {file} in {directory}: reinstall aft-graph "
                "(`pip install --force-reinstall -e .`) or check out the file again with git"
            )
        actual = _sha256(path)
        if actual != expected:
            raise AdapterIntegrityError(
                f"shipped adapter {name!r}: {file} has sha256 {actual}, the package pins "
                f"{expected or '(no hash yet)'}; the file was changed or is half written: "
                "restore it with git (`git checkout -- aft_graph/adapters`) or reinstall aft-graph"
            )


def shipped_adapter(name: str, *, model_path: str | Path | None = None) -> Path:
    """The directory of a shipped adapter, after checking its files against the pinned hashes.

    Args:
        name: A key of :data:`SHIPPED_ADAPTERS`, e.g. ``"aft"``.
        model_path: The model the adapter is about to be applied to; an adapter trained on
            another model is refused (its shapes would not fit).

    Raises:
        KeyError: No shipped adapter has that name (the message lists them).
        AdapterIntegrityError: A file is missing or its hash differs.
        ValueError: ``model_path`` is not the model the adapter was trained on.
    """
    try:
        adapter = SHIPPED_ADAPTERS[name]
    except KeyError:
        raise KeyError(
            f"no shipped adapter is named {name!r}; shipped: {', '.join(SHIPPED_ADAPTERS)} "
            "(or pass an adapter directory)"
        ) from None
    if model_path is not None and Path(model_path).name != adapter.base_model:
        raise ValueError(
            f"adapter {name!r} was trained on {adapter.base_model}, but the engine runs "
            f"{Path(model_path).name}: start the engine on that model, e.g. "
            f"VLLMBackend('default', enable_lora=True) / aft-graph run --model default"
        )
    _verify(adapter.path, adapter.sha256, name)
    return adapter.path


def resolve_adapter(lora: str, *, model_path: str | Path | None = None) -> Path:
    """Where the adapter ``lora`` lives: a shipped adapter by name (checked as in
    :func:`shipped_adapter`) unless a directory of that name exists, else the directory itself."""
    if is_shipped(lora) and not Path(lora).exists():
        return shipped_adapter(lora, model_path=model_path)
    return Path(lora)
