"""One home for verifiable tasks: the shared reasoning-gym generator, one scoring path for the
evaluation suites and the trainer's verifier, the disjointness proof, the recipe's query stage,
the statistics, and the old import paths."""

from __future__ import annotations

import json

import pytest

from aft_graph.backends import ScriptedBackend
from aft_graph.tasks import (
    ANSWER_INSTRUCTIONS,
    EVALUATION_SUITES,
    RG_ANSWER_INSTRUCTION,
    Task,
    TaskOverlapError,
    TaskSpec,
    Verifier,
    assert_disjoint,
    bare_question,
    check_answer,
    evaluation_suites,
    load_suite,
    reasoning_gym_tasks,
    score,
)
from trainer.config import AggregationConfig, DemoConfig
from trainer.records import ProposalRecord, TaskRecord
from trainer.tasks import DEFAULT_MIX, generate_tasks

GCD = (TaskSpec(name="gcd", config={"max_value": 30}),)
ONE_DIGIT_SUM = (
    TaskSpec(
        name="basic_arithmetic",
        config=dict(
            min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+",),
            allow_negation=False, allow_parentheses=False,
        ),
    ),
)


# ----------------------------------------------------------------------------- the generator


def test_generator_is_seeded_prefix_stable_and_records_item_seeds():
    a = reasoning_gym_tasks(GCD, 6, seed=5)
    assert [t.question for t in a] == [t.question for t in reasoning_gym_tasks(GCD, 6, seed=5)]
    assert [t.id for t in reasoning_gym_tasks(GCD, 9, seed=5)][:6] == [t.id for t in a]
    assert [t.metadata["item_seed"] for t in a] == [5 + j for j in range(6)]
    assert all(t.question.endswith(RG_ANSWER_INSTRUCTION) for t in a)
    # the evaluation suites are this generator (ids, questions and seeds)
    suite = load_suite("rg:gcd", n=4, seed=5)
    assert [t.metadata["item_seed"] for t in suite] == [5, 6, 7, 8]


def test_generator_unique_and_exclude_by_bare_question():
    # 1-digit sums: a small space, so repeats are frequent without `unique`
    many = reasoning_gym_tasks(ONE_DIGIT_SUM, 60, seed=1)
    assert len({bare_question(t.question) for t in many}) < 60
    unique = reasoning_gym_tasks(ONE_DIGIT_SUM, 60, seed=1, unique=True)
    assert len({bare_question(t.question) for t in unique}) == 60
    # excluded under another instruction still counts as the same question
    tagged = [f"{t.metadata['entry']['question']}\n\n{ANSWER_INSTRUCTIONS['tag']}" for t in unique[:10]]
    rest = reasoning_gym_tasks(ONE_DIGIT_SUM, 30, seed=1, exclude=tagged, unique=True)
    assert not {bare_question(t.question) for t in rest} & {bare_question(q) for q in tagged}
    with pytest.raises(ValueError, match="fewer than"):
        reasoning_gym_tasks(ONE_DIGIT_SUM, 300, seed=1, unique=True)  # about 120 distinct sums


# ------------------------------------------------------------------------- one scoring path


def test_trainer_verifier_and_evaluation_score_agree():
    tasks = load_suite("rg-mix:easy_arithmetic", n=12, seed=2)
    verifier = Verifier()
    for task in tasks:
        record = TaskRecord.from_task(task)
        for text in (f"<answer>{task.reference}</answer>", "<answer>-12345</answer>", "no answer"):
            expected = score(task, text)
            assert verifier.score(task, text) == expected
            assert verifier.score(record, text) == expected  # the trainer's record, same verdict
    assert score(tasks[0], f"so <answer>{tasks[0].reference}</answer>") == 1.0
    assert check_answer(tasks[0], None) == 0.0
    with pytest.raises(ValueError, match="unknown kind"):
        check_answer(Task(id="x", question="q", reference="1", kind="poem"), "1")


def test_trainer_records_come_from_the_shared_generator():
    records = generate_tasks(DEFAULT_MIX, 8, seed=3, prefix="train-")
    tasks = reasoning_gym_tasks(
        DEFAULT_MIX, 8, seed=3, instruction=ANSWER_INSTRUCTIONS["tag"], unique=True, id_prefix="train-"
    )
    assert [(r.id, r.question, r.answer) for r in records] == [(t.id, t.question, t.reference) for t in tasks]
    assert [r.metadata["item_seed"] for r in records] == [t.metadata["item_seed"] for t in tasks]
    assert [r.to_task().metadata["item_seed"] for r in records] == [t.metadata["item_seed"] for t in tasks]


# ---------------------------------------------------------------------------- disjointness


def test_assert_disjoint_checks_seeds_and_questions():
    a = reasoning_gym_tasks(GCD, 10, seed=0)
    b = reasoning_gym_tasks(GCD, 10, seed=100)
    assert assert_disjoint(a, b) == 20
    with pytest.raises(TaskOverlapError, match="item seeds") as info:
        assert_disjoint(a, reasoning_gym_tasks(GCD, 5, seed=8))  # seeds 8..12 meet 0..9
    assert "gcd seed 8" in str(info.value)
    # the same question under another instruction, from no generator
    copy = [Task(id="mine", question=bare_question(a[3].question) + "\n\nAnswer briefly.", reference="1")]
    assert assert_disjoint(a, copy) == 11
    copy = [Task(id="mine", question=f"{a[3].metadata['entry']['question']}\n\n{ANSWER_INSTRUCTIONS['boxed']}", reference="1")]
    with pytest.raises(TaskOverlapError, match="1 questions"):
        assert_disjoint(a, copy)
    # trainer records are checked through to_task()
    with pytest.raises(TaskOverlapError):
        assert_disjoint([TaskRecord.from_task(t) for t in a], a[:1])


def test_the_demo_queries_are_disjoint_from_every_evaluation_suite(tmp_path):
    from trainer.stages import queries

    config = DemoConfig()
    q = queries(
        tmp_path, config.mix, config.train_size, config.eval_size, seed=config.task_seed,
        eval_suites=config.eval_suites,
    )  # fmt: skip
    assert len(q.train) == config.train_size and len(q.heldout) == config.eval_size
    assert set(config.eval_suites) == set(EVALUATION_SUITES)
    assert set(q.checked) == {s.name for s in evaluation_suites(config.eval_suites)}
    assert assert_disjoint(q.train, q.heldout) == config.train_size + config.eval_size


def test_query_stage_proves_disjointness_and_resumes(tmp_path):
    from trainer.stages import queries

    suites = ("rg-mix:easy_arithmetic",)
    q = queries(tmp_path, DEFAULT_MIX, 12, 6, seed=500_000, eval_suites=suites)
    assert not q.resumed and q.checked == {"rg-mix:easy_arithmetic": 200}
    manifest = json.loads((tmp_path / "queries.json").read_text())
    assert manifest["checked"] == q.checked and manifest["params"]["heldout_seed"] == 1_500_000
    again = queries(tmp_path, DEFAULT_MIX, 12, 6, seed=500_000, eval_suites=suites)
    assert again.resumed and [t.id for t in again.train] == [t.id for t in q.train]
    other = queries(tmp_path, DEFAULT_MIX, 12, 6, seed=600_000, eval_suites=suites)
    assert not other.resumed and [t.id for t in other.train] != [t.id for t in q.train]
    # Training data from the evaluation seed range is refused: with another config its questions
    # differ (the text check passes), but the items come from the same random streams.
    bigger = (TaskSpec(name="basic_arithmetic", config={"min_terms": 2, "max_terms": 2, "max_digits": 3}),)
    with pytest.raises(TaskOverlapError, match="evaluation suite rg-mix:easy_arithmetic.*item seeds"):
        queries(tmp_path / "bad", bigger, 12, 6, seed=0, eval_suites=suites)


# ------------------------------------------------------------------ stages on a fake engine


def _answering(tasks: list[TaskRecord]):
    answers = {bare_question(t.question): t.answer for t in tasks}

    def respond(request, i: int) -> str:
        prompt = request.messages[-1]["content"]
        for question, answer in answers.items():
            if question in bare_question(prompt):
                # sample 0 right, others wrong: selection and rejection have work to do
                return f"<answer>{answer if i == 0 else -1}</answer>"
        return "no idea"

    return respond


async def test_stages_chain_on_a_scripted_engine(tmp_path):
    from trainer import stages

    q = stages.queries(tmp_path, DEFAULT_MIX, 4, 2, seed=700_000, eval_suites=("rg-mix:easy_arithmetic",))
    backend = ScriptedBackend(_answering(q.train + q.heldout))
    verifier = Verifier()
    report = await stages.proposals(backend, q.train, tmp_path / "proposals.jsonl", samples=3, max_tokens=16, show_progress=False)
    assert report.kept == 4
    report, rewards = await stages.select(tmp_path, verifier, 2, show_progress=False)
    assert rewards["proposals"] == 12 and rewards["proposals_accepted"] == 4
    assert rewards["kept_proposals"] == 8 and rewards["mean_kept_reward"] == 0.5
    acfg = AggregationConfig(mode="self", samples=2, keep=1, max_tokens=16, k=2)
    report, examples = await stages.targets(backend, tmp_path, acfg, verifier, show_progress=False)
    assert len(examples) == 4 and all(verifier.accepts(e, e.target) for e in examples)

    await stages.proposals(backend, q.heldout, tmp_path / "eval_proposals.jsonl", samples=2, max_tokens=16, show_progress=False)
    heldout = [ProposalRecord.model_validate_json(line) for line in (tmp_path / "eval_proposals.jsonl").read_text().splitlines()]
    base = stages.proposal_baselines(heldout, verifier, 2)
    # one right, one wrong: the vote is a tie, which the first answer wins (like majority_vote)
    assert base == {"proposal_accuracy": 0.5, "majority_vote_accuracy": 1.0, "any_proposal_right": 1.0}
    calls = len(backend.calls)
    rows = await stages.evaluate(backend, heldout, tmp_path / "heldout_base.json", lora=None, k=2, max_tokens=16, verifier=verifier)
    assert len(backend.calls) == calls + 4 and [r["id"] for r in rows] == [r.id for r in heldout]
    assert all(r["aggregation_score"] == 1.0 and r["aggregation_tagged"] for r in rows)
    again = await stages.evaluate(backend, heldout, tmp_path / "heldout_base.json", lora=None, k=2, max_tokens=16, verifier=verifier)
    assert again == rows and len(backend.calls) == calls + 4  # finished work is not redone
    # a prompt ablation: the vote-evidence template, aggregations only, cached apart from the rest
    voted = await stages.evaluate(
        backend, heldout, tmp_path / "heldout_aft-vote.json", lora=None, k=2, max_tokens=16,
        verifier=verifier, template="aft-vote", direct=False,
    )  # fmt: skip
    new_calls = backend.calls[calls + 4 :]
    assert len(new_calls) == 2 and all("Final answers stated:" in c.messages[-1]["content"] for c in new_calls)
    assert all("direct" not in r and r["aggregation_score"] == 1.0 for r in voted)
    assert stages.vote_scores(heldout, verifier, 2) == [1.0, 1.0]
    assert stages.vote_scores(heldout, verifier, 1) == [1.0, 1.0]
    # An interrupted evaluation resumes with the rows it had: only the missing one is asked again.
    out = tmp_path / "heldout_x.json"
    partial = out.with_name(out.name + ".partial.jsonl")
    full = await stages.evaluate(backend, heldout, tmp_path / "heldout_y.json", lora=None, k=2, max_tokens=8, verifier=verifier, direct=False)
    key = {"ids": [r.id for r in heldout], "lora": None, "k": 2, "max_tokens": 8, "template": "aft", "direct": False}
    partial.write_text(json.dumps({"key": key}) + "\n" + json.dumps(full[0]) + "\n" + '{"id": "half-writ')
    calls = len(backend.calls)
    resumed = await stages.evaluate(backend, heldout, out, lora=None, k=2, max_tokens=8, verifier=verifier, direct=False)
    assert resumed == full and len(backend.calls) == calls + 1 and not partial.exists()
    # Rows made with other settings are not reused.
    other = tmp_path / "heldout_z.json.partial.jsonl"
    other.write_text(json.dumps({"key": {**key, "k": 1}}) + "\n" + json.dumps(full[0]) + "\n")
    calls = len(backend.calls)
    await stages.evaluate(backend, heldout, tmp_path / "heldout_z.json", lora=None, k=2, max_tokens=8, verifier=verifier, direct=False)
    assert len(backend.calls) == calls + 2 and not other.exists()
    # Another model's rows under the same file name are refused, not overwritten (nor its partial rows).
    merged = {**key, "model": "runs/a/merged"}
    (tmp_path / "heldout_m.json").write_text(json.dumps({"key": merged, "rows": full}))
    (tmp_path / "heldout_p.json.partial.jsonl").write_text(json.dumps({"key": merged}) + "\n" + json.dumps(full[0]) + "\n")
    for name in ("heldout_m.json", "heldout_p.json"):
        with pytest.raises(ValueError, match=r"holds the held-out rows of model runs/a/merged, not of model runs/b/merged.*name of its own"):
            await stages.evaluate(backend, heldout, tmp_path / name, lora=None, k=2, max_tokens=8, verifier=verifier, direct=False, model="runs/b/merged")
    assert json.loads((tmp_path / "heldout_m.json").read_text())["rows"] == full
    assert (tmp_path / "heldout_p.json.partial.jsonl").read_text().count("\n") == 2
    assert len(backend.calls) == calls + 2


async def test_own_heldout_proposals_pair_with_the_base_models(tmp_path):
    """The evaluated model's own held-out proposals: same tasks, same seeds, the base order."""
    from trainer import stages

    q = stages.queries(tmp_path, DEFAULT_MIX, 2, 3, seed=710_000, eval_suites=())
    base_model = ScriptedBackend(_answering(q.heldout))
    await stages.proposals(base_model, q.heldout, tmp_path / "eval_proposals.jsonl", samples=2, max_tokens=16, show_progress=False)
    base = [ProposalRecord.model_validate_json(line) for line in (tmp_path / "eval_proposals.jsonl").read_text().splitlines()]
    base = base[::-1]  # whatever order the base records are in, the own ones follow it
    trained = ScriptedBackend(_answering(q.heldout))
    own_path = tmp_path / "eval_proposals_merged.jsonl"
    own = await stages.own_heldout_proposals(trained, q.heldout, base, own_path, samples=2, max_tokens=16, lora="aft", show_progress=False)
    assert [r.id for r in own] == [r.id for r in base]
    assert len(trained.calls) == 3 and all(c.lora == "aft" for c in trained.calls)
    # The same per-task seeds as the base model's proposals: only the model differs.
    assert sorted(c.sampling.seed for c in trained.calls) == sorted(c.sampling.seed for c in base_model.calls)
    again = await stages.own_heldout_proposals(trained, q.heldout, base, own_path, samples=2, max_tokens=16, show_progress=False)
    assert again == own and len(trained.calls) == 3  # resumed: nothing sampled twice
    # A query without proposals is named, and running again samples only that one.
    lines = own_path.read_text().splitlines()
    own_path.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(RuntimeError, match="1 held-out queries got no proposal"):
        await stages.own_heldout_proposals(
            ScriptedBackend(lambda request, i: ""), q.heldout, base, own_path, samples=2, max_tokens=16, show_progress=False
        )
    await stages.own_heldout_proposals(trained, q.heldout, base, own_path, samples=2, max_tokens=16, show_progress=False)
    assert len(trained.calls) == 4


def test_paired_comparisons_of_the_trained_aggregator():
    from trainer import stages

    after = [{"aggregation_score": s} for s in (1.0, 1.0, 1.0, 0.0, 1.0, 1.0)]
    before = [{"aggregation_score": s} for s in (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)]
    paired = stages.paired_comparisons(after, before, {"majority of 3": [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]})
    untrained = paired["untrained aggregator"]
    assert untrained["baseline"] == 0.3333 and untrained["difference"] == 0.5
    assert (untrained["wins"], untrained["losses"]) == (3, 0)
    assert 0.0 < untrained["low"] <= 0.5 <= untrained["high"] <= 1.0
    vote = paired["majority of 3"]
    assert vote["difference"] == 0.0 and (vote["wins"], vote["losses"]) == (1, 1)
    assert vote["low"] < 0.0 < vote["high"]


# ------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize(("k", "n"), [(0, 10), (5, 10), (7, 9), (30, 30), (1, 50)])
def test_wilson_matches_scipy_for_integer_counts(k, n):
    from scipy.stats import binomtest

    from aft_graph.eval import wilson_interval

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == (pytest.approx(ci.low, abs=2e-4), pytest.approx(ci.high, abs=2e-4))


def test_bootstrap_is_bca_seeded_and_brackets_the_mean():
    from aft_graph.eval import bootstrap_interval

    diffs = [1.0] * 9 + [0.0] * 25 + [-1.0] * 6  # paired differences, mean 0.075
    lo, hi = bootstrap_interval(diffs)
    assert lo < 0.075 < hi and bootstrap_interval(diffs) == (lo, hi)
    # close to the normal approximation mean +- 1.96 sd / sqrt(n) on 40 values
    n = len(diffs)
    sd = (sum((d - 0.075) ** 2 for d in diffs) / (n - 1)) ** 0.5
    half = 1.96 * sd / n**0.5
    assert (lo, hi) == (pytest.approx(0.075 - half, abs=0.03), pytest.approx(0.075 + half, abs=0.03))
    assert bootstrap_interval([0.5] * 5) == (0.5, 0.5) and bootstrap_interval([0.25]) == (0.25, 0.25)


# ---------------------------------------------------------------------------- old imports


def test_old_import_paths_still_work():
    import aft_graph.eval as ev
    import aft_graph.evaluate as old
    import aft_graph.plots as old_plots

    assert old.evaluate is ev.evaluate and old.summarize is ev.summarize
    assert set(old.__all__) == set(ev.__all__)
    assert old_plots.write_plots is ev.write_plots


# ------------------------------------------------------------- the recipe on a fake engine


async def test_recipe_runs_the_stages_and_resumes(tmp_path, monkeypatch):
    """run_recipe end to end on ScriptedBackend; SFT itself (a real model) is replaced by a fixed
    result here and trained for real in tests/test_trainer_real.py."""
    from trainer import recipe, stages
    from trainer.sft import SFTResult

    trained = []

    async def fake_sft(config, *, show_progress=True):
        trained.append(config)
        adapter = config.output_dir / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        return SFTResult(config.output_dir, adapter, examples=4, steps=2, losses=[(1, 0.9), (2, 0.5)])

    monkeypatch.setattr(stages, "sft", fake_sft)
    config = DemoConfig(
        out=tmp_path, train_size=4, eval_size=2, proposals=3, k=2, aggregation_samples=2,
        keep=1, steps=2, merged=False, task_seed=300_000, eval_suites=("rg-mix:easy_arithmetic",),
    )  # fmt: skip
    q = stages.queries(tmp_path, config.mix, 4, 2, seed=300_000, eval_suites=config.eval_suites)
    backend = ScriptedBackend(_answering(q.train + q.heldout))
    summary = await recipe.run_recipe(config, backend=backend, show_progress=False)
    assert summary["disjoint_from"] == {"rg-mix:easy_arithmetic": 200}
    assert summary["rewards"]["training_examples"] == 4 and trained[0].seed == config.seed
    assert summary["heldout"]["questions"] == 2 and summary["heldout"]["aggregator_after"] == 1.0
    assert summary["sft"]["first_loss"] == 0.9 and len(summary["graph"]) == 2
    # the scripted aggregator restates proposal 0 (the right one) verbatim: counted as a copy
    assert summary["heldout"]["copies_before"] == summary["heldout"]["copies_after"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "# AFT training run" in report and "basic_arithmetic + chain_sum" in report
    assert json.loads((tmp_path / "summary.json").read_text())["heldout"] == summary["heldout"]

    calls = len(backend.calls)
    again = await recipe.run_recipe(config, backend=backend, show_progress=False)
    # a rerun generates nothing again but the graph runs of the report (K proposals + 1 aggregation each)
    assert len(backend.calls) - calls == 2 * (config.k + 1)
    assert again["heldout"] == summary["heldout"]


def test_jsonl_suite_reads_stored_reasoning_gym_records(tmp_path):
    import gzip
    import json

    from aft_graph.tasks import load_suite, score

    row = {
        "id": "eval-products-1", "question": "Solve 4 * 9.", "answer": "36", "task": "products",
        "metadata": {"source_dataset": "products", "expression": "4 * 9", "item_seed": 7},
    }  # fmt: skip
    path = tmp_path / "tasks.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps(row) + "\n" + json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    rg, plain = load_suite(f"jsonl:{path}", seed=None).tasks
    assert rg.kind == "reasoning_gym" and rg.metadata["item_seed"] == 7
    assert score(rg, "<answer>36</answer>") == 1.0 and score(rg, "<answer>35</answer>") == 0.0
    assert plain.kind == "math"
