"""A tiny evaluation on the real small model through the session's vLLM engine."""

from __future__ import annotations

import json

import pytest

from aft_graph.eval import evaluate, load_records, parse_strategies
from aft_graph.tasks import load_suite

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


async def test_tiny_evaluation_writes_records_summary_and_plots(vllm_backend, tmp_path):
    suite = load_suite("rg-mix:easy_arithmetic", n=2, seed=0)
    strategies = parse_strategies("single; aft:K=2,L=1; rsa:N=2,K=2,T=1", max_tokens=24)
    summary = await evaluate(vllm_backend, suite, strategies, tmp_path, concurrency=2, progress=False)

    records = load_records(tmp_path)
    assert len(records) == 2 * 3
    assert all(r["error"] is None for r in records)
    for rec in records:
        usage = rec["usage"]
        assert usage["calls"] == (1 if rec["strategy"] == "single" else 4)
        assert usage["completion_tokens"] == sum(sum(ly["completion_tokens"]) for ly in rec["layers"])
        assert all(0 < t <= 24 for ly in rec["layers"] for t in ly["completion_tokens"])
        assert all(0.0 <= s <= 1.0 for ly in rec["layers"] for s in ly["scores"])
        assert 0.0 <= rec["final_score"] <= 1.0

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["strategies"].keys() == summary["strategies"].keys() == strategies.keys()
    assert [len(s["layers"]) for s in saved["strategies"].values()] == [1, 2, 2]
    assert saved["strategies"]["aft_K2_L1"]["layers"][1]["gain"] is not None
    assert "aft_K2_L1" in (tmp_path / "summary.md").read_text()
    for name in ("accuracy_vs_compute.png", "steps.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"

    # resuming on the same engine does nothing more
    again = await evaluate(vllm_backend, suite, strategies, tmp_path, progress=False, plots=False)
    assert len(load_records(tmp_path)) == 6
    assert again["strategies"]["single"]["n"] == 2
