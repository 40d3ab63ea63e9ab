"""Validation of the adaptive-compute and selection settings of AggregateConfig."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from aft_graph.config import AggregateConfig


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(strategy="self_consistency", early_exit=True), "use adaptive_width=True"),
        (dict(layers=0, early_exit=True), "has none"),
        (dict(strategy="self_refine", layers=2, early_exit=True), "self_refine has one per layer"),
        (dict(adaptive_width=True, first_wave=5, proposals=4), "set first_wave <= proposals"),
        (dict(strategy="self_refine", adaptive_width=True), "self_refine does not use"),
        (dict(strategy="best_of_n", adaptive_width=True), "best_of_n"),
        (dict(strategy="self_refine", keep_confident=0.5), "self_refine has one"),
        (dict(proposed_inputs=3), "proposed_inputs are used by behaviour checks"),
        (dict(strategy="self_consistency", code_checks=True), "use select='behaviour'"),
        (dict(strategy="best_of_n", select="confidence"), "best_of_n selects by reward"),
        (dict(agreement=0.5), "greater than 0.5"),
        (dict(keep_confident=0.0), "greater than 0"),
        (dict(stop_confidence=1.0), "less than 1"),
        (dict(select="vibes"), "Input should be"),
    ],
)
def test_bad_settings_name_the_fix(settings, message):
    with pytest.raises(ValidationError, match=message):
        AggregateConfig(**settings)


def test_good_settings_and_derived_flags():
    c = AggregateConfig(strategy="self_consistency", adaptive_width=True, select="confidence")
    assert c.needs_logprobs and not c.checks_code
    c = AggregateConfig(early_exit=True, agreement=0.75, keep_confident=0.5)
    assert c.needs_logprobs and c.resolved_select == "last"
    c = AggregateConfig(strategy="self_consistency", select="behaviour", proposed_inputs=4)
    assert c.checks_code and not c.needs_logprobs
    assert AggregateConfig(code_checks=True).checks_code
    assert not AggregateConfig().needs_logprobs
    assert AggregateConfig(strategy="rsa", adaptive_width=True, first_wave=8, population=8).first_wave == 8
