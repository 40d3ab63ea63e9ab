"""Carry a run's data across machines: gzipped copies of its jsonl files plus a manifest.

Long recipe runs outlive a machine here (sessions end, the next one may be a new machine), so the
data a run produced is committed: ``pack`` copies every ``.jsonl`` of the run directory (under
``runs/``, not in git: it also holds checkpoints and models) and its held-out evaluation results
(``heldout_*.json``) into a data directory (under ``data/``, in git) gzipped, with
``MANIFEST.json`` (rows, bytes, sha256 of the uncompressed text, the recipe configuration, when); ``unpack`` restores the ``.jsonl`` files a
fresh clone lacks (or holds fewer rows of), so every stage resumes where the packed data stopped
instead of starting over.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["pack", "unpack"]

MANIFEST = "MANIFEST.json"
_RESULTS = "heldout_*.json"
"""Evaluation results (one JSON document each, written whole): packed too, since regenerating
them costs as much generation as a data stage."""


def _rows(data: bytes) -> int:
    return sum(1 for line in data.splitlines() if line.strip())


def pack(
    run_dir: str | Path,
    data_dir: str | Path,
    *,
    config: dict[str, Any] | None = None,
    inherited: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``.jsonl.gz`` copies of the run's jsonl files into ``data_dir``, plus the manifest.

    Only complete lines are packed (a file being appended to may end mid-line). Files identical to
    their copy in the ``inherited`` data directory (an earlier recipe's data this run reuses) are
    listed in the manifest as inherited rather than packed twice.
    """
    run, dest = Path(run_dir), Path(data_dir)
    parent = _manifest_files(inherited) if inherited is not None else {}
    entries: dict[str, Any] = {}
    shared: dict[str, str] = {}
    for path in sorted([*run.rglob("*.jsonl"), *run.glob(_RESULTS)]):
        data = path.read_bytes()
        if path.suffix == ".jsonl":
            data = data[: data.rfind(b"\n") + 1]  # drop a partly written last line
        rel = str(path.relative_to(run))
        digest = hashlib.sha256(data).hexdigest()
        if parent.get(rel, {}).get("sha256") == digest:
            shared[rel] = digest
            (dest / (rel + ".gz")).unlink(missing_ok=True)
            continue
        gz = dest / (rel + ".gz")
        gz.parent.mkdir(parents=True, exist_ok=True)
        # mtime=0: the same data gives the same bytes, so git sees no change on a re-pack.
        gz.write_bytes(gzip.compress(data, mtime=0))
        entries[rel] = {
            "rows": _rows(data),
            "bytes": len(data),
            "gzip_bytes": gz.stat().st_size,
            "sha256": digest,
        }
    manifest: dict[str, Any] = {
        "packed_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "files": entries,
        "config": config,
    }
    if inherited is not None:
        manifest["inherited"] = {"from": str(inherited), "files": shared}
    old = dest / MANIFEST
    if old.is_file():
        previous = json.loads(old.read_text())
        rows = {k: v["rows"] for k, v in previous.get("files", {}).items()}
        history = previous.get("history", [])
        # A stage that added nothing (a resumed run re-packs after every stage) is not history.
        if not history or history[-1]["rows"] != rows:
            history = [*history, {"packed_at": previous.get("packed_at"), "rows": rows}]
        manifest["history"] = history
    old.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest_files(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    return json.loads(path.read_text()).get("files", {}) if path.is_file() else {}


def unpack(
    data_dir: str | Path, run_dir: str | Path, *, only: Iterable[str] | None = None
) -> list[str]:
    """Restore ``.jsonl`` files from their packed copies where the plain file is missing or shorter.

    Args:
        data_dir: The packed data (``MANIFEST.json`` + ``.gz`` files).
        run_dir: The run directory to restore into.
        only: Restore only these files (paths relative to the run directory; e.g. the stages an
            ablation shares with the recipe it inherits from).

    Returns:
        The restored files.

    Raises:
        ValueError: A packed file's content does not match the manifest's sha256 (a corrupt or
            hand-edited pack must not seed a training run).
    """
    run, src = Path(run_dir), Path(data_dir)
    manifest_path = src / MANIFEST
    files = _manifest_files(src)
    if only is not None:
        wanted = set(only)
        files = {rel: meta for rel, meta in files.items() if rel in wanted}
    restored = []
    for rel, meta in files.items():
        path, gz = run / rel, src / (rel + ".gz")
        if not gz.is_file():
            continue
        have = _rows(path.read_bytes()) if path.is_file() else -1
        if have >= meta["rows"]:
            continue
        data = gzip.decompress(gz.read_bytes())
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError(
                f"{gz} does not match {manifest_path} (sha256 differs): re-pack the run with "
                "trainer.datapack.pack() or restore the file from git"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        restored.append(rel)
    return restored
