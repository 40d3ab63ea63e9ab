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
    run_dir: str | Path, data_dir: str | Path, *, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``.jsonl.gz`` copies of the run's jsonl files into ``data_dir``, plus the manifest.

    Only complete lines are packed (a file being appended to may end mid-line).
    """
    run, dest = Path(run_dir), Path(data_dir)
    entries = {}
    for path in sorted([*run.rglob("*.jsonl"), *run.glob(_RESULTS)]):
        data = path.read_bytes()
        if path.suffix == ".jsonl":
            data = data[: data.rfind(b"\n") + 1]  # drop a partly written last line
        gz = dest / (str(path.relative_to(run)) + ".gz")
        gz.parent.mkdir(parents=True, exist_ok=True)
        # mtime=0: the same data gives the same bytes, so git sees no change on a re-pack.
        gz.write_bytes(gzip.compress(data, mtime=0))
        entries[str(path.relative_to(run))] = {
            "rows": _rows(data),
            "bytes": len(data),
            "gzip_bytes": gz.stat().st_size,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    manifest = {
        "packed_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "files": entries,
        "config": config,
    }
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


def unpack(data_dir: str | Path, run_dir: str | Path) -> list[str]:
    """Restore ``.jsonl`` files from their packed copies where the plain file is missing or shorter.

    Returns the restored files. A packed file whose content does not match the manifest's sha256
    raises ``ValueError`` (a corrupt or hand-edited pack must not seed a training run).
    """
    run, src = Path(run_dir), Path(data_dir)
    manifest_path = src / MANIFEST
    if not manifest_path.is_file():
        return []
    files = json.loads(manifest_path.read_text()).get("files", {})
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
