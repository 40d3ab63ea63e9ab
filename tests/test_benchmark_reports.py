"""The adaptive benchmark's tables and figure from records (no generation), and the notes kept
across regenerations of a benchmark page."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import adaptive  # noqa: E402

from benchmarks._notes import keep_notes  # noqa: E402


def _record(strategy, task, score, prompt, gen, calls, stopped_after=None, layer_scores=(1.0, 0.0, 1.0)):
    layer = {
        "layer": 0, "scores": list(layer_scores), "answers": ["5", "4", "5"][: len(layer_scores)],
        "completion_tokens": [gen // len(layer_scores)] * len(layer_scores),
        "prompt_tokens": [prompt // len(layer_scores)] * len(layer_scores),
    }  # fmt: skip
    return {
        "strategy": strategy, "task_id": task, "error": None, "final_score": score, "layers": [layer],
        "usage": {"prompt_tokens": prompt, "completion_tokens": gen, "calls": calls, "stopped_after": stopped_after},
    }  # fmt: skip


def test_pairs_report_accuracy_interval_tokens_and_exits():
    records = []
    for i in range(6):
        records.append(_record("aft", f"t{i}", 1.0, 1000, 300, 12))
        # The variant stops after layer 0 on half the questions: fewer tokens, one miss.
        exits = i % 2 == 0
        records.append(_record("aft+exit", f"t{i}", 0.0 if i == 5 else 1.0, 200 if exits else 1000,
                               100 if exits else 300, 4 if exits else 12, 0 if exits else None))  # fmt: skip
    (row,) = adaptive.pair_rows(records, [("aft+exit", "aft"), ("rsa+exit", "rsa")])
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["aft+exit", "aft", "6", "83.3", "100.0"]
    assert cells[5].startswith("-16.7 [")
    assert cells[6] == "600 / 200" and cells[7] == "1000 / 300"
    assert cells[8] == f"{800 / 1300:.2f}" and cells[9] == "8.0 / 12.0" and cells[10] == "3"


def test_confidence_vote_is_compared_with_the_plain_vote_of_the_same_samples():
    # Layer 0 answers 5, 4, 5 (scores 1, 0, 1): the plain majority is right on both questions.
    records = [_record("sc+confidence", "t0", 0.0, 100, 100, 3), _record("sc+confidence", "t1", 1.0, 100, 100, 3)]
    row = adaptive.same_sample_vote(records, "sc+confidence")
    assert row.startswith("| sc+confidence | 2 | 50.0 | 100.0 | -50.0 [")


def test_report_keeps_notes_and_plot_writes_a_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    (runs / "reasoning").mkdir(parents=True)
    import json

    rows = [_record(s, f"t{i}", 1.0, 500, 100, 8) for i in range(3) for s in ("sc", "sc+waves")]
    (runs / "reasoning" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = tmp_path / "adaptive.md"
    doc.write_text("old table\n<!-- notes -->\nThe reading, by hand.\n<!-- /notes -->\nold rows\n")
    monkeypatch.setattr(adaptive, "DOC", doc)
    text = adaptive.report(runs)
    assert "<!-- notes -->\nThe reading, by hand.\n<!-- /notes -->" in text
    assert "old rows" not in text and "| sc+waves | sc | 3 |" in text
    figure = adaptive.plot(runs, tmp_path / "fig.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert adaptive.plot(tmp_path / "empty", tmp_path / "none.png") is None
    assert keep_notes(tmp_path / "missing.md") == "<!-- notes -->\n<!-- /notes -->"


def test_early_exit_replay_stops_at_the_first_agreeing_layer_before_the_last():
    def layer(answers, scores):
        return {"answers": answers, "scores": scores, "prompt_tokens": [10] * 4, "completion_tokens": [5] * 4}

    record = {
        "strategy": "aft", "task_id": "t0", "error": None, "final_score": 0.0,
        "layers": [layer(["5", "5", "5", "4"], [1, 1, 1, 0]), layer(["4"] * 4, [0] * 4), layer(["4"] * 4, [0] * 4)],
        "usage": {"prompt_tokens": 120, "completion_tokens": 60, "calls": 12},
    }  # fmt: skip
    assert adaptive.replay_exit(record, 1.0) == (0, 80, 40)  # layer 1 is unanimous: it ends there
    assert adaptive.replay_exit(record, 0.75) == (1, 40, 20)  # 3 of 4 agree at layer 0
    record["layers"][1] = layer(["4", "5", "6", None], [0, 1, 0, 0])
    assert adaptive.replay_exit(record, 1.0) == (0.0, 120, 60)  # no agreement before the last layer
    (row,) = adaptive.exit_replay_rows([record], "aft", [0.75])
    assert row.startswith("| aft | 0.75 | 1 | 100.0 | 0.0 | +100.0") and row.endswith("| 0.33 | 1 |")


def test_program_vote_replay_groups_identical_programs():
    fence = "```python\ndef f():\n    return {}\n```"
    texts = [fence.format(1), fence.format(2), fence.format(2).replace("def f():", "def f():\n    # two")]
    layer = {"texts": texts, "answers": ["", "", ""], "scores": [1.0, 0.0, 0.0]}
    sc = {"strategy": "sc", "task_id": "t0", "error": None, "final_score": 1.0, "layers": [layer]}
    other = {**sc, "strategy": "sc+behaviour", "final_score": 1.0}
    rows = adaptive.program_vote_rows([sc, other], "sc", lambda r, ly: [adaptive.program_key(t, "f") for t in ly["texts"]], ["sc+behaviour"])
    # Two of the three are one program (a comment aside) and wrong: the program vote picks it.
    assert rows[0].startswith("| sc (measured) | 1 | 100.0 | 0.0 | +100.0")
    assert rows[1].startswith("| sc+behaviour | 1 | 100.0 | 0.0 | +100.0")


async def test_matched_report_pairs_both_phases_on_the_questions_all_finished(tmp_path):
    """benchmarks/aft_matched.py's two phases on scripted engines: the base model proposes (some
    right) and aggregates wrong, the "merged" aggregator always answers right; the report pairs
    every strategy on the questions finished by all and shows layers 0-3 of the depth runs."""
    import aft_matched

    from aft_graph.backends import AdapterRouter, CachingBackend, ScriptedBackend
    from aft_graph.eval import evaluate
    from aft_graph.tasks import Task

    tasks = [Task(id=f"t{i}", question=f"What is {i} + 1?", reference=str(i + 1)) for i in range(4)]
    right = {t.question: t.reference for t in tasks}

    def base(request, i):
        content = request.messages[-1]["content"]
        question = next(q for q in right if q in content)
        aggregating = "<answer>" in content  # the prompt holds proposals
        guess = "0" if aggregating or i % 2 else right[question]
        return f"Let me think. <answer>{guess}</answer>"

    def merged(request, _i):
        question = next(q for q in right if q in request.messages[-1]["content"])
        return f"Checking each proposal. <answer>{right[question]}</answer>"

    cache, out = tmp_path / "completions.jsonl", tmp_path / "run"
    for trained in (False, True):  # the phases, each with its engine behind the shared cache file
        engine = AdapterRouter(None, {"aft": ScriptedBackend(merged)}) if trained else ScriptedBackend(base)
        phase = CachingBackend(engine, cache)
        some = tasks[:3] if trained else tasks  # t3 lacks the trained runs
        await evaluate(phase, some, aft_matched.strategies(trained), out, progress=False, plots=False)
        deep = aft_matched.strategies(trained, depth=True)
        await evaluate(phase, some[:2], deep, out / "depth", progress=False, plots=False)

    text = aft_matched.report(out)
    assert text.startswith("3 questions finished by all 6 strategies")
    first_table = text.split("\n\n")[1].splitlines()
    rows = {line.split("|")[1].strip(): line for line in first_table if line.startswith("| ")}
    assert "| 1.000 [" in rows["aft_K3_L1_aft"] and "| 6.0 |" in rows["aft_K3_L1_aft"]
    assert "| 0.000 [" in rows["aft_K3_L1"]  # the base model aggregates wrong
    assert "| aft_K3_L1_aft | aft_K3_L1 | +1.000 [+1.000, +1.000] | 3 / 0 |" in text
    assert "Depth runs (AFT K=3, L=3, 12 calls; 2 questions finished by both)" in text
    depth = [line for line in text.splitlines() if line.startswith("| aft_K3_L3_aft | ")]
    assert [line.split("|")[2].strip() for line in depth[-4:]] == ["0", "1", "2", "3"]
    assert "| 1.000 [1.000, 1.000] |" in depth[-1]  # the trained layers are all right
