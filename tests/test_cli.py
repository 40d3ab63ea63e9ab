"""The ``aft-graph`` command line on ScriptedBackend: output, exit codes, engine options."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aft_graph import cli
from aft_graph.backends import ScriptedBackend
from aft_graph.backends.base import GenerationRequest

ANSWER = "Add them: \\[ 2 + 3 = 5 \\] so the answer is \\boxed{5}."


def _is_aggregation(req: GenerationRequest) -> bool:
    return "<response id=" in req.messages[-1]["content"]


@pytest.fixture
def backend(monkeypatch) -> ScriptedBackend:
    """Every command gets this backend instead of starting an engine; its options are recorded."""
    fake = ScriptedBackend(lambda req, i: ANSWER if _is_aggregation(req) else f"draft {i} \\boxed{{5}}")
    fake.options = {}

    def make_backend(model, base_url, max_model_len, lora=False, verbose=False):
        fake.options = dict(model=model, base_url=base_url, lora=lora, verbose=verbose)
        return fake

    monkeypatch.setattr(cli, "make_backend", make_backend)
    return fake


def _invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args), catch_exceptions=False)


def test_run_prints_the_answer_verbatim_and_the_usage(backend):
    result = _invoke("run", "What is 2 + 3?", "--proposals", "3", "--layers", "1")
    assert result.exit_code == 0, result.output
    # LaTeX brackets survive (rich markup would read "\[" as an escaped "[").
    assert "\\[ 2 + 3 = 5 \\]" in result.stdout
    assert "6 calls (3 proposer, 3 aggregator)" in result.stdout
    assert len(backend.calls) == 6
    assert backend.options == dict(model="default", base_url=None, lora=False, verbose=False)


def test_run_json(backend):
    result = _invoke("run", "What is 2 + 3?", "-k", "2", "-l", "2", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["answer"] == ANSWER
    assert [layer["kind"] for layer in out["layers"]] == ["proposals", "aggregation", "aggregation"]
    assert out["usage"]["calls"] == 6 == len(backend.calls)


def test_run_passes_engine_options(backend):
    result = _invoke("run", "q?", "--model", "small", "--lora", "runs/aft/adapter", "-v", "--json")
    assert result.exit_code == 0, result.output
    assert backend.options == dict(model="small", base_url=None, lora=True, verbose=True)
    aggregations = [c for c in backend.calls if _is_aggregation(c)]
    assert aggregations and {c.lora for c in aggregations} == {"runs/aft/adapter"}


def test_run_early_exit_and_selection(backend):
    result = _invoke("run", "q?", "-k", "4", "-l", "2", "--early-exit", "--select", "majority")
    assert result.exit_code == 0, result.output
    # The four drafts all answer 5: no aggregation call.
    printed = " ".join(result.stdout.split())  # rich wraps long lines
    assert "4 calls (4 proposer, 0 aggregator)" in printed and "8 calls saved" in printed
    out = json.loads(_invoke("run", "q?", "-k", "8", "--adaptive-width", "--json").stdout)
    assert out["layers"][0]["waves"] == [2, 2] and out["selection"]["rule"] == "last"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "   "], "the question is empty"),
        (["run", "q?", "--select", "vibes"], "invalid configuration"),
        (["run", "q?", "--proposals", "0"], "invalid configuration"),
        (["run", "q?", "--strategy", "best_of_n"], "needs a reward function"),
    ],
)
def test_run_rejects_bad_input_before_starting_an_engine(backend, args, message):
    result = _invoke(*args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert backend.options == {} and backend.calls == []


def test_eval_writes_a_summary(backend, tmp_path: Path):
    out = tmp_path / "eval"
    result = _invoke(
        "eval", "--tasks", "rg-mix:easy_arithmetic", "--n", "2", "--strategies", "one=single; agg=aft:K=2,L=1",
        "--out", str(out), "--no-plots",
    )
    assert result.exit_code == 0, result.output
    assert (out / "summary.json").is_file() and (out / "records.jsonl").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["strategies"]) == {"one", "agg"}
    # Per task: K=2 proposals + 2 aggregations; `single` is the first proposal, shared (same seed).
    assert len(backend.calls) == 2 * (2 + 2)
    assert "agg" in result.stdout


def test_eval_cache_replays_completions_in_a_second_run(backend, tmp_path: Path):
    cache = tmp_path / "completions.jsonl"
    args = ["eval", "--tasks", "rg-mix:easy_arithmetic", "--n", "2", "--no-plots", "--cache", str(cache)]
    first = _invoke(*args, "--strategies", "sc:K=3", "--out", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    assert len(backend.calls) == 2 * 3 and cache.is_file()  # 3 proposals a task
    second = _invoke(*args, "--strategies", "agg=aft:K=3,L=1", "--out", str(tmp_path / "b"))
    assert second.exit_code == 0, second.output
    # The proposals come from the cache: only the 3 aggregations of each task are generated.
    assert len(backend.calls) == 6 + 6 and all(_is_aggregation(r) for r in backend.calls[6:])


class _FakeVLLM:
    def __init__(self, path, **kwargs):
        self.path, self.kwargs = path, kwargs


@pytest.mark.parametrize(("verbose", "level"), [(False, "ERROR"), (True, "INFO")])
def test_make_backend_quiets_vllm_unless_verbose(monkeypatch, tmp_path, verbose, level):
    import aft_graph.backends
    import aft_graph.models

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.setattr(aft_graph.backends, "VLLMBackend", _FakeVLLM)
    monkeypatch.setattr(aft_graph.models, "resolve_model", lambda model: tmp_path)
    backend = cli.make_backend("default", None, 2048, lora=True, verbose=verbose)
    assert isinstance(backend, _FakeVLLM) and backend.kwargs["enable_lora"] is True

    assert os.environ["VLLM_LOGGING_LEVEL"] == level


def test_make_backend_keeps_a_user_log_level(monkeypatch, tmp_path):
    import aft_graph.backends
    import aft_graph.models

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    monkeypatch.setattr(aft_graph.backends, "VLLMBackend", _FakeVLLM)
    monkeypatch.setattr(aft_graph.models, "resolve_model", lambda model: tmp_path)
    cli.make_backend("default", None, 2048)

    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
