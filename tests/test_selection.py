"""Confidence-weighted voting, dropping the least confident texts, universal self-consistency."""

from __future__ import annotations

import math

import pytest

from aft_graph.selection import (
    confidence_vote,
    keep_most_confident,
    parse_usc_choice,
    trace_confidence,
    usc_messages,
)


class TestTraceConfidence:
    def test_methods(self):
        lps = [-0.1, -0.1, -3.0, -3.0, -0.1, -0.1]
        assert trace_confidence(lps) == pytest.approx(sum(lps) / 6)
        assert trace_confidence(lps, "lowest_group", window=2) == pytest.approx(-3.0)
        assert trace_confidence(lps, "tail", window=2) == pytest.approx(-0.1)
        # A window longer than the text: the mean of the whole text.
        assert trace_confidence(lps, "lowest_group", window=50) == pytest.approx(sum(lps) / 6)

    def test_empty_text_is_least_confident(self):
        assert trace_confidence([]) == -math.inf

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="window"):
            trace_confidence([-1.0], window=0)
        with pytest.raises(ValueError, match="method"):
            trace_confidence([-1.0], "median")  # type: ignore[arg-type]


class TestConfidenceVote:
    def test_confident_minority_beats_unsure_majority(self):
        answers = ["3", "3", "5"]
        vote = confidence_vote(answers, [-3.0, -3.0, -0.05])
        assert vote.answer == "5" and vote.index == 2 and vote.count == 1 and vote.total == 3
        assert vote.weight == pytest.approx(math.exp(-0.05))
        assert vote.total_weight == pytest.approx(2 * math.exp(-3.0) + math.exp(-0.05))

    def test_equal_confidence_is_a_plain_majority(self):
        vote = confidence_vote(["1/2", "0.5", "7"], [-1.0, -1.0, -1.0])
        assert vote.answer == "1/2" and vote.count == 2

    def test_representative_is_the_most_confident_of_the_group(self):
        vote = confidence_vote(["4", "9", "4.0"], [-2.0, -1.5, -0.1])
        assert vote.answer == "4" and vote.index == 2

    def test_missing_answers_and_confidences(self):
        assert confidence_vote([None, None], [-1.0, -1.0]).answer is None
        with pytest.raises(ValueError, match="log-probabilities"):
            confidence_vote(["1", "2"], [-1.0, None])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="2 answers but 1"):
            confidence_vote(["1", "2"], [-1.0])


class TestKeepMostConfident:
    def test_keeps_a_fraction_in_original_order(self):
        assert keep_most_confident([-1.0, -0.1, -5.0, -0.5], 0.5) == [1, 3]
        assert keep_most_confident([-1.0, -0.1, -5.0, -0.5], 0.75) == [0, 1, 3]
        assert keep_most_confident([-1.0, -0.1, -5.0], 0.1) == [1]  # at least one
        assert keep_most_confident([-1.0, -1.0, -1.0], 0.34) == [0, 1]  # ties keep earlier
        assert keep_most_confident([], 0.5) == []

    def test_bad_fraction(self):
        with pytest.raises(ValueError):
            keep_most_confident([-1.0], 0.0)


class TestUSC:
    def test_prompt_numbers_responses_from_one(self):
        (message,) = usc_messages("What is {x}?", ["A {brace}", "B"])
        assert message["role"] == "user"
        assert "question: What is {x}?" in message["content"]
        assert "Response 1: A {brace}" in message["content"] and "Response 2: B" in message["content"]
        assert "The most consistent response is Response X" in message["content"]
        with pytest.raises(ValueError):
            usc_messages("q", [])

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("The most consistent response is Response 2.", 1),
            ("the most consistent response is: response #3 because...", 2),
            ("I think Response 1 is best", 0),
            ("The most consistent response is Response 9. Response 2 also", 1),  # 9 out of range
            ("None of them.", None),
        ],
    )
    def test_parse_choice(self, text, expected):
        assert parse_usc_choice(text, 3) == expected
