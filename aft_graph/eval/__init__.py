"""The evaluation harness: does aggregation help, and at what compute?

:func:`evaluate` runs every strategy of a comparison over a task suite (:mod:`aft_graph.tasks`)
through the same graph (:func:`~aft_graph.graph.build_graph`), many questions at once, scores
every text of every layer, resumes from its records, and writes a summary with intervals and plots.

Modules: :mod:`.strategies` (the strategy-spec language, compute matching), :mod:`.run` (the
resumable run loop), :mod:`.metrics` (per-layer metrics, summaries), :mod:`.stats` (intervals),
:mod:`.report` (Markdown and JSON), :mod:`.plots` (PNG plots).
"""

from .metrics import question_metrics, summarize
from .plots import plot_accuracy_vs_compute, plot_steps, plot_width_depth, write_plots
from .report import summary_markdown, write_summary
from .run import REWARD_DESCRIPTION, evaluate, load_records
from .stats import bootstrap_interval, wilson_interval
from .strategies import (
    compute_matched,
    expected_calls,
    grid_strategies,
    parse_strategies,
    strategy_label,
)

__all__ = [
    "REWARD_DESCRIPTION",
    "bootstrap_interval",
    "compute_matched",
    "evaluate",
    "expected_calls",
    "grid_strategies",
    "load_records",
    "parse_strategies",
    "plot_accuracy_vs_compute",
    "plot_steps",
    "plot_width_depth",
    "question_metrics",
    "strategy_label",
    "summarize",
    "summary_markdown",
    "wilson_interval",
    "write_plots",
    "write_summary",
]
