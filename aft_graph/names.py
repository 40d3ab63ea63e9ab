"""Strategy names: ``"aft-k4-l2"`` → an :class:`~aft_graph.config.AggregateConfig`.

One short string picks a strategy and its sizes wherever a *model name* is expected: the ``model``
field of a request to ``aft-graph serve`` (as in optillm, where the model name chooses the
technique), :meth:`AggregatingChatModel.from_strategy <aft_graph.chat_model.AggregatingChatModel>`
and the ``strategy`` setting of the LangGraph Server deployment.

A name is a strategy word followed by ``-<letter><number>`` size parts in any order (case
insensitive). Sizes left out take the defaults below (those of ``AggregateConfig``):

========== ========================= ======================================================
name       strategy                  sizes (default)
========== ========================= ======================================================
``aft``    ``propose_aggregate``     ``k`` proposals (4), ``l`` aggregation layers (1)
``rsa``    ``rsa``                   ``n`` population (8), ``k`` subset size (4), ``t`` steps (2)
``sc``     ``self_consistency``      ``k`` samples, majority vote (4)
``refine`` ``self_refine``           ``l`` refinement rounds (1)
``single`` ``propose_aggregate``     one sample, no aggregation (the baseline)
========== ========================= ======================================================

Examples: ``aft`` (K=4, L=1), ``aft-k4-l2``, ``rsa-n8-k4-t3``, ``sc-k8``, ``refine-l2``.
``best_of_n`` needs a reward function, so it has no name: use the Python API.
"""

from __future__ import annotations

import re
from typing import Any

from .config import AggregateConfig

__all__ = ["MODEL_NAMES", "model_name_fields", "parse_model_name"]

# strategy word -> (AggregateConfig.strategy, {size letter: config field}, fixed fields)
_GRAMMAR: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
    "aft": ("propose_aggregate", {"k": "proposals", "l": "layers"}, {}),
    "rsa": ("rsa", {"n": "population", "k": "subset_size", "t": "steps"}, {}),
    "sc": ("self_consistency", {"k": "proposals"}, {}),
    "refine": ("self_refine", {"l": "layers"}, {}),
    "single": ("propose_aggregate", {}, {"proposals": 1, "layers": 0}),
}

MODEL_NAMES: dict[str, str] = {
    "aft": "AFT propose-and-aggregate, K=4 proposals, L=1 aggregation layer (aft-k<K>-l<L>)",
    "aft-k4-l2": "AFT, K=4 proposals, L=2 aggregation layers",
    "rsa": "RSA, population N=8, subsets of K=4, T=2 steps (rsa-n<N>-k<K>-t<T>)",
    "rsa-n8-k4-t3": "RSA, population N=8, subsets of K=4, T=3 steps",
    "sc": "self-consistency, K=4 samples, majority vote (sc-k<K>)",
    "sc-k8": "self-consistency, K=8 samples, majority vote",
    "refine": "self-refine, 1 sample refined L=1 time (refine-l<L>)",
    "single": "one sample, no aggregation (baseline)",
}
"""Names worth listing (``GET /v1/models``), with what each runs; any name of the grammar works."""

_PART = re.compile(r"([a-z])(\d+)")


def _syntax_help() -> str:
    return (
        "use a strategy word with optional sizes, e.g. 'aft', 'aft-k4-l2', 'rsa-n8-k4-t3', "
        "'sc-k8', 'refine-l2' or 'single'"
    )


def parse_model_name(name: str, **overrides: Any) -> AggregateConfig:
    """The configuration a strategy name stands for.

    Args:
        name: A strategy name such as ``"aft-k4-l2"`` (see the module docstring).
        **overrides: Any other ``AggregateConfig`` field (``seed``, ``proposer``, ``select``...);
            they win over the name's sizes.

    Returns:
        The validated configuration.

    Raises:
        ValueError: the name does not follow the grammar, repeats a size, or the resulting
            configuration is invalid (the message says what to change).
    """
    return AggregateConfig(**{**model_name_fields(name), **overrides})


def model_name_fields(name: str) -> dict[str, Any]:
    """The ``AggregateConfig`` fields a strategy name sets (the grammar only; not validated).

    Raises:
        ValueError: the name does not follow the grammar or repeats a size.
    """
    word, *parts = name.strip().lower().split("-")
    if word not in _GRAMMAR:
        raise ValueError(
            f"unknown strategy {word!r} in model name {name!r}: the strategies are "
            f"{', '.join(repr(w) for w in _GRAMMAR)}; {_syntax_help()}"
        )
    strategy, letters, fixed = _GRAMMAR[word]
    fields: dict[str, Any] = {"strategy": strategy, **fixed}
    for part in parts:
        match = _PART.fullmatch(part)
        if match is None or match.group(1) not in letters:
            allowed = ", ".join(f"{k}<{v}>" for k, v in letters.items()) or "none"
            raise ValueError(
                f"cannot read {part!r} in model name {name!r}: {word!r} takes the sizes {allowed}; "
                f"{_syntax_help()}"
            )
        field = letters[match.group(1)]
        if field in fields:
            raise ValueError(f"model name {name!r} gives {field} twice: give each size once")
        fields[field] = int(match.group(2))
    return fields
