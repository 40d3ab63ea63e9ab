"""Packed run data restores the plain files a fresh clone lacks, and refuses a corrupt pack."""

from __future__ import annotations

import gzip
import json

import pytest

from trainer.datapack import pack, unpack


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_pack_then_unpack_restores_missing_and_shorter_files(tmp_path):
    data = tmp_path / "data"
    tmp_path = tmp_path / "run"
    tmp_path.mkdir()
    _write(tmp_path / "proposals.jsonl", [{"id": i} for i in range(5)], tail='{"id": 5, "trunc')
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "targets.jsonl", [{"id": "a"}])
    manifest = pack(tmp_path, data, config={"model": "default"})
    assert (data / "sub" / "targets.jsonl.gz").is_file()
    assert not list(tmp_path.rglob("*.gz"))  # the run directory is left as it was
    assert manifest["files"]["proposals.jsonl"]["rows"] == 5  # the half-written line is left out
    assert manifest["config"] == {"model": "default"}
    # A fresh clone: plain files absent (gitignored) or behind the pack.
    (tmp_path / "sub" / "targets.jsonl").unlink()
    _write(tmp_path / "proposals.jsonl", [{"id": 0}])
    restored = unpack(data, tmp_path)
    assert sorted(restored) == ["proposals.jsonl", "sub/targets.jsonl"]
    lines = (tmp_path / "proposals.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [0, 1, 2, 3, 4]
    # Files already as long as the pack are left alone.
    assert unpack(data, tmp_path) == []


def test_repacking_the_same_data_gives_the_same_bytes(tmp_path):
    _write(tmp_path / "a.jsonl", [{"x": 1}])
    pack(tmp_path, tmp_path / "data")
    first = (tmp_path / "data" / "a.jsonl.gz").read_bytes()
    pack(tmp_path, tmp_path / "data")
    assert (tmp_path / "data" / "a.jsonl.gz").read_bytes() == first
    manifest = json.loads((tmp_path / "data" / "MANIFEST.json").read_text())
    assert len(manifest["history"]) == 1


def test_a_corrupt_pack_is_refused(tmp_path):
    _write(tmp_path / "a.jsonl", [{"x": 1}, {"x": 2}])
    pack(tmp_path, tmp_path / "data")
    (tmp_path / "a.jsonl").unlink()
    (tmp_path / "data" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"x": 9}\n{"x": 9}\n'))
    with pytest.raises(ValueError, match="sha256 differs"):
        unpack(tmp_path / "data", tmp_path)
    assert not (tmp_path / "a.jsonl").exists()


def test_heldout_results_travel_with_the_data(tmp_path):
    run, data, fresh = tmp_path / "run", tmp_path / "data", tmp_path / "fresh"
    run.mkdir()
    result = json.dumps({"key": {"ids": ["a"]}, "rows": [{"id": "a", "aggregation_score": 1.0}]})
    (run / "heldout_base.json").write_text(result)  # one document, no trailing newline
    (run / "summary.json").write_text("{}")  # derived, regenerated: not packed
    manifest = pack(run, data)
    assert set(manifest["files"]) == {"heldout_base.json"}
    assert unpack(data, fresh) == ["heldout_base.json"]
    assert (fresh / "heldout_base.json").read_text() == result


def test_an_ablation_inherits_the_shared_stages_without_packing_them_twice(tmp_path):
    base_run, base_data = tmp_path / "base", tmp_path / "base-data"
    base_run.mkdir()
    _write(base_run / "proposals.jsonl", [{"id": i} for i in range(3)])
    _write(base_run / "aggregations.jsonl", [{"id": "copy-targets"}])
    pack(base_run, base_data)
    run, data = tmp_path / "ablation", tmp_path / "ablation-data"
    # Only the shared stages come over: the base recipe's targets are not the ablation's.
    assert unpack(base_data, run, only=["proposals.jsonl"]) == ["proposals.jsonl"]
    assert not (run / "aggregations.jsonl").exists()
    _write(run / "aggregations.jsonl", [{"id": "own-targets"}])
    manifest = pack(run, data, inherited=base_data)
    assert set(manifest["files"]) == {"aggregations.jsonl"}
    assert list(manifest["inherited"]["files"]) == ["proposals.jsonl"]
    assert not (data / "proposals.jsonl.gz").exists()
    # A changed shared file is the ablation's own data: packed.
    _write(run / "proposals.jsonl", [{"id": i} for i in range(4)])
    assert "proposals.jsonl" in pack(run, data, inherited=base_data)["files"]
