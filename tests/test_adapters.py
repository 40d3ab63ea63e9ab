"""The adapters shipped in the package: pinned hashes, refusal on the wrong model, lookup by name."""

from __future__ import annotations

import json
import shutil

import pytest

from aft_graph.adapters import (
    SHIPPED_ADAPTERS,
    AdapterIntegrityError,
    ShippedAdapter,
    resolve_adapter,
    shipped_adapter,
)


def test_shipped_aft_adapter_matches_its_pinned_hashes_and_is_small():
    path = shipped_adapter("aft")
    files = {p.name for p in path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert set(SHIPPED_ADAPTERS["aft"].sha256) == {"adapter_config.json", "adapter_model.safetensors"}
    assert sum(p.stat().st_size for p in path.iterdir()) < 20 * 2**20
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] <= 16  # vLLM's max_lora_rank default


def test_a_changed_or_missing_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "aft-default"
    shutil.copytree(SHIPPED_ADAPTERS["aft"].path, copy)
    fake = ShippedAdapter("aft", "aft-default", "Qwen2.5-Coder-0.5B-Instruct", SHIPPED_ADAPTERS["aft"].sha256)
    monkeypatch.setitem(SHIPPED_ADAPTERS, "aft", fake)
    monkeypatch.setattr("aft_graph.adapters._ROOT", tmp_path)
    assert shipped_adapter("aft") == copy
    with (copy / "adapter_model.safetensors").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(AdapterIntegrityError, match="git checkout"):
        shipped_adapter("aft")
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterIntegrityError, match="lacks adapter_model.safetensors"):
        shipped_adapter("aft")


def test_wrong_model_and_unknown_names():
    with pytest.raises(ValueError, match="trained on Qwen2.5-Coder-0.5B-Instruct.*SmolLM2"):
        shipped_adapter("aft", model_path="/cache/models/SmolLM2-135M-Instruct")
    with pytest.raises(KeyError, match="shipped: aft"):
        shipped_adapter("nope")
    assert resolve_adapter("some/dir").as_posix() == "some/dir"
    assert resolve_adapter("aft") == SHIPPED_ADAPTERS["aft"].path


def test_cli_prints_the_checked_directory_and_refuses_unknown_names():
    from typer.testing import CliRunner

    from aft_graph.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["adapter", "aft"])
    assert ok.exit_code == 0 and ok.stdout.strip() == str(SHIPPED_ADAPTERS["aft"].path)
    bad = runner.invoke(app, ["adapter", "nope"])
    assert bad.exit_code == 2 and "shipped: aft" in bad.output
