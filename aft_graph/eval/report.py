"""Writing an evaluation summary: Markdown tables (``summary.md``), ``summary.json`` and plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["summary_markdown", "write_summary"]


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci(ci: Sequence[float] | None) -> str:
    if ci is None or any(isinstance(c, float) and math.isnan(c) for c in ci):
        return ""
    return f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown tables (what ``summary.md`` holds)."""
    lines = []
    strategies = summary["strategies"]
    lines.append("| strategy | config | n | final accuracy % [95% CI] | gen tokens/q | prompt tokens/q | calls/q | hit max_tokens % | s/q |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, s in strategies.items():
        cfg = ", ".join(f"{k}={v}" for k, v in s["config"].items() if k not in ("max_tokens", "temperature", "seed"))
        err = f" ({s['errors']} failed)" if s["errors"] else ""
        lines.append(
            f"| {name} | {s['strategy']}: {cfg} | {s['n']}{err} | {_pct(s['final'])}{_ci(s['final_ci'])} | "
            f"{s['gen_tokens']:.0f} | {s['prompt_tokens']:.0f} | {s['calls']:.1f} | "
            f"{_pct(s['hit_max_tokens'])} | {s['elapsed_s']:.1f} |"
        )
    lines += ["", "Per layer (layer 0 = proposals; compute is cumulative up to the layer):", ""]
    lines.append("| strategy | layer | texts | pass@1 % [CI] | majority % [CI] | pass@N % [CI] | aggregation gain pp [CI] | gen tokens | calls |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, s in strategies.items():
        for row in s["layers"]:
            gain = "-" if row["gain"] is None else f"{100 * row['gain']:+.1f}{_ci(row['gain_ci'])}"
            lines.append(
                f"| {name} | {row['layer']} | {row['texts']:.1f} | {_pct(row['pass1'])}{_ci(row['pass1_ci'])} | "
                f"{_pct(row['majority'])}{_ci(row['majority_ci'])} | {_pct(row['pass_n'])}{_ci(row['pass_n_ci'])} | "
                f"{gain} | {row['gen_tokens']:.0f} | {row['calls']:.1f} |"
            )
    if summary.get("differences"):
        lines += ["", "Paired differences of final accuracy (same questions; 95% bootstrap over questions):", ""]
        lines.append("| strategy | minus | n paired | difference pp [95% CI] |")
        lines.append("|---|---|---|---|")
        for d in summary["differences"]:
            diff = "-" if math.isnan(d["diff"]) else f"{100 * d['diff']:+.1f}{_ci(d['diff_ci'])}"
            lines.append(f"| {d['strategy']} | {d['reference']} | {d['n']} | {diff} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: Mapping[str, Any], out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``summary.json``, ``summary.md`` and (optionally) the PNG plots; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    head = [f"# Evaluation: {summary.get('suite', '')}", ""]
    if "n_tasks" in summary:
        head.append(f"{summary['n_tasks']} tasks; wall time {summary.get('wall_s', '?')} s this session.")
    if "best_of_n_reward" in summary:
        head.append(f"\n{summary['best_of_n_reward']}")
    (out / "summary.md").write_text("\n".join(head) + "\n\n" + summary_markdown(summary))
    paths = [out / "summary.json", out / "summary.md"]
    if plots:
        from .plots import write_plots

        paths += write_plots(summary, out)
    return paths
