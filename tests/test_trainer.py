"""The trainer without an engine: records and bad data, proposals, selection, aggregation targets,
training examples (same prompt as the graph's aggregator, loss masking), export checks, the CLI.

Generation goes through ``ScriptedBackend``; only the small model's tokenizer is loaded (for the
chat template and the masking checks).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aft_graph.backends import GenerationRequest, ScriptedBackend
from aft_graph.prompts import AFT_TEMPLATE, RSA_TEMPLATE, aggregation_messages, proposal_messages
from trainer.aggregations import aggregation_request, build_aggregations, rejected_path
from trainer.cli import app
from trainer.config import (
    AggregationConfig,
    DemoConfig,
    OffPolicyConfig,
    ProposalConfig,
    SelectConfig,
    SFTConfig,
)
from trainer.export import adapter_info, export_adapter
from trainer.proposals import ICL_STOP, load_offpolicy, sample_proposals, write_offpolicy
from trainer.records import (
    AggregationRecord,
    DataReport,
    JsonlWriter,
    Proposal,
    ProposalRecord,
    TaskRecord,
    read_records,
    written_ids,
)
from trainer.select import (
    DatasetReward,
    JudgeReward,
    VerifierReward,
    select_proposals,
    top_k,
)
from trainer.sft import (
    IGNORE_INDEX,
    CompletionCollator,
    build_examples,
    example_messages,
    tokenize_example,
)
from trainer.tasks import Verifier, generate_tasks

Q = "Calculate 2 + 3.\n\nGive the final answer inside <answer></answer> tags, for example <answer>7</answer>."


def task(i: int = 0, answer: str = "5", question: str = Q) -> TaskRecord:
    return TaskRecord(id=f"t{i}", question=question, answer=answer, task="basic_arithmetic")


def precord(i: int, texts: list[str], rewards: list[float | None] | None = None) -> ProposalRecord:
    rewards = rewards or [None] * len(texts)
    return ProposalRecord(
        **task(i).task_fields(),
        proposals=[Proposal(text=t, reward=r) for t, r in zip(texts, rewards, strict=True)],
    )


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(small_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(small_model_dir)


# ------------------------------------------------------------------ records and bad data


class TestRecords:
    def test_bad_rows_are_counted_and_skipped(self, tmp_path):
        good = precord(0, ["a", "b"]).model_dump()
        path = write_jsonl(
            tmp_path / "p.jsonl",
            [
                good,
                {"id": "x1", "proposals": [{"text": "a"}]},  # missing question
                {"id": "x2", "question": "q", "proposals": []},  # empty proposals
                {"id": "x3", "question": "  ", "proposals": [{"text": "a"}]},  # empty question
                {"id": "x4", "question": "q", "proposals": [{"text": ""}]},  # empty proposal text
                "{not json",
                "[1, 2]",
                {**good, "id": "long", "question": "x" * 5000},  # over-long
                {**good, "id": "t9"},
            ],
        )
        report = DataReport(stage="test")
        rows = list(read_records(path, ProposalRecord, report, max_chars=2000))
        assert [r.id for r in rows] == ["t0", "t9"]
        assert report.read == 9
        assert report.total_skipped == 7
        assert report.skipped["missing question"] == 1
        assert report.skipped["empty proposals"] == 1
        assert report.skipped["empty question"] == 1
        assert report.skipped["empty proposals.text"] == 1
        assert report.skipped["bad json"] == 2
        assert report.skipped["over-long"] == 1
        assert "missing question" in report.summary()
        assert report.examples  # first few details kept for the log

    def test_missing_file_is_a_clear_error(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="previous `aft-train` stage"):
            list(read_records(tmp_path / "nope.jsonl", TaskRecord))

    def test_writer_resumes_and_drops_a_half_written_line(self, tmp_path):
        path = tmp_path / "out.jsonl"
        with JsonlWriter(path) as w:
            w.write(task(0))
            w.write(task(1))
        with path.open("a") as fh:
            fh.write('{"id": "t2", "question": "cut in the mid')  # a killed process
        assert written_ids(path) == {"t0", "t1"}
        with JsonlWriter(path) as w:
            assert w.done == {"t0", "t1"}
            w.write(task(2))
        lines = path.read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == ["t0", "t1", "t2"]

    def test_numeric_ids_become_strings(self):
        assert TaskRecord(id=7, question="q").id == "7"


# ------------------------------------------------------------------ tasks and the verifier


class TestTasksAndVerifier:
    def test_generate_is_seeded_and_heldout_excludes_training(self):
        a = generate_tasks(size=10, seed=0)
        b = generate_tasks(size=10, seed=0)
        assert [t.question for t in a] == [t.question for t in b]
        assert len({t.id for t in a}) == 10
        assert {t.task for t in a} == {"basic_arithmetic", "chain_sum"}
        assert all("<answer></answer>" in t.question for t in a)
        held = generate_tasks(size=10, seed=1, exclude={t.question for t in a})
        assert not {t.question for t in held} & {t.question for t in a}

    def test_unknown_dataset(self):
        from trainer.tasks import TaskSpec

        with pytest.raises(ValueError, match="unknown reasoning-gym"):
            generate_tasks([TaskSpec(name="nope")], 2)

    def test_reasoning_gym_scores_the_extracted_answer(self):
        v = Verifier()
        t = generate_tasks(size=4, seed=3)[0]
        assert v.score(t, f"so <answer>{t.answer}</answer>") == 1.0
        assert v.score(t, f"\\boxed{{{t.answer}}}") == 1.0
        assert v.score(t, "<answer>123456</answer>") < 1.0
        assert v.score(t, "") == 0.0
        assert v.accepts(t, f"<answer>{t.answer}</answer>")

    def test_lenient_last_number_reading(self):
        t = task()
        strict, lenient = Verifier(), Verifier(last_number=True)
        assert not strict.accepts(t, "2 + 3 = 5")  # reasoning-gym gives only partial credit
        assert lenient.score(t, "2 + 3 = 5") == 1.0
        assert lenient.score(t, "5 is wrong, it is 6") == 0.0
        # A stated tag still wins over the last number.
        assert lenient.score(t, "<answer>5</answer> (not 6)") == 1.0
        assert lenient.score(t, "no digits here") == 0.0

    def test_math_verify_without_a_task_name(self):
        v = Verifier()
        t = TaskRecord(id="m", question="half?", answer="1/2")
        assert v.score(t, "\\boxed{0.5}") == 1.0
        assert v.score(t, "\\boxed{0.6}") == 0.0
        with pytest.raises(ValueError, match="reward model or a judge"):
            v.score(TaskRecord(id="n", question="poem?"), "<answer>x</answer>")


# ------------------------------------------------------------------ proposals


class TestProposals:
    async def test_on_policy_chat_sampling(self, tmp_path):
        backend = ScriptedBackend(lambda req, i: f"sample {i}")
        tasks = [task(i) for i in range(3)]
        cfg = ProposalConfig(samples=3)
        report = await sample_proposals(backend, tasks, cfg, tmp_path / "p.jsonl", show_progress=False)
        assert report.kept == 3
        assert len(backend.calls) == 3
        call = backend.calls[0]
        assert list(call.messages) == proposal_messages(Q)
        s = call.sampling
        assert (s.n, s.temperature, s.top_k, s.top_p) == (3, 1.0, 50, 0.95)
        rows = list(read_records(tmp_path / "p.jsonl", ProposalRecord))
        assert [p.text for p in rows[0].proposals] == ["sample 0", "sample 1", "sample 2"]
        assert rows[0].policy == "on" and rows[0].answer == "5"

    async def test_icl_mode_for_base_models(self, tmp_path):
        backend = ScriptedBackend(lambda req, i: " <answer>5</answer>")
        tasks = [task(i, answer=str(i)) for i in range(4)]
        cfg = ProposalConfig(mode="icl", samples=1, icl_shots=2)
        await sample_proposals(backend, tasks, cfg, tmp_path / "p.jsonl", show_progress=False)
        call = backend.calls[0]
        assert call.messages is None and call.prompt is not None
        assert call.prompt.count("Question:") == 3  # two worked examples + the question
        assert call.prompt.rstrip().endswith("Answer:")
        assert "<answer>" in call.prompt  # the shots show the answer format
        assert call.sampling.stop == ICL_STOP

    async def test_auto_mode_picks_icl_for_a_base_model(self, tmp_path):
        class BaseModelBackend(ScriptedBackend):
            class tokenizer:  # noqa: N801 - stands in for a tokenizer without a chat template
                chat_template = None

        base = BaseModelBackend(lambda req, i: "<answer>1</answer>")
        await sample_proposals(base, [task(0), task(1)], ProposalConfig(samples=1), tmp_path / "b.jsonl", show_progress=False)
        assert base.calls[0].prompt is not None and base.calls[0].messages is None
        chat = ScriptedBackend(lambda req, i: "<answer>1</answer>")
        report = await sample_proposals(chat, [task(0)], ProposalConfig(samples=1), tmp_path / "c.jsonl", show_progress=False)
        assert chat.calls[0].messages is not None and "chat" in report.stage

    async def test_empty_proposals_failures_and_resume(self, tmp_path):
        def respond(req, i):
            return "" if i == 0 else "ok"

        out = tmp_path / "p.jsonl"
        tasks = [task(0), task(1, question="Never answered."), task(2, question="Also fine.")]

        class Rejecting(ScriptedBackend):
            async def generate(self, request: GenerationRequest):
                if "Never" in request.messages[-1]["content"]:
                    from aft_graph.backends import BackendError

                    raise BackendError("rejected")
                return await super().generate(request)

        backend = Rejecting(respond)
        report = await sample_proposals(backend, tasks, ProposalConfig(samples=2), out, show_progress=False)
        assert report.kept == 2
        assert report.skipped["backend error"] == 1
        assert report.notes["empty proposals dropped"] == 2
        # A second run only redoes what is missing.
        again = ScriptedBackend(respond)
        report2 = await sample_proposals(again, tasks, ProposalConfig(samples=2), out, show_progress=False)
        assert len(again.calls) == 1 and report2.kept == 1
        assert report2.notes["already written (resumed)"] == 2
        assert written_ids(out) == {"t0", "t1", "t2"}

    def test_off_policy_ultrafeedback_layout_with_bad_rows(self, tmp_path):
        rows = [
            {"prompt": "Say hi", "completions": [{"response": "hi", "overall_score": 7}, {"response": "hello", "overall_score": 9}]},
            {"prompt": "", "completions": [{"response": "x"}]},
            {"completions": [{"response": "x"}]},
            {"prompt": "Q", "completions": "not a list"},
            {"prompt": "Q", "completions": [{"response": ""}, {"other": 1}]},
            {"prompt": "Q2", "completions": [{"response": "a", "overall_score": "bad"}]},
            "{broken",
        ]
        src = write_jsonl(tmp_path / "uf.jsonl", rows)
        cfg = OffPolicyConfig(source=str(src), score_key="overall_score")
        report = DataReport(stage="off")
        got = list(load_offpolicy(cfg, report))
        assert [g.question for g in got] == ["Say hi", "Q2"]
        assert [p.reward for p in got[0].proposals] == [7.0, 9.0]
        assert got[1].proposals[0].reward is None
        assert all(g.policy == "off" for g in got)
        assert report.read == 7 and report.kept == 2
        assert report.skipped == {
            "empty prompt": 1,
            "missing prompt": 1,
            "invalid completions": 1,
            "no usable response": 1,
            "bad json": 1,
        }

    def test_off_policy_from_hf_datasets_directory(self, tmp_path):
        import datasets

        ds = datasets.Dataset.from_list(
            [{"instruction": "2+2?", "responses": ["4", "5"], "ref": "4"}] * 2
        )
        ds.save_to_disk(str(tmp_path / "ds"))
        cfg = OffPolicyConfig(
            source=str(tmp_path / "ds"), prompt_field="instruction", responses_field="responses",
            response_key=None, answer_field="ref",
        )
        out = tmp_path / "p.jsonl"
        report = write_offpolicy(cfg, out)
        rows = list(read_records(out, ProposalRecord))
        assert report.kept == 2 and [r.texts() for r in rows] == [["4", "5"], ["4", "5"]]
        assert rows[0].answer == "4"


# ------------------------------------------------------------------ selection


class TestSelection:
    def test_top_k_keeps_exactly_the_k_best(self):
        rec = precord(0, ["a", "b", "c", "d", "e", "f"])
        rewards = [0.1, 0.9, 0.5, 0.9, 0.0, 0.7]
        kept = top_k(rec, rewards, 3, reward_name="verifier")
        assert kept is not None
        # 0.9 (b), 0.9 (d: tie, later), 0.7 (f); kept in sampling order.
        assert kept.texts() == ["b", "d", "f"]
        assert [p.reward for p in kept.proposals] == [0.9, 0.9, 0.7]
        assert kept.selected_by == "verifier"
        best_first = top_k(rec, [0.1, 0.9, 0.5, 0.95, 0.0, 0.7], 3, order="reward")
        assert best_first.texts() == ["d", "b", "f"]
        # Ties go to the earlier proposal.
        assert top_k(rec, [1.0] * 6, 2).texts() == ["a", "b"]
        assert top_k(rec, rewards, 10).texts() == list("abcdef")
        assert top_k(rec, rewards, 3, min_reward=0.8).texts() == ["b", "d"]
        assert top_k(rec, rewards, 3, min_reward=2.0) is None
        with pytest.raises(ValueError, match="rewards"):
            top_k(rec, [1.0], 1)

    async def test_select_by_verifier_records_rewards(self, tmp_path):
        texts = ["<answer>4</answer>", "<answer>5</answer>", "no idea", "2+3 = <answer>5</answer>", "\\boxed{6}"]
        records = [precord(0, texts), precord(1, ["<answer>5</answer>"])]
        out = tmp_path / "s.jsonl"
        report = await select_proposals(records, VerifierReward(), SelectConfig(k=2), out, show_progress=False)
        got = list(read_records(out, ProposalRecord))
        assert got[0].texts() == ["<answer>5</answer>", "2+3 = <answer>5</answer>"]
        assert [p.reward for p in got[0].proposals] == [1.0, 1.0]
        assert got[1].texts() == ["<answer>5</answer>"]
        assert report.kept == 2 and report.notes["queries with fewer than K=2 proposals"] == 1

    async def test_dataset_reward_and_missing_scores(self, tmp_path):
        records = [precord(0, ["a", "b", "c"], [1, 3, 2]), precord(1, ["x"], [None])]
        report = await select_proposals(
            records, DatasetReward(), SelectConfig(k=2, reward="dataset"), tmp_path / "s.jsonl",
            show_progress=False,
        )
        got = list(read_records(tmp_path / "s.jsonl", ProposalRecord))
        assert got[0].texts() == ["b", "c"]
        assert report.skipped["reward failed"] == 1

    async def test_judge_reward_through_a_backend(self, tmp_path):
        def judge(req, i):
            text = req.messages[0]["content"]
            return "Fine. Score: 9" if "GOOD" in text else ("Bad. Score: 2" if "BAD" in text else "hmm")

        backend = ScriptedBackend(judge)
        reward = JudgeReward(backend)
        rec = precord(0, ["BAD one", "GOOD one", "unclear one"])
        assert await reward.score(rec) == [0.2, 0.9, 0.0]
        assert reward.unreadable == 1
        assert backend.calls[0].sampling.temperature == 0.0
        kept = top_k(rec, await reward.score(rec), 1)
        assert kept.texts() == ["GOOD one"]

    async def test_reward_model(self, tmp_path, tokenizer):
        import torch
        from transformers import LlamaConfig, LlamaForSequenceClassification

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, num_labels=1,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
        tokenizer.save_pretrained(tmp_path / "rm")
        from trainer.select import RewardModelReward

        rm = RewardModelReward(tmp_path / "rm", batch_size=2)
        rec = precord(0, ["one", "two words", "three words here"])
        scores = await rm.score(rec)
        assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
        assert scores == pytest.approx(rm.score_texts(rec.question, rec.texts()), abs=1e-5)
        kept = top_k(rec, scores, 1)
        assert kept.proposals[0].reward == pytest.approx(max(scores))


# ------------------------------------------------------------------ aggregation targets


def _agg_responder(right: set[int]):
    """Aggregations: sample i is right iff i in ``right``."""

    def respond(req, i):
        return f"Combining them: <answer>{'5' if i in right else '4'}</answer> (#{i})"

    return respond


class TestAggregations:
    async def test_teacher_free_keeps_only_verified_targets(self, tmp_path):
        records = [precord(i, ["<answer>5</answer>", "<answer>4</answer>"]) for i in range(3)]
        backend = ScriptedBackend(_agg_responder({1, 3}))
        cfg = AggregationConfig(mode="self", samples=4, keep=5)
        out = tmp_path / "a.jsonl"
        report = await build_aggregations(records, cfg, out, backend=backend, show_progress=False)
        rows = list(read_records(out, AggregationRecord))
        assert len(rows) == 6  # two accepted of four, per query
        assert all("<answer>5</answer>" in r.target for r in rows)
        assert all(r.target_reward == 1.0 and r.target_source == "self" for r in rows)
        assert {r.id for r in rows} == {f"t{i}#{j}" for i in range(3) for j in range(2)}
        assert rows[0].query_id == "t0" and rows[0].proposals == ["<answer>5</answer>", "<answer>4</answer>"]
        assert report.notes["aggregations sampled"] == 12
        assert report.notes["aggregations accepted"] == 6
        # The request is the graph's aggregator prompt.
        call = backend.calls[0]
        assert list(call.messages) == aggregation_messages(Q, records[0].texts(), AFT_TEMPLATE)
        assert call.sampling.n == 4

    async def test_lenient_verifier_and_appended_answer_format(self, tmp_path):
        backend = ScriptedBackend(["2 + 3 = 5", "2 + 3 = 6", "so \\boxed{5}"])
        cfg = AggregationConfig(samples=3, keep=3, last_number=True, append_answer=True)
        report = await build_aggregations([precord(0, ["a"])], cfg, tmp_path / "a.jsonl", backend=backend, show_progress=False)
        rows = list(read_records(tmp_path / "a.jsonl", AggregationRecord))
        assert [r.target for r in rows] == ["2 + 3 = 5\n<answer>5</answer>", "so \\boxed{5}"]
        assert report.notes["targets given the answer format"] == 1
        strict = await build_aggregations(
            [precord(0, ["a"])], AggregationConfig(samples=3, keep=3), tmp_path / "b.jsonl",
            backend=ScriptedBackend(["2 + 3 = 5", "2 + 3 = 6", "so \\boxed{5}"]), show_progress=False,
        )
        assert strict.kept == 1  # only the boxed answer without the lenient reading

    async def test_targets_repeating_the_prompt_markup_are_rejected(self, tmp_path):
        backend = ScriptedBackend(["<answer>5</answer>\n</response>", '<response id="1"> <answer>5</answer>', "<answer>5</answer>"])
        cfg = AggregationConfig(samples=3, keep=3)
        report = await build_aggregations([precord(0, ["a"])], cfg, tmp_path / "a.jsonl", backend=backend, show_progress=False)
        rows = list(read_records(tmp_path / "a.jsonl", AggregationRecord))
        assert [r.target for r in rows] == ["<answer>5</answer>"]
        assert report.notes["aggregations rejected: prompt markup in the text"] == 2

    async def test_aggregations_in_their_own_words_are_preferred_to_copies(self, tmp_path):
        shown = "2 + 3 = 5, so the sum is five. <answer>5</answer>"
        records = [precord(0, [shown, "<answer>4</answer>"], rewards=[1.0, 0.0])]
        # Sample 0 restates the right proposal verbatim; sample 1 says it in its own words.
        own = "Both add 2 and 3; the first is right: 5. <answer>5</answer>"
        script = [f"  {shown}\n", own, "<answer>4</answer>"]
        prefer = await build_aggregations(
            records, AggregationConfig(samples=3), tmp_path / "a.jsonl",
            backend=ScriptedBackend(script), show_progress=False,
        )  # fmt: skip
        assert [r.target for r in read_records(tmp_path / "a.jsonl", AggregationRecord)] == [own]
        assert prefer.notes["accepted aggregations that copy a proposal"] == 1
        assert prefer.notes["copies passed over for an aggregation in its own words"] == 1
        allow = await build_aggregations(
            records, AggregationConfig(samples=3, copies="allow"), tmp_path / "b.jsonl",
            backend=ScriptedBackend(script), show_progress=False,
        )  # fmt: skip
        assert allow.kept == 1
        assert [r.target for r in read_records(tmp_path / "b.jsonl", AggregationRecord)] == [shown]
        # Only a copy accepted: kept when nothing better exists, unless copies are rejected.
        only_copy = [shown, "<answer>4</answer>"]
        kept = await build_aggregations(
            records, AggregationConfig(samples=2), tmp_path / "c.jsonl",
            backend=ScriptedBackend(only_copy), show_progress=False,
        )  # fmt: skip
        assert kept.kept == 1
        rejected = await build_aggregations(
            records, AggregationConfig(samples=2, copies="reject"), tmp_path / "d.jsonl",
            backend=ScriptedBackend(only_copy), show_progress=False,
        )  # fmt: skip
        assert rejected.kept == 0
        assert rejected.skipped["only copies of a proposal accepted"] == 1
        assert written_ids(rejected_path(tmp_path / "d.jsonl")) == {"t0"}

    async def test_queries_without_an_accepted_proposal_can_be_left_out(self, tmp_path):
        records = [
            precord(0, ["<answer>5</answer>", "<answer>4</answer>"], rewards=[1.0, 0.0]),
            precord(1, ["<answer>4</answer>", "<answer>6</answer>"], rewards=[0.0, 0.0]),
            precord(2, ["<answer>4</answer>", "<answer>6</answer>"]),  # unscored: the verifier reads
        ]
        backend = ScriptedBackend(_agg_responder({0}))
        cfg = AggregationConfig(samples=2, require_accepted_proposal=True)
        report = await build_aggregations(records, cfg, tmp_path / "a.jsonl", backend=backend, show_progress=False)
        assert len(backend.calls) == 1  # only t0 was sampled
        assert report.notes["left out: no accepted proposal (require_accepted_proposal)"] == 2
        assert written_ids(tmp_path / "a.jsonl") == {"t0#0"}

    async def test_solution_targets_answer_the_plain_prompt_where_every_proposal_is_wrong(self, tmp_path):
        from trainer import stages

        wrong = ["2 + 3 = 4. <answer>4</answer>", "I get 6. <answer>6</answer>"]
        records = [
            precord(0, ["<answer>5</answer>", "<answer>4</answer>"], rewards=[1.0, 0.0]),
            precord(1, wrong, rewards=[0.0, 0.0]),
        ]
        write_jsonl(tmp_path / "selected.jsonl", [r.model_dump(mode="json") for r in records])
        # t0 already has a self target: only t1 is sampled, from the plain question prompt.
        done = AggregationRecord(
            **{**records[0].task_fields(), "id": "t0#0"}, query_id="t0", proposals=records[0].texts(),
            target="<answer>5</answer>", target_source="self",
        )  # fmt: skip
        write_jsonl(tmp_path / "aggregations.jsonl", [done.model_dump(mode="json")])
        # A verbatim copy of a shown (wrong) proposal, a wrong answer, and two right solutions.
        script = [wrong[0], "<answer>7</answer>", "Add: 2 + 3 = 5. <answer>5</answer>", "<answer>5</answer>"]
        backend = ScriptedBackend(script)
        cfg = AggregationConfig(mode="solution", samples=4, keep=1, copies="reject", lora="aft")
        report, rows = await stages.solution_targets(backend, tmp_path, cfg, Verifier("tag"), show_progress=False)
        (call,) = backend.calls
        assert list(call.messages) == proposal_messages(records[1].question)
        assert call.lora == "aft" and call.sampling.n == 4
        (row,) = rows
        assert row.query_id == "t1" and row.proposals == wrong and row.target_source == "solution"
        assert row.target == "Add: 2 + 3 = 5. <answer>5</answer>"  # shows its working: preferred
        assert report.notes["aggregations accepted"] == 2
        # The training prompt is the aggregation prompt with the wrong proposals in it.
        assert example_messages(row) == aggregation_messages(records[1].question, wrong, AFT_TEMPLATE)
        # Resumed: nothing is sampled again.
        again = ScriptedBackend(script)
        await stages.solution_targets(again, tmp_path, cfg, Verifier("tag"), show_progress=False)
        assert again.calls == []
        with pytest.raises(ValueError, match="mode='solution'"):
            await stages.solution_targets(again, tmp_path, AggregationConfig(), Verifier("tag"), show_progress=False)

    async def test_keep_limit_and_rejected_queries_are_not_redone(self, tmp_path):
        records = [precord(0, ["a"]), precord(1, ["b"])]

        def respond(req, i):
            if "t1" in str(req):  # never right for the second query
                return "<answer>4</answer>"
            return f"<answer>5</answer> v{i}"

        records[1] = records[1].model_copy(update={"question": Q + " t1"})
        backend = ScriptedBackend(respond)
        cfg = AggregationConfig(samples=4, keep=2)
        out = tmp_path / "a.jsonl"
        report = await build_aggregations(records, cfg, out, backend=backend, show_progress=False)
        assert report.kept == 2 and report.skipped["no accepted aggregation"] == 1
        assert written_ids(rejected_path(out)) == {"t1"}
        again = ScriptedBackend(respond)
        report2 = await build_aggregations(records, cfg, out, backend=again, show_progress=False)
        assert again.calls == [] and report2.notes["already done (resumed)"] == 2

    async def test_teacher_mode_with_and_without_verification(self, tmp_path):
        records = [precord(0, ["x", "y", "z"])]
        teacher = ScriptedBackend(_agg_responder(set()))  # always wrong
        cfg = AggregationConfig(mode="teacher", samples=1, k=2, template="rsa")
        rep = await build_aggregations(records, cfg, tmp_path / "v.jsonl", backend=teacher, show_progress=False)
        assert rep.kept == 0
        assert list(teacher.calls[0].messages) == aggregation_messages(Q, ["x", "y"], RSA_TEMPLATE)
        cfg = cfg.model_copy(update={"verify": False})
        rep = await build_aggregations(records, cfg, tmp_path / "nv.jsonl", backend=teacher, show_progress=False)
        row = next(read_records(tmp_path / "nv.jsonl", AggregationRecord))
        assert rep.kept == 1 and row.target_source == "teacher" and row.template == "rsa"
        assert row.proposals == ["x", "y"]

    async def test_pseudo_aggregations(self, tmp_path):
        records = [precord(0, ["p1", "p2", "p3"]), precord(1, ["q1"]).model_copy(update={"answer": None})]
        ref = await build_aggregations(records, AggregationConfig(mode="reference"), tmp_path / "r.jsonl")
        rows = list(read_records(tmp_path / "r.jsonl", AggregationRecord))
        assert [r.target for r in rows] == ["<answer>5</answer>"]
        assert rows[0].target_source == "reference" and rows[0].proposals == ["p1", "p2", "p3"]
        assert ref.skipped["no reference answer"] == 1
        await build_aggregations(records, AggregationConfig(mode="proposal"), tmp_path / "p.jsonl")
        rows = list(read_records(tmp_path / "p.jsonl", AggregationRecord))
        assert rows[0].target in {"p1", "p2", "p3"} and rows[1].target == "q1"

    async def test_verified_proposal_targets(self, tmp_path):
        working = "2 plus 3 makes five in total, so <answer>5</answer>"
        records = [
            # the right answer is in the minority, with a bare copy and a truncated copy beside it
            precord(0, ["<answer>6</answer>", working, "<answer>5</answer>", "<answer>6</answer>"]),
            precord(1, ["<answer>6</answer>", "<answer>7</answer>"]),  # nothing right
            precord(2, ["<answer>5</answer>"]),  # right, but only a bare answer
        ]
        cfg = AggregationConfig(mode="verified_proposal")
        rep = await build_aggregations(records, cfg, tmp_path / "v.jsonl", show_progress=False)
        rows = {r.query_id: r for r in read_records(tmp_path / "v.jsonl", AggregationRecord)}
        assert rows["t0"].target == working and rows["t0"].target_reward == 1.0
        assert rows["t2"].target == "<answer>5</answer>"
        assert "t1" not in rows and rep.skipped["no accepted proposal"] == 1
        assert rep.notes["bare-answer proposals passed over"] == 1
        # k limits what the prompt shows, and so what may be copied
        rep = await build_aggregations(
            records[:1], AggregationConfig(mode="verified_proposal", k=1), tmp_path / "k.jsonl"
        )
        assert rep.kept == 0 and rep.skipped["no accepted proposal"] == 1

    async def test_cap_on_queries_whose_proposals_all_agree(self, tmp_path):
        agree = [precord(i, ["<answer>5</answer>", "so <answer>5</answer>"]) for i in range(8)]
        split = [precord(10 + i, ["<answer>5</answer>", "<answer>4</answer>"]) for i in range(4)]
        cfg = AggregationConfig(mode="proposal", max_agreeing_fraction=0.2)
        rep = await build_aggregations(agree + split, cfg, tmp_path / "c.jsonl")
        ids = [r.query_id for r in read_records(tmp_path / "c.jsonl", AggregationRecord)]
        assert rep.kept == 5 and rep.notes["left out: all proposals agree (max_agreeing_fraction)"] == 7
        assert {f"t{10 + i}" for i in range(4)} <= set(ids)
        # the same choice again on a resumed run: nothing new is written
        again = await build_aggregations(agree + split, cfg, tmp_path / "c.jsonl")
        assert again.kept == 0
        assert [r.query_id for r in read_records(tmp_path / "c.jsonl", AggregationRecord)] == ids

    async def test_over_long_prompts_are_counted(self, tmp_path):
        records = [precord(0, ["word " * 50]), precord(1, ["short"])]
        cfg = AggregationConfig(samples=1)
        room = ScriptedBackend().count_prompt_tokens(aggregation_request(records[1], cfg)) + 10
        backend = ScriptedBackend(_agg_responder({0}), context_window=room)
        rep = await build_aggregations(
            records, cfg, tmp_path / "a.jsonl", backend=backend,
            show_progress=False,
        )
        assert rep.skipped["over-long prompt"] == 1 and rep.kept == 1

    def test_self_mode_needs_a_backend(self, tmp_path):
        import asyncio

        with pytest.raises(ValueError, match="backend"):
            asyncio.run(build_aggregations([], AggregationConfig(), tmp_path / "a.jsonl"))
        with pytest.raises(ValueError, match="unknown aggregation template"):
            asyncio.run(build_aggregations([], AggregationConfig(template="nope"), tmp_path / "a.jsonl"))


# ------------------------------------------------------------------ training examples


def arecord(proposals=("2 + 3 = 6", "The sum is <answer>5</answer>"), target="2 + 3 = 5, so <answer>5</answer>") -> AggregationRecord:
    return AggregationRecord(
        **task(0).task_fields(), query_id="t0", proposals=list(proposals), target=target
    )


class TestTrainingExamples:
    def test_messages_equal_the_inference_prompt(self):
        rec = arecord()
        assert example_messages(rec) == aggregation_messages(rec.question, rec.proposals, AFT_TEMPLATE)
        rsa = rec.model_copy(update={"template": "rsa"})
        assert example_messages(rsa) == aggregation_messages(rec.question, rec.proposals, RSA_TEMPLATE)
        # Ablation: no proposals in the input = the plain proposal prompt.
        assert example_messages(rec, input_mode="plain") == proposal_messages(rec.question)

    async def test_messages_equal_what_the_graph_sends(self):
        graph_mod = pytest.importorskip("aft_graph.graph")
        from aft_graph.config import AggregateConfig

        backend = ScriptedBackend()
        config = AggregateConfig(strategy="propose_aggregate", proposals=3, layers=1)
        graph = graph_mod.build_graph(backend, config)
        result = await graph.ainvoke({"question": Q})
        proposal_calls = [c for c in backend.calls if c.messages[-1]["content"] == Q.strip()]
        agg_calls = [c for c in backend.calls if c not in proposal_calls]
        assert len(proposal_calls) == 3 and len(agg_calls) == 3
        proposals = result["layers"][0]["texts"]
        rec = AggregationRecord(
            id="g#0", question=Q, proposals=proposals, target=result["answer"], template="aft"
        )
        assert example_messages(rec) == list(agg_calls[0].messages)
        assert list(agg_calls[0].messages) == aggregation_messages(
            Q, proposals, config.resolved_template
        )

    def test_loss_mask_covers_exactly_the_aggregation(self, tokenizer):
        rec = arecord()
        messages = example_messages(rec)
        ex = tokenize_example(tokenizer, messages, rec.target)
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels) == len(ex["attention_mask"])
        # The prompt part is exactly what an engine feeds the model at inference.
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert ids[:n] == prompt_ids
        assert all(label == IGNORE_INDEX for label in labels[:n])
        assert labels[n:] == ids[n:] and all(label != IGNORE_INDEX for label in labels[n:])
        target_text = tokenizer.decode(ids[n:])
        assert target_text.startswith(rec.target)
        assert target_text.replace(rec.target, "").strip() == "<|im_end|>"
        # Every proposal token and the query sit in the masked part.
        masked_text = tokenizer.decode(ids[:n])
        for p in rec.proposals:
            assert p in masked_text and p not in target_text
        assert "Calculate 2 + 3." in masked_text

    def test_build_examples_counts_bad_rows_and_mixes_plain(self, tmp_path, tokenizer):
        good = arecord().model_dump()
        rows = [
            good,
            {**good, "id": "t1#0", "query_id": "t1"},
            {**good, "id": "bad1", "target": ""},
            {**good, "id": "bad2", "target": None},
            {k: v for k, v in good.items() if k != "question"},
            {**good, "id": "long#0", "query_id": "long", "proposals": ["many words " * 400]},
            "garbage",
        ]
        data = write_jsonl(tmp_path / "a.jsonl", rows)
        cfg = SFTConfig(data=(data,), output_dir=tmp_path / "run", max_seq_len=512, plain_fraction=0.5)
        report = DataReport(stage="sft")
        examples = build_examples(tokenizer, cfg, report=report)
        kinds = [e["kind"] for e in examples]
        assert kinds.count("aggregation") == 2
        # 0.5 x 3 valid rows -> 2 plain examples from distinct queries (the long row's query
        # is short without its proposals).
        assert kinds.count("plain") == 2
        assert report.skipped["empty target"] == 1
        assert report.skipped["invalid target"] == 1
        assert report.skipped["missing question"] == 1
        assert report.skipped["bad json"] == 1
        assert report.skipped["over-long"] == 1
        plain = next(e for e in examples if e["kind"] == "plain")
        n = sum(label == IGNORE_INDEX for label in plain["labels"])
        assert "<response" not in tokenizer.decode(plain["input_ids"][:n])

    def test_plain_ablation_and_plain_data_file(self, tmp_path, tokenizer):
        data = write_jsonl(tmp_path / "a.jsonl", [arecord().model_dump()])
        plain_rows = write_jsonl(
            tmp_path / "plain.jsonl",
            [
                precord(5, ["low", "high"], [0.1, 0.9]).model_dump(),
                {"id": "x", "question": "q?", "target": "an answer"},
                {"id": "y", "question": "nothing"},
            ],
        )
        cfg = SFTConfig(data=(data,), output_dir=tmp_path / "r", input_mode="plain")
        (ex,) = build_examples(tokenizer, cfg)
        assert ex["kind"] == "plain"
        cfg = SFTConfig(data=(data,), output_dir=tmp_path / "r", plain_fraction=1.0, plain_data=plain_rows, seed=1)
        report = DataReport(stage="sft")
        examples = build_examples(tokenizer, cfg, report=report)
        assert [e["kind"] for e in examples] == ["aggregation", "plain"]
        assert report.skipped["plain data: no target or proposal"] == 1

    def test_drop_copies_leaves_out_targets_that_restate_a_proposal(self, tmp_path, tokenizer):
        good = arecord().model_dump()
        copy = {**good, "id": "c#0", "query_id": "c", "target": f"  {good['proposals'][1]}\n"}
        data = write_jsonl(tmp_path / "a.jsonl", [good, copy])
        kept = build_examples(tokenizer, SFTConfig(data=(data,), output_dir=tmp_path / "r"))
        assert len(kept) == 2
        report = DataReport(stage="sft")
        cfg = SFTConfig(data=(data,), output_dir=tmp_path / "r", drop_copies=True)
        (ex,) = build_examples(tokenizer, cfg, report=report)
        assert report.notes["targets that copy a proposal left out (drop_copies)"] == 1
        assert good["target"] in tokenizer.decode(ex["input_ids"])

    def test_collator_pads_labels_with_ignore_index(self):
        collate = CompletionCollator(pad_token_id=0)
        batch = collate(
            [
                {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
                {"input_ids": [5], "labels": [5], "attention_mask": [1]},
            ]
        )
        assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
        assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]

    def test_sft_config_validation(self, tmp_path):
        from pydantic import ValidationError

        with pytest.raises(ValidationError, match="at least one data file"):
            SFTConfig(data=(), output_dir=tmp_path)
        with pytest.raises(ValidationError):
            SFTConfig(data=(tmp_path,), output_dir=tmp_path, input_mode="nope")
        assert SFTConfig.model_fields["plain_fraction"].description  # help text for the CLI


# ------------------------------------------------------------------ export checks


class TestExport:
    def test_adapter_checks(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="not a LoRA adapter"):
            adapter_info(tmp_path)
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 32, "base_model_name_or_path": "x"}))
        with pytest.raises(FileNotFoundError, match="no adapter weights"):
            adapter_info(tmp_path)
        (tmp_path / "adapter_model.safetensors").write_bytes(b"0")
        assert adapter_info(tmp_path)["r"] == 32
        with pytest.raises(ValueError, match="max_lora_rank"):
            adapter_info(tmp_path, max_rank=16)
        out = export_adapter(tmp_path, tmp_path.parent / "copy")
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ command line


class TestCli:
    def test_tasks_select_aggregations_pipeline(self, tmp_path):
        runner = CliRunner()
        tasks = tmp_path / "tasks.jsonl"
        r = runner.invoke(app, ["tasks", "--out", str(tasks), "--size", "4"])
        assert r.exit_code == 0, r.output
        rows = [json.loads(line) for line in tasks.read_text().splitlines()]
        proposals = tmp_path / "p.jsonl"
        write_jsonl(
            proposals,
            [
                {**row, "proposals": [{"text": "<answer>0</answer>"}, {"text": f"<answer>{row['answer']}</answer>"}]}
                for row in rows
            ]
            + [{"id": "bad", "question": "q", "proposals": []}],
        )
        sel = tmp_path / "s.jsonl"
        r = runner.invoke(app, ["select", "--data", str(proposals), "--out", str(sel), "--k", "1"])
        assert r.exit_code == 0, r.output
        assert re.search(r"kept 4", r.output) and "empty proposals" in r.output
        kept = list(read_records(sel, ProposalRecord))
        assert all(rec.proposals[0].reward == 1.0 for rec in kept)
        agg = tmp_path / "a.jsonl"
        r = runner.invoke(app, ["aggregations", "--data", str(sel), "--out", str(agg), "--mode", "reference"])
        assert r.exit_code == 0, r.output
        assert len(list(read_records(agg, AggregationRecord))) == 4
        # A second target source only for the queries the first one left without a target.
        first = list(read_records(agg, AggregationRecord))[:3]
        write_jsonl(tmp_path / "first.jsonl", [json.loads(r.model_dump_json()) for r in first])
        rest = tmp_path / "rest.jsonl"
        r = runner.invoke(app, ["aggregations", "--data", str(sel), "--out", str(rest), "--mode", "reference", "--skip-targeted", str(tmp_path / "first.jsonl")])
        assert r.exit_code == 0, r.output
        assert "3 queries already have a target" in r.output
        assert [x.query_id for x in read_records(rest, AggregationRecord)] == [kept[3].id]

    def test_config_file_and_bad_options(self, tmp_path):
        runner = CliRunner()
        cfg = tmp_path / "c.json"
        cfg.write_text(json.dumps({"k": 0}))
        write_jsonl(tmp_path / "p.jsonl", [])
        r = runner.invoke(app, ["select", "--data", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "s"), "--config", str(cfg)])
        assert r.exit_code != 0 and "k" in r.output
        r = runner.invoke(app, ["proposals", "--out", str(tmp_path / "x.jsonl")])
        assert r.exit_code != 0 and "--tasks" in r.output

    def test_heldout_ablation_of_an_inheriting_recipe_through_another_model(self, tmp_path, monkeypatch):
        from trainer import backend as backend_module
        from trainer.datapack import pack

        # The base recipe's packed data: two held-out queries, 2 proposals each, untrained rows.
        base_run, base_data = tmp_path / "base", tmp_path / "base-data"
        base_run.mkdir()
        heldout = [precord(0, ["<answer>5</answer>", "<answer>4</answer>"]), precord(1, ["<answer>4</answer>", "<answer>4</answer>"])]
        write_jsonl(base_run / "eval_proposals.jsonl", [json.loads(r.model_dump_json()) for r in heldout])
        base_rows = [{"id": "t0", "aggregation_score": 1.0, "direct_score": 0.0}, {"id": "t1", "aggregation_score": 0.0, "direct_score": 1.0}]
        (base_run / "heldout_base.json").write_text(json.dumps({"key": {}, "rows": base_rows}))
        pack(base_run, base_data)
        recipe = tmp_path / "ablation.json"
        recipe.write_text(json.dumps({
            "out": str(tmp_path / "run"), "data_dir": str(tmp_path / "data"), "inherit_data": str(base_data),
            "model": "default", "k": 2, "last_number": False,
        }))  # fmt: skip
        made = []

        def fake_backend(model, **kwargs):
            made.append((model, kwargs))
            return ScriptedBackend(lambda req, i: "Both say 5 and 4; 2 + 3 = 5. <answer>5</answer>")

        monkeypatch.setattr(backend_module, "make_backend", fake_backend)
        merged = tmp_path / "merged"
        merged.mkdir()
        r = CliRunner().invoke(app, [
            "heldout", "--config", str(recipe), "--model", str(merged), "--direct",
            "--base-url", "http://127.0.0.1:1/v1",
        ])  # fmt: skip
        assert r.exit_code == 0, r.output
        assert made == [(str(merged.resolve()), {"engine": "openai", "base_url": ["http://127.0.0.1:1/v1"]})]
        assert "aggregator accuracy 1.000 on 2" in r.output and "0 aggregations copy a proposal" in r.output
        assert "direct answers: 1.000 (the recipe's base model: 0.500)" in r.output
        assert "| untrained aggregator | 0.500 | +0.500 |" in r.output
        # Its rows are packed into its own data directory; the inherited data is not packed again.
        manifest = json.loads((tmp_path / "data" / "MANIFEST.json").read_text())
        assert set(manifest["files"]) == {"heldout_aft_merged_direct.json"}
        assert set(manifest["inherited"]["files"]) == {"eval_proposals.jsonl", "heldout_base.json"}

    def test_compare_pairs_rows_files_and_breaks_down_by_right_proposals(self, tmp_path):
        import gzip

        run = tmp_path / "run"
        run.mkdir()
        # t0: one of two proposals right; t1: none right.
        heldout = [precord(0, ["<answer>5</answer>", "<answer>4</answer>"]), precord(1, ["<answer>4</answer>", "<answer>4</answer>"])]
        write_jsonl(run / "eval_proposals.jsonl", [json.loads(r.model_dump_json()) for r in heldout])
        def rows(*scores, **extra):
            return json.dumps({"key": {}, "rows": [
                {"id": f"t{i}", "aggregation_score": s, **{k: v[i] for k, v in extra.items()}} for i, s in enumerate(scores)
            ]})  # fmt: skip

        (run / "heldout_base.json").write_text(rows(1.0, 0.0, direct_score=[0.0, 1.0]))
        (run / "heldout_aft_a_direct.json").write_text(rows(1.0, 1.0, direct_score=[1.0, 1.0]))
        other = tmp_path / "heldout_aft_b.json.gz"
        with gzip.open(other, "wt") as f:
            f.write(rows(0.0, 0.0))
        recipe = tmp_path / "recipe.json"
        recipe.write_text(json.dumps({"out": str(run), "model": "default", "k": 2, "last_number": False}))
        # Listed in the other order, so the rows are matched to the questions by id.
        (run / "heldout_aft_a_direct.json").write_text(
            json.dumps({"key": {}, "rows": list(reversed(json.loads((run / "heldout_aft_a_direct.json").read_text())["rows"]))})
        )  # fmt: skip
        r = CliRunner().invoke(app, ["compare", "heldout_aft_a_direct.json", str(other), "--config", str(recipe)])
        assert r.exit_code == 0, r.output
        assert "aft_a_direct: aggregator accuracy 1.000 on 2" in r.output
        assert "| untrained aggregator | 0.500 | +0.500 |" in r.output
        assert "| aft_b | 0.000 | +1.000 | [+1.000, +1.000] | 2 / 0 |" in r.output
        assert "| majority of 2 | 0.500 | +0.500 |" in r.output
        assert "| right of 2 proposals | questions | untrained | aft_a_direct | aft_b |" in r.output
        assert "| 0 | 1 | 0 | 1 | 0 |" in r.output and "| 1 | 1 | 1 | 1 | 0 |" in r.output
        assert "direct answers (no proposals): untrained 0.500, aft_a_direct 1.000" in r.output
        # Rows that miss a question name the fix; a missing file too.
        (run / "heldout_short.json").write_text(json.dumps({"key": {}, "rows": [{"id": "t0", "aggregation_score": 1.0}]}))
        r = CliRunner().invoke(app, ["compare", "heldout_short.json", "--config", str(recipe)])
        assert r.exit_code != 0 and "1 of the recipe's 2" in r.output and "aft-train heldout" in r.output
        r = CliRunner().invoke(app, ["compare", "heldout_nope.json", "--config", str(recipe)])
        assert r.exit_code != 0 and "heldout_nope.json" in r.output

    def test_help_lists_every_stage(self):
        r = CliRunner().invoke(app, ["--help"])
        for command in ("proposals", "select", "aggregations", "sft", "export", "demo", "heldout", "compare"):
            assert command in r.output


class TestTargetLoss:
    def test_equals_the_models_own_loss_with_logits_only_at_targets(self, small_model_dir):
        import torch
        from transformers import AutoModelForCausalLM

        from trainer.sft import CompletionCollator
        from trainer.target_loss import target_loss, target_positions

        model = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(0)
        rows = []
        for length, prompt in ((40, 30), (25, 12)):  # different lengths: padding in the batch
            ids = torch.randint(5, 1000, (length,), generator=gen).tolist()
            rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "attention_mask": [1] * length})
        batch = CompletionCollator(0)(rows)
        keep = target_positions(batch["labels"])
        assert keep.tolist() == [*range(11, 24), *range(29, 39)]  # position t predicts token t + 1
        with torch.no_grad():
            ours, outputs = target_loss(model, batch)
            theirs = model(**batch).loss
            assert outputs.logits.shape[1] == len(keep)
            assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
            # with the Trainer's count of an accumulated step: the sum over this batch / that count
            n = (batch["labels"][:, 1:] != -100).sum()
            halved, _ = target_loss(model, batch, num_items_in_batch=2 * n)
            assert torch.allclose(halved, theirs / 2, atol=1e-5)


def test_vote_summary_groups_equivalent_answers_most_frequent_first():
    from aft_graph.prompts import AFT_VOTE_TEMPLATE, vote_summary

    texts = ["<answer>15</answer>", "so \\boxed{12}", "<answer>12.0</answer>", "I am not sure."]
    assert vote_summary(texts) == "12 (2 of 4 responses), 15 (1 of 4), no clear answer (1 of 4)"
    assert vote_summary([]) == "none"
    user = aggregation_messages("Q?", texts[:3], AFT_VOTE_TEMPLATE)[-1]["content"]
    assert "Final answers stated: 12 (2 of 3 responses), 15 (1 of 3)." in user
    assert user.index("<response id=\"3\">") < user.index("Final answers stated")


def test_shipped_recipes_validate():
    """Every recipe in recipes/ loads: *.sft.json as an SFTConfig (`aft-train sft --config`),
    *.aggregation.json as an AggregationConfig (`aft-train aggregations --config`), the rest as a
    DemoConfig (`aft-train demo --config`)."""
    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.json"))
    assert any(p.name.endswith(".sft.json") for p in recipes)
    assert any(p.name.endswith(".aggregation.json") for p in recipes)
    for path in recipes:
        data = json.loads(path.read_text())
        if path.name.endswith(".sft.json"):
            config = SFTConfig(**data)
            assert config.init_adapter is None or not config.init_adapter.startswith("/"), path
        elif path.name.endswith(".aggregation.json"):
            AggregationConfig(**data)
        else:
            DemoConfig(**data)
