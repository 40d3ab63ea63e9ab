"""The strategy-spec language and compute matching.

:func:`parse_strategies` reads command-line specs (``"single; sc:K=4; aft:K=4,L=1; matched:8"``);
:func:`compute_matched` sizes single sample, self-consistency, best-of-N, self-refine, AFT and RSA
to the same number of generation calls per question (each call with the same ``max_tokens``, so the
same generated-token budget); :func:`grid_strategies` gives the AFT width x depth grid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import AggregateConfig, SamplingConfig

__all__ = [
    "compute_matched",
    "expected_calls",
    "grid_strategies",
    "parse_strategies",
    "strategy_label",
]


def strategy_label(config: AggregateConfig) -> str:
    """A short name for a configuration: ``single``, ``sc_K8``, ``aft_K4_L1``, ``rsa_N4_K2_T1``..."""
    s = config.strategy
    if s == "self_consistency":
        return "single" if config.proposals == 1 else f"sc_K{config.proposals}"
    if s == "best_of_n":
        return f"bon_K{config.proposals}"
    if s == "self_refine":
        return f"refine_L{config.layers}"
    if s == "rsa":
        return f"rsa_N{config.population}_K{config.subset_size}_T{config.steps}" + _adapter_suffix(config)
    label = f"aft_K{config.proposals}_L{config.layers}" + ("_1f" if config.single_final_aggregation else "")
    return label + _adapter_suffix(config)


def _adapter_suffix(config: AggregateConfig) -> str:
    """``_<adapter name>`` for a trained aggregator, so it sits beside the untrained one."""
    return f"_{Path(config.aggregator_lora).name}" if config.aggregator_lora else ""


def expected_calls(config: AggregateConfig) -> int:
    """Generation calls one question costs under ``config`` (without failures or retries)."""
    if config.strategy == "rsa":
        return config.population * (config.steps + 1)
    if config.strategy == "self_refine":
        return 1 + config.layers
    if config.strategy in ("self_consistency", "best_of_n"):
        return config.proposals
    last = 1 if config.single_final_aggregation and config.layers > 0 else config.proposals
    return config.proposals + config.proposals * max(config.layers - 1, 0) + (last if config.layers else 0)


def compute_matched(
    calls: int,
    *,
    max_tokens: int = 384,
    temperature: float = 0.7,
    seed: int | None = 0,
    aft_layers: int = 1,
    rsa_steps: int = 1,
    rsa_subset: int = 2,
    include: Sequence[str] = ("single", "self_consistency", "best_of_n", "self_refine", "aft", "rsa"),
    **overrides: Any,
) -> dict[str, AggregateConfig]:
    """Strategies sized to spend about ``calls`` generation calls per question each.

    Every call may generate up to ``max_tokens`` tokens, so equal calls means an equal budget of
    generated tokens; the tokens actually spent differ (aggregations read longer prompts and may
    write shorter texts) and are reported by :func:`summarize`. Sizes: self-consistency and best-of-N
    ``K = calls``; self-refine ``1 + L = calls``; AFT ``K (L + 1) = calls`` with ``L = aft_layers``;
    RSA ``N (T + 1) = calls`` with ``T = rsa_steps`` and subsets of ``rsa_subset``. When ``calls``
    is not divisible, K and N are rounded down (see :func:`expected_calls`). ``single`` (one sample)
    is the 1-call reference point.

    Args:
        calls: Target calls per question (at least 2).
        max_tokens: New tokens per call, proposer and aggregator alike.
        temperature: Sampling temperature, proposer and aggregator alike.
        seed: Base seed shared by all strategies (so their proposals are the same samples).
        aft_layers: AFT depth L.
        rsa_steps: RSA steps T.
        rsa_subset: RSA subset size K (capped at N).
        include: Which strategies: ``single``, ``self_consistency``, ``best_of_n``, ``self_refine``,
            ``aft``, ``rsa``.
        **overrides: Other :class:`~aft_graph.config.AggregateConfig` fields for every strategy.

    Returns:
        ``{label: config}`` in the order of ``include`` (labels from :func:`strategy_label`).
    """
    if calls < 2:
        raise ValueError("compute matching needs at least 2 calls per question")
    sampling = SamplingConfig(temperature=temperature, max_tokens=max_tokens)
    common = dict(proposer=sampling, aggregator=sampling, seed=seed, **overrides)
    n_rsa = max(calls // (rsa_steps + 1), 1)
    make = {
        "single": lambda: AggregateConfig(strategy="self_consistency", proposals=1, **common),
        "self_consistency": lambda: AggregateConfig(strategy="self_consistency", proposals=calls, **common),
        "best_of_n": lambda: AggregateConfig(strategy="best_of_n", proposals=calls, **common),
        "self_refine": lambda: AggregateConfig(strategy="self_refine", layers=calls - 1, **common),
        "aft": lambda: AggregateConfig(
            strategy="propose_aggregate",
            proposals=max(calls // (aft_layers + 1), 1),
            layers=aft_layers,
            **common,
        ),
        "rsa": lambda: AggregateConfig(
            strategy="rsa",
            population=n_rsa,
            subset_size=min(rsa_subset, n_rsa),
            steps=rsa_steps,
            **common,
        ),
    }
    unknown = set(include) - set(make)
    if unknown:
        raise ValueError(f"unknown strategies {sorted(unknown)}: choose from {sorted(make)}")
    configs = [make[name]() for name in include]
    return {strategy_label(c): c for c in configs}


def grid_strategies(
    widths: Sequence[int],
    depths: Sequence[int],
    *,
    max_tokens: int = 384,
    temperature: float = 0.7,
    seed: int | None = 0,
    **overrides: Any,
) -> dict[str, AggregateConfig]:
    """The AFT width x depth grid (K proposals x L layers), for the heatmap of the AFT paper."""
    sampling = SamplingConfig(temperature=temperature, max_tokens=max_tokens)
    out = {}
    for k in widths:
        for depth in depths:
            config = AggregateConfig(
                strategy="propose_aggregate",
                proposals=k,
                layers=depth,
                proposer=sampling,
                aggregator=sampling,
                seed=seed,
                **overrides,
            )
            out[strategy_label(config)] = config
    return out


_ALIASES = {
    "single": "self_consistency",
    "sc": "self_consistency",
    "self_consistency": "self_consistency",
    "bon": "best_of_n",
    "best_of_n": "best_of_n",
    "refine": "self_refine",
    "self_refine": "self_refine",
    "aft": "propose_aggregate",
    "propose_aggregate": "propose_aggregate",
    "rsa": "rsa",
}


def parse_strategies(
    spec: str, *, max_tokens: int = 384, temperature: float = 0.7, seed: int | None = 0
) -> dict[str, AggregateConfig]:
    """Parse a command-line strategy list.

    ``spec`` is ``;``-separated items ``[name=]strategy[:key=value,...]``. Strategies: ``single``,
    ``sc``, ``bon``, ``refine``, ``aft``, ``rsa`` (or their full names); keys: ``K`` (proposals,
    or the subset size for RSA), ``L`` (layers), ``N`` (population), ``T`` (steps), any
    :class:`~aft_graph.config.AggregateConfig` field (``lora``: ``aggregator_lora``, e.g. ``lora=aft``
    for the shipped AFT aggregator), or a sampling field (``temperature``,
    ``max_tokens``...) applied to proposer and aggregator alike. ``matched:C`` expands to
    :func:`compute_matched` at C calls (``matched:8,include=sc+aft+rsa`` picks some).

    Example: ``"single; sc:K=4; aft:K=4,L=1; rsa:N=4,K=2,T=1"``.
    """
    sampling = SamplingConfig(temperature=temperature, max_tokens=max_tokens)
    out: dict[str, AggregateConfig] = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        head, _, args = item.partition(":")
        name, _, kind = head.rpartition("=")  # "name=kind" or just "kind"
        kind = kind.strip()
        params = {}
        for pair in filter(None, (p.strip() for p in args.split(","))):
            if "=" not in pair:
                if kind == "matched" and not params:
                    params["calls"] = int(pair)
                    continue
                raise ValueError(f"strategy option {pair!r} in {item!r} is not key=value")
            key, value = (s.strip() for s in pair.split("=", 1))
            params[key] = _parse_value(value)
        if kind == "matched":
            calls = params.pop("calls", None)
            include = params.pop("include", None)
            if calls is None:
                raise ValueError("`matched` needs a call count, e.g. matched:8")
            kwargs = {"include": [_MATCH_NAMES.get(s, s) for s in str(include).split("+")]} if include else {}
            out.update(
                compute_matched(
                    int(calls), max_tokens=max_tokens, temperature=temperature, seed=seed, **kwargs, **params
                )
            )
            continue
        if kind not in _ALIASES:
            raise ValueError(f"unknown strategy {kind!r} in {item!r}: one of {sorted(_ALIASES)} or matched")
        strategy = _ALIASES[kind]
        fields: dict[str, Any] = {"strategy": strategy, "proposer": sampling, "aggregator": sampling, "seed": seed}
        if kind == "single":
            fields["proposals"] = 1
        sampling_keys = {k: params.pop(k) for k in list(params) if k in SamplingConfig.model_fields}
        if sampling_keys:  # temperature=..., max_tokens=...: both roles alike
            fields["proposer"] = fields["aggregator"] = sampling.model_copy(update=sampling_keys)
        for key, value in params.items():
            mapped = {"L": "layers", "N": "population", "T": "steps", "lora": "aggregator_lora"}.get(key, key)
            if key == "K":
                mapped = "subset_size" if strategy == "rsa" else "proposals"
            fields[mapped] = value
        config = AggregateConfig(**fields)
        out[name.strip() or strategy_label(config)] = config
    if not out:
        raise ValueError("no strategies given, e.g. 'single; sc:K=4; aft:K=4,L=1'")
    return out


_MATCH_NAMES = {"sc": "self_consistency", "bon": "best_of_n", "refine": "self_refine"}


def _parse_value(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
