"""Consensus early exit and Adaptive-Consistency's stopping rule (pure functions)."""

from __future__ import annotations

import math
import random

import pytest

from aft_graph.consensus import (
    answer_counts,
    beta_stop_probability,
    consensus,
    dirichlet_stop_probability,
    should_stop_sampling,
    wave_sizes,
)


class TestConsensus:
    def test_unanimity_uses_math_equivalence(self):
        c = consensus(["1/2", "0.5", "\\frac{1}{2}"])
        assert c.agreed and c.count == 3 and c.total == 3 and c.index == 0

    def test_one_dissent_breaks_unanimity_but_not_a_fraction(self):
        answers = ["4", "4", "4", "5"]
        assert not consensus(answers).agreed
        assert consensus(answers, 0.75).agreed  # 3/4 exactly: not lost to rounding
        assert not consensus(answers, 0.8).agreed

    def test_missing_answers_count_against_agreement(self):
        c = consensus(["7", "7", None])
        assert not c.agreed and c.count == 2 and c.total == 3
        assert math.isclose(c.fraction, 2 / 3)

    def test_no_answers_and_single_text_never_agree(self):
        assert not consensus([None, None]).agreed
        assert not consensus(["3"]).agreed  # one text always "agrees" with itself
        assert consensus(["3"], minimum=1).agreed

    def test_agreement_out_of_range(self):
        with pytest.raises(ValueError, match=r"\(0.5, 1\]"):
            consensus(["1", "1"], 0.5)


class TestBetaRule:
    def test_matches_the_beta_integral(self):
        # P(p > 1/2), p ~ Beta(a, b), by midpoint integration of the density.
        for v1, v2 in [(2, 0), (3, 1), (5, 2), (4, 4), (0, 3)]:
            a, b = v1 + 1, v2 + 1
            norm = math.gamma(a) * math.gamma(b) / math.gamma(a + b)
            steps = 20000
            integral = sum(
                ((x := 0.5 + (i + 0.5) * 0.5 / steps) ** (a - 1)) * (1 - x) ** (b - 1)
                for i in range(steps)
            ) * (0.5 / steps) / norm
            assert beta_stop_probability(v1, v2) == pytest.approx(integral, abs=1e-6)

    def test_unanimous_votes_needed_at_095(self):
        # 2 agreeing: 0.875, 3: 0.9375, 4: 0.96875 (the numbers the docs quote).
        assert [beta_stop_probability(k, 0) for k in (2, 3, 4)] == [0.875, 0.9375, 0.96875]
        assert beta_stop_probability(3, 3) == 0.5

    def test_negative_counts(self):
        with pytest.raises(ValueError):
            beta_stop_probability(-1, 0)


class TestStoppingRule:
    def test_stop_decisions_with_beta(self):
        assert not should_stop_sampling(["4", "4"]).stop
        assert should_stop_sampling(["4", "4"], confidence=0.85).stop
        d = should_stop_sampling(["4", "4.0", "4", "4"])
        assert d.stop and d.counts == (4,) and d.sampled == 4
        # A split vote never stops, however many samples.
        assert not should_stop_sampling(["1", "2"] * 4).stop

    def test_answers_without_a_value_are_not_votes(self):
        d = should_stop_sampling(["4", None, None, "4"])
        assert d.counts == (2,) and not d.stop
        assert should_stop_sampling([None, None]).probability == 0.0

    def test_dirichlet_is_stricter_with_many_answers(self):
        answers = ["1"] * 5 + ["2"] * 2 + ["3"] * 2
        beta = should_stop_sampling(answers, rule="beta").probability
        dirichlet = should_stop_sampling(answers, rule="dirichlet").probability
        assert dirichlet < beta  # the leader must beat every other answer, not only the runner-up
        # Reproducible: the Monte-Carlo draw is seeded.
        assert dirichlet == should_stop_sampling(answers, rule="dirichlet").probability

    def test_dirichlet_two_answers_agrees_with_beta(self):
        assert dirichlet_stop_probability([5, 1], draws=20000) == pytest.approx(
            beta_stop_probability(5, 1), abs=0.01
        )

    def test_bad_settings(self):
        with pytest.raises(ValueError, match="confidence"):
            should_stop_sampling(["1"], confidence=1.0)
        with pytest.raises(ValueError, match="rule"):
            should_stop_sampling(["1"], rule="poisson")  # type: ignore[arg-type]

    def test_stops_early_on_easy_questions_and_uses_all_on_hard_ones(self):
        # Simulated questions: easy ones answered right 95% of the time, hard ones 40% (the rest
        # spread over 3 wrong answers). Adaptive-Consistency's claim, in miniature: far fewer
        # samples on easy questions, nearly the full budget on hard ones, same majority answer.
        rng = random.Random(0)

        def run(p_right: float) -> tuple[int, bool]:
            answers: list[str | None] = []
            for size in wave_sizes(16, first=2, step=2):
                answers += [
                    "42" if rng.random() < p_right else str(rng.randrange(3)) for _ in range(size)
                ]
                if should_stop_sampling(answers).stop:
                    break
            return len(answers), answer_counts(answers) and max(
                set(answers), key=answers.count
            ) == "42"

        easy = [run(0.95) for _ in range(200)]
        hard = [run(0.4) for _ in range(200)]
        mean_easy = sum(n for n, _ in easy) / len(easy)
        mean_hard = sum(n for n, _ in hard) / len(hard)
        assert mean_easy < 6 < 10 < mean_hard
        assert sum(ok for _, ok in easy) >= 195


class TestWaves:
    def test_doubling_and_fixed_steps(self):
        assert wave_sizes(8) == [2, 2, 4]
        assert wave_sizes(6) == [2, 2, 2]
        assert wave_sizes(8, first=2, step=3) == [2, 3, 3]
        assert wave_sizes(3, first=5) == [3]
        assert sum(wave_sizes(13, first=3)) == 13

    def test_bad_sizes(self):
        with pytest.raises(ValueError):
            wave_sizes(0)
        with pytest.raises(ValueError):
            wave_sizes(4, step=0)


def test_answer_counts_groups_equivalent_answers():
    assert answer_counts(["2", "2.0", "3", None, "x", "X"]) == [2, 2, 1]
