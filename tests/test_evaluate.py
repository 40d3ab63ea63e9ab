"""Evaluation harness on ScriptedBackend: metrics by hand, compute accounting, resume, suites."""

from __future__ import annotations

import json
import time

import pytest

from aft_graph import AggregateConfig, SamplingConfig
from aft_graph.backends import ScriptedBackend
from aft_graph.backends.base import derive_seed
from aft_graph.eval import (
    bootstrap_interval,
    compute_matched,
    evaluate,
    expected_calls,
    load_records,
    parse_strategies,
    question_metrics,
    strategy_label,
    summarize,
    wilson_interval,
)
from aft_graph.tasks import Task, load_suite, proxy_reward, run_humaneval, score

SAMPLING = SamplingConfig(temperature=0.7, max_tokens=32)

# Two questions; what every call of an AFT K=3, L=1 run answers, by (layer, index):
#   q1 (reference 7): proposals 7, 5, 5  -> aggregations 7, 7, 5
#   q2 (reference 3): proposals 3, 3, 1  -> aggregations 1, 1, 1
TASKS = [
    Task(id="q1", question="What is three plus four?", reference="7", kind="exact"),
    Task(id="q2", question="What is one plus two?", reference="3", kind="exact"),
]
SCRIPT = {
    "q1": {0: ["7", "5", "5"], 1: ["7", "7", "5"]},
    "q2": {0: ["3", "3", "1"], 1: ["1", "1", "1"]},
}


def _aft(k: int = 3, layers: int = 1, seed: int = 0) -> AggregateConfig:
    return AggregateConfig(
        strategy="propose_aggregate", proposals=k, layers=layers, proposer=SAMPLING, aggregator=SAMPLING, seed=seed
    )


def _scripted(**kwargs) -> ScriptedBackend:
    """Answers by (question, layer, index), recovered from the request's derived seed."""
    where = {derive_seed(0, layer, i): (layer, i) for layer in range(4) for i in range(8)}

    def responder(request, _sample):
        layer, index = where[request.sampling.seed]
        content = request.messages[-1]["content"]
        task = next(t for t in TASKS if t.question in content)
        answer = SCRIPT[task.id][min(layer, 1)][index % 3]
        return f"I think <answer>{answer}</answer>"  # 3 words = 3 tokens for ScriptedBackend

    return ScriptedBackend(responder, **kwargs)


async def test_metrics_match_hand_computation(tmp_path):
    summary = await evaluate(
        _scripted(), TASKS, {"aft": _aft()}, tmp_path, share_samples=False, progress=False, plots=False
    )
    records = {r["task_id"]: r for r in load_records(tmp_path)}
    q1, q2 = (question_metrics(records[q]) for q in ("q1", "q2"))
    # q1: proposals [1,0,0]; aggregations [1,1,0], each read all three proposals (mean 1/3)
    assert q1[0]["pass1"] == pytest.approx(1 / 3)
    assert q1[0]["majority"] == 0.0  # "5" wins the vote
    assert q1[0]["pass_n"] == 1.0
    assert q1[1]["pass1"] == pytest.approx(2 / 3)
    assert q1[1]["majority"] == 1.0
    assert q1[1]["source_acc"] == pytest.approx(1 / 3)
    assert q1[1]["gain"] == pytest.approx(((1 - 1 / 3) + (1 - 1 / 3) + (0 - 1 / 3)) / 3)
    # q2: proposals [1,1,0]; aggregations [0,0,0]
    assert (q2[0]["pass1"], q2[0]["majority"], q2[0]["pass_n"]) == (pytest.approx(2 / 3), 1.0, 1.0)
    assert (q2[1]["pass1"], q2[1]["majority"], q2[1]["pass_n"]) == (0.0, 0.0, 0.0)
    assert q2[1]["gain"] == pytest.approx(-2 / 3)
    assert records["q1"]["final_score"] == 1.0  # select=last: the first aggregation
    assert records["q2"]["final_score"] == 0.0

    s = summary["strategies"]["aft"]
    assert s["n"] == 2 and s["errors"] == 0
    assert s["final"] == 0.5
    layer0, layer1 = s["layers"]
    assert layer0["pass1"] == pytest.approx(0.5)
    assert layer0["majority"] == pytest.approx(0.5)
    assert layer0["pass_n"] == pytest.approx(1.0)
    assert layer1["pass1"] == pytest.approx(1 / 6 + 1 / 6)
    assert layer1["majority"] == pytest.approx(0.5)
    assert layer1["pass_n"] == pytest.approx(0.5)
    assert layer1["gain"] == pytest.approx((1 / 3 - 2 / 3) / 2)
    assert layer0["gain"] is None
    assert s["final_ci"] == pytest.approx(wilson_interval(1, 2))
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "summary.md").is_file()
    assert "| aft | 1 |" in (tmp_path / "summary.md").read_text()


def test_gain_uses_sources_of_each_aggregation():
    # An RSA-like layer: each aggregation reads a 2-subset; gain is measured against what it read.
    record = {
        "layers": [
            {"layer": 0, "scores": [1.0, 0.0, 0.0, 0.0], "answers": ["a", "b", "b", "c"], "sources": [[], [], [], []],
             "prompt_tokens": [5] * 4, "completion_tokens": [10, 20, 30, 40], "failures": []},
            {"layer": 1, "scores": [1.0, 1.0, 0.0, 0.0], "answers": ["a", "a", "b", "b"],
             "sources": [[0, 1], [2, 3], [1, 2], [0, 3]],
             "prompt_tokens": [50] * 4, "completion_tokens": [1, 2, 3, 4], "failures": ["call 4: boom"]},
        ]
    }
    m0, m1 = question_metrics(record)
    assert (m0["pass1"], m0["majority"], m0["pass_n"]) == (0.25, 0.0, 1.0)
    assert m0["gen_tokens"] == 100 and m0["prompt_tokens"] == 20 and m0["calls"] == 4
    assert m1["source_acc"] == pytest.approx((0.5 + 0.0 + 0.0 + 0.5) / 4)
    assert m1["gain"] == pytest.approx(((1 - 0.5) + (1 - 0) + (0 - 0) + (0 - 0.5)) / 4)
    assert m1["majority"] == 1.0  # "a" and "b" tie at 2: the first group wins, like majority_vote
    assert m1["gen_tokens"] == 110 and m1["prompt_tokens"] == 220 and m1["calls"] == 9  # failure counts


async def test_compute_accounting_is_exact(tmp_path):
    backend = _scripted()
    await evaluate(backend, TASKS, {"aft": _aft()}, tmp_path, share_samples=False, progress=False, plots=False)
    records = load_records(tmp_path)
    assert len(backend.calls) == 2 * 6
    for rec in records:
        task = next(t for t in TASKS if t.id == rec["task_id"])
        mine = [r for r in backend.calls if task.question in r.messages[-1]["content"]]
        assert rec["usage"]["calls"] == len(mine) == 6
        assert rec["usage"]["completion_tokens"] == 6 * 3
        assert rec["usage"]["prompt_tokens"] == sum(backend.count_prompt_tokens(r) for r in mine)
        m = question_metrics(rec)
        assert [row["calls"] for row in m] == [3, 6]
        assert [row["gen_tokens"] for row in m] == [9, 18]
        assert m[-1]["prompt_tokens"] == rec["usage"]["prompt_tokens"]


async def test_shared_samples_generate_once_but_count_for_each(tmp_path):
    strategies = {
        "sc": AggregateConfig(strategy="self_consistency", proposals=3, proposer=SAMPLING, seed=0),
        "aft": _aft(),
    }
    backend = _scripted()
    summary = await evaluate(backend, TASKS, strategies, tmp_path, progress=False, plots=False)
    # per question: 3 proposals (shared by both strategies) + 3 aggregations
    assert len(backend.calls) == 2 * (3 + 3)
    assert summary["shared_samples"] == {"generated": 12, "reused": 6}
    assert summary["strategies"]["sc"]["calls"] == 3
    assert summary["strategies"]["aft"]["calls"] == 6
    # paired: self-consistency voted over exactly the proposals AFT aggregated
    recs = {(r["strategy"], r["task_id"]): r for r in load_records(tmp_path)}
    for q in ("q1", "q2"):
        assert recs[("sc", q)]["layers"][0]["texts"] == recs[("aft", q)]["layers"][0]["texts"]
    assert summary["strategies"]["sc"]["final"] == 0.5  # q1 majority "5" wrong, q2 majority "3" right
    (diff,) = summary["differences"]
    assert (diff["strategy"], diff["reference"], diff["n"], diff["diff"]) == ("aft", "sc", 2, 0.0)


async def test_confidence_vote_shares_the_plain_votes_samples(tmp_path):
    """A confidence-weighted vote and a plain one count the same samples, generated once with
    log-probabilities (a backend without them: nothing asks for them)."""
    strategies = {
        "sc": AggregateConfig(strategy="self_consistency", proposals=3, proposer=SAMPLING, seed=0),
        "sc+conf": AggregateConfig(
            strategy="self_consistency", proposals=3, proposer=SAMPLING, seed=0, select="confidence"
        ),
    }
    backend = _scripted()
    summary = await evaluate(backend, TASKS, strategies, tmp_path, progress=False, plots=False)
    assert len(backend.calls) == 2 * 3 and all(r.sampling.logprobs for r in backend.calls)
    assert summary["shared_samples"] == {"generated": 6, "reused": 6}
    recs = {(r["strategy"], r["task_id"]): r for r in load_records(tmp_path)}
    for q in ("q1", "q2"):
        assert recs[("sc", q)]["layers"][0]["texts"] == recs[("sc+conf", q)]["layers"][0]["texts"]
    without = await evaluate(
        _scripted(logprobs=False), TASKS, {"sc": strategies["sc"]}, tmp_path / "plain", progress=False, plots=False
    )
    assert without["shared_samples"] == {"generated": 6, "reused": 0}  # no log-probabilities asked


async def test_resume_skips_finished_questions(tmp_path):
    strategies = {"aft": _aft(), "sc": AggregateConfig(strategy="self_consistency", proposals=3, proposer=SAMPLING)}
    # first run: q2 fails under AFT (every call of its proposal layer fails)
    failing = _scripted(fail=lambda r: "one plus two" in r.messages[-1]["content"] and r.sampling.seed in {derive_seed(0, 0, i) for i in range(3)})
    await evaluate(failing, TASKS, strategies, tmp_path, share_samples=False, progress=False, plots=False)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4
    errors = [json.loads(x) for x in lines if json.loads(x)["error"]]
    assert {(r["strategy"], r["task_id"]) for r in errors} == {("aft", "q2"), ("sc", "q2")}
    # an interrupted write leaves half a line; it must be ignored
    with (tmp_path / "records.jsonl").open("a") as f:
        f.write('{"strategy": "aft", "task_')
    second = _scripted()
    with pytest.warns(UserWarning, match="not valid JSON"):
        summary = await evaluate(second, TASKS, strategies, tmp_path, share_samples=False, progress=False, plots=False)
    # only the two failed questions ran again: AFT q2 (6 calls) and SC q2 (3 calls)
    assert len(second.calls) == 9
    assert all("one plus two" in r.messages[-1]["content"] for r in second.calls)
    assert summary["strategies"]["aft"]["n"] == 2 and summary["strategies"]["aft"]["errors"] == 0
    # a third run has nothing left to do
    third = _scripted()
    with pytest.warns(UserWarning):
        await evaluate(third, TASKS, strategies, tmp_path, progress=False, plots=False)
    assert third.calls == []


async def test_resume_refuses_a_changed_configuration(tmp_path):
    await evaluate(_scripted(), TASKS[:1], {"aft": _aft()}, tmp_path, progress=False, plots=False)
    with pytest.raises(ValueError, match="different configuration"):
        await evaluate(_scripted(), TASKS[:1], {"aft": _aft(k=2)}, tmp_path, progress=False, plots=False)


async def test_time_limit_stops_starting_questions(tmp_path):
    summary = await evaluate(
        _scripted(), TASKS, {"aft": _aft()}, tmp_path, time_limit_s=0.0, concurrency=1, progress=False, plots=False
    )
    assert summary["strategies"]["aft"]["n"] == 0  # a rerun without the limit would continue


async def test_plots_are_written(tmp_path):
    strategies = {"single": AggregateConfig(strategy="self_consistency", proposals=1, proposer=SAMPLING)}
    strategies.update({f"aft{k}{n}": _aft(k=k, layers=n) for k in (2, 3) for n in (1, 2)})
    await evaluate(_scripted(), TASKS, strategies, tmp_path, progress=False)
    for name in ("accuracy_vs_compute.png", "width_depth.png", "steps.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_compute_matched_spends_equal_calls():
    strategies = compute_matched(8, max_tokens=64)
    assert list(strategies) == ["single", "sc_K8", "bon_K8", "refine_L7", "aft_K4_L1", "rsa_N4_K2_T1"]
    assert {name: expected_calls(c) for name, c in strategies.items()} == {
        "single": 1, "sc_K8": 8, "bon_K8": 8, "refine_L7": 8, "aft_K4_L1": 8, "rsa_N4_K2_T1": 8,
    }
    assert all(c.proposer.max_tokens == c.aggregator.max_tokens == 64 for c in strategies.values())
    deeper = compute_matched(9, aft_layers=2, rsa_steps=2, rsa_subset=3, include=("aft", "rsa"))
    assert {n: expected_calls(c) for n, c in deeper.items()} == {"aft_K3_L2": 9, "rsa_N3_K3_T2": 9}


async def test_matched_strategies_really_spend_what_they_promise(tmp_path):
    strategies = compute_matched(4, max_tokens=32, include=("single", "self_consistency", "self_refine", "aft", "rsa"))
    summary = await evaluate(_scripted(), TASKS, strategies, tmp_path, progress=False, plots=False)
    for name, s in summary["strategies"].items():
        assert s["calls"] == s["expected_calls"] == (1 if name == "single" else 4), name
    # differences against the 1-call reference and against the compute-matched vote, each pair once
    assert summary["references"] == ["single", "sc_K4"]
    pairs = [(d["strategy"], d["reference"]) for d in summary["differences"]]
    assert len(pairs) == 4 + 3 and ("single", "sc_K4") not in pairs


def test_parse_strategies():
    parsed = parse_strategies("single; sc:K=4; aft:K=4,L=1; rsa:N=4,K=2,T=1; mine=bon:K=3,temperature=0.3")
    assert list(parsed) == ["single", "sc_K4", "aft_K4_L1", "rsa_N4_K2_T1", "mine"]
    assert parsed["rsa_N4_K2_T1"].subset_size == 2 and parsed["rsa_N4_K2_T1"].population == 4
    assert parsed["mine"].proposer.temperature == 0.3 and parsed["mine"].strategy == "best_of_n"
    assert list(parse_strategies("matched:6,include=sc+aft")) == ["sc_K6", "aft_K3_L1"]
    with pytest.raises(ValueError, match="unknown strategy"):
        parse_strategies("magic:K=2")
    assert strategy_label(_aft(4, 2)) == "aft_K4_L2"
    # the trained aggregator as a strategy option: its own label, so it sits beside the untrained
    trained = parse_strategies("aft:K=3,L=1; aft:K=3,L=1,lora=aft; rsa:N=4,K=2,T=1,lora=/runs/x/adapter")
    assert list(trained) == ["aft_K3_L1", "aft_K3_L1_aft", "rsa_N4_K2_T1_adapter"]
    assert trained["aft_K3_L1_aft"].aggregator_lora == "aft" and trained["aft_K3_L1"].aggregator_lora is None


def test_intervals():
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert bootstrap_interval([0.5] * 5) == (0.5, 0.5)
    lo, hi = bootstrap_interval([0.0, 1.0] * 20)
    assert lo < 0.5 < hi


def test_summarize_without_configs_reads_them_from_records(tmp_path):
    import asyncio

    asyncio.run(evaluate(_scripted(), TASKS, {"x": _aft()}, tmp_path, progress=False, plots=False))
    summary = summarize(load_records(tmp_path))
    assert summary["strategies"]["x"]["label"] == "aft_K3_L1"


# --------------------------------------------------------------------------------------- suites


@pytest.mark.parametrize("name", ["rg-mix:easy_arithmetic", "rg:gcd", "humaneval", "champ"])
def test_suites_are_deterministic_under_a_seed(name):
    if name == "champ":
        pytest.importorskip("champ_dataset")
    a, b = load_suite(name, n=6, seed=3), load_suite(name, n=6, seed=3)
    assert [(t.id, t.question, t.reference) for t in a] == [(t.id, t.question, t.reference) for t in b]
    assert len({t.id for t in a}) == 6
    longer = load_suite(name, n=9, seed=3)
    assert [t.question for t in longer][:6] == [t.question for t in a]  # growing n keeps the prefix
    other = load_suite(name, n=6, seed=4)
    assert [t.question for t in other] != [t.question for t in a]


def test_reasoning_gym_scoring_uses_the_datasets_own_scorer():
    suite = load_suite("rg-mix:easy_arithmetic", n=8, seed=0)
    assert {t.metadata["dataset"] for t in suite} >= {"basic_arithmetic", "lcm"} or len(suite) == 8
    for task in suite:
        assert "<answer>" in task.question
        assert score(task, f"so <answer>{task.reference}</answer>") == 1.0
        assert score(task, "so <answer>not a number</answer>") == 0.0


def test_jsonl_suite_checkers(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps({"question": "Half of one?", "answer": "1/2"}) + "\n"
        + json.dumps({"id": "cap", "question": "Capital of France?", "answer": "Paris"}) + "\n"
    )
    math_suite = load_suite(f"jsonl:{path}", seed=None, checker="math")
    assert [t.id for t in math_suite] == ["qa-1", "cap"]
    assert score(math_suite[0], "It is \\boxed{0.5}") == 1.0
    assert score(math_suite[0], "It is \\boxed{0.25}") == 0.0
    exact = load_suite(f"jsonl:{path}", seed=None, checker="exact")
    assert score(exact[1], "<answer>paris</answer>") == 1.0
    assert score(exact[1], "<answer>Paris, France</answer>") == 0.0
    contains = load_suite(f"jsonl:{path}", seed=None, checker="contains")
    assert score(contains[1], "<answer>Paris, France</answer>") == 1.0
    with pytest.raises(ValueError, match="unknown suite"):
        load_suite("gsm8k")


# ------------------------------------------------------------------------------------- HumanEval


@pytest.fixture(scope="module")
def humaneval_task():
    return next(t for t in load_suite("humaneval", seed=None) if t.id == "HumanEval/0")


def test_humaneval_accepts_a_correct_solution(humaneval_task):
    body = humaneval_task.reference[len(humaneval_task.metadata["prompt"]) :]
    fenced = f"Here is the code:\n```python\n{humaneval_task.reference}\n```\nIt checks all pairs."
    assert score(humaneval_task, fenced) == 1.0
    assert score(humaneval_task, body) == 1.0  # a bare body continuing the signature


def test_humaneval_rejects_a_wrong_solution(humaneval_task):
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    result = run_humaneval(humaneval_task, wrong)
    assert not result["passed"] and "AssertionError" in result["result"]
    assert score(humaneval_task, "I cannot write this function.") == 0.0


def test_humaneval_kills_an_infinite_loop(humaneval_task):
    loop = "```python\ndef has_close_elements(numbers, threshold):\n    while True:\n        pass\n```"
    t0 = time.monotonic()
    result = run_humaneval(humaneval_task, loop, timeout=2)
    assert result == {"passed": False, "result": "timed out"}
    assert time.monotonic() - t0 < 6


def test_humaneval_limits_memory(humaneval_task):
    hog = "```python\ndef has_close_elements(numbers, threshold):\n    x = bytearray(8 << 30)\n    return True\n```"
    assert not run_humaneval(humaneval_task, hog, memory_mb=512)["passed"]


def test_proxy_reward_prefers_well_formed_short_answers(humaneval_task):
    arithmetic = Task(id="a", question="1+1?", reference="2", kind="reasoning_gym")
    reward = proxy_reward([arithmetic, humaneval_task])
    tagged, untagged = "so <answer>3</answer>", "so the answer is 2"
    assert reward("1+1?", tagged) > reward("1+1?", untagged)  # it never looks at the reference
    assert reward("1+1?", tagged) > reward("1+1?", "long reasoning " * 20 + tagged)
    good = f"```python\n{humaneval_task.reference}\n```"
    assert reward(humaneval_task.question, good) > reward(humaneval_task.question, "```python\ndef oops(:\n```")
