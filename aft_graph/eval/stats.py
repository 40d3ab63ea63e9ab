"""Confidence intervals: Wilson for accuracies, BCa bootstrap (``scipy.stats.bootstrap``) for means.

The Wilson interval keeps its closed form because scores may be fractional (reasoning-gym gives
partial credit), which ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`` refuses (it
needs an integer k); for integer counts the two agree (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["bootstrap_interval", "wilson_interval"]


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (``successes`` may be fractional: mean scores x n)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of a mean, resampling the values (e.g. questions, or the per-question
    differences of a paired comparison).

    ``scipy.stats.bootstrap`` with the bias-corrected and accelerated (BCa) method; where BCa is
    undefined (e.g. every resample on one side of the mean) the percentile interval is used.
    Constant values give the value itself; no values give NaNs.
    """
    values = [float(v) for v in values]
    if not values:
        return (float("nan"), float("nan"))
    if min(values) == max(values):
        return (values[0], values[0])
    import warnings

    import numpy as np
    from scipy.stats import bootstrap

    data = (np.asarray(values),)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns before returning NaN for BCa
            ci = bootstrap(
                data, np.mean, n_resamples=resamples, confidence_level=level, method=method,
                rng=np.random.default_rng(seed),
            ).confidence_interval  # fmt: skip
        if not (math.isnan(ci.low) or math.isnan(ci.high)):
            break
    return (float(ci.low), float(ci.high))
