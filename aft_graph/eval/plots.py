"""Plots of an evaluation summary (matplotlib, Agg backend, PNG files).

- ``accuracy_vs_compute.png``: final accuracy of each strategy against the generated tokens it spent
  per question, with 95% Wilson intervals; for multi-layer strategies a faint line follows pass@1
  layer by layer.
- ``width_depth.png``: the AFT width x depth grid (K proposals x L layers) as a heatmap of the last
  layer's pass@1, as in the AFT paper (only when the summary holds at least two AFT shapes).
- ``steps.png``: pass@1, majority and pass@N per layer / RSA step for every strategy with
  aggregation or refinement layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_accuracy_vs_compute", "plot_steps", "plot_width_depth", "write_plots"]


_LABELS = {"pass1": "pass@1", "majority": "majority", "pass_n": "pass@N"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def _err(values: list[float], cis) -> list[list[float]]:
    """Error-bar lengths below and above each value; max(0, ...): a percentile interval can miss
    its own mean by rounding."""
    return [
        [max(v - c[0], 0.0) for v, c in zip(values, cis, strict=True)],
        [max(c[1] - v, 0.0) for v, c in zip(values, cis, strict=True)],
    ]


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_compute(summary: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Final accuracy vs generated tokens per question, one point (with CI bar) per strategy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("tab10")
    for i, (name, s) in enumerate(summary["strategies"].items()):
        if not s["n"]:
            continue
        color = cmap(i % 10)
        layers = s["layers"]
        if len(layers) > 1:
            ax.plot(
                [row["gen_tokens"] for row in layers],
                [100 * row["pass1"] for row in layers],
                ls=":",
                color=color,
                alpha=0.6,
            )
        ax.errorbar(
            [s["gen_tokens"]],
            [100 * s["final"]],
            yerr=[[100 * v for v in side] for side in _err([s["final"]], [s["final_ci"]])],
            fmt="o",
            capsize=4,
            color=color,
            label=f"{name} ({s['calls']:.0f} calls)",
        )
    ax.set_xlabel("generated tokens per question (mean)")
    ax.set_ylabel("final accuracy % (95% Wilson CI)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"accuracy vs compute: {summary.get('suite', '')}")
    ax.legend(fontsize=8, loc="best")
    fig.text(0.01, 0.01, "dotted: pass@1 layer by layer", fontsize=7, alpha=0.7)
    return _save(plt, fig, path)


def _aft_grid(summary: Mapping[str, Any]) -> dict[tuple[int, int], float]:
    grid = {}
    for s in summary["strategies"].values():
        if s.get("strategy") != "propose_aggregate" or not s["n"] or not s["layers"]:
            continue
        k, depth = s["config"]["proposals"], s["config"]["layers"]
        grid[(k, depth)] = s["layers"][-1]["pass1"]
    return grid


def plot_width_depth(summary: Mapping[str, Any], path: str | Path) -> Path | None:
    """Heatmap of the AFT grid: last-layer pass@1 per (K, L); ``None`` with fewer than 2 shapes."""
    grid = _aft_grid(summary)
    if len(grid) < 2:
        return None
    plt = _pyplot()
    ks = sorted({k for k, _ in grid})
    ls = sorted({d for _, d in grid})
    values = [[grid.get((k, d), float("nan")) * 100 for k in ks] for d in ls]
    fig, ax = plt.subplots(figsize=(1.2 * len(ks) + 2.5, 0.9 * len(ls) + 2))
    image = ax.imshow(values, origin="lower", cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for row, depth in enumerate(ls):
        for col, k in enumerate(ks):
            if (k, depth) in grid:
                v = values[row][col]
                ax.text(col, row, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(ls)), [str(d) for d in ls])
    ax.set_xlabel("width K (proposals per layer)")
    ax.set_ylabel("depth L (aggregation layers)")
    ax.set_title("AFT: last-layer pass@1 %")
    fig.colorbar(image, ax=ax)
    return _save(plt, fig, path)


def plot_steps(summary: Mapping[str, Any], path: str | Path) -> Path | None:
    """Per-layer pass@1, majority and pass@N of every multi-layer strategy (RSA steps, AFT layers)."""
    deep = {n: s for n, s in summary["strategies"].items() if s["n"] and len(s["layers"]) > 1}
    if not deep:
        return None
    plt = _pyplot()
    cols = min(len(deep), 4)
    rows = -(-len(deep) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 0.6, 3.4 * rows), squeeze=False, sharey=True)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(deep) :]:
        ax.set_visible(False)
    for ax, (name, s) in zip(flat, deep.items(), strict=False):
        xs = [row["layer"] for row in s["layers"]]
        for key, marker in (("pass1", "o"), ("majority", "s"), ("pass_n", "^")):
            ys = [100 * row[key] for row in s["layers"]]
            ci = [(100 * row[f"{key}_ci"][0], 100 * row[f"{key}_ci"][1]) for row in s["layers"]]
            err = _err(ys, ci)
            ax.errorbar(xs, ys, yerr=err, marker=marker, capsize=3, label=_LABELS[key])
        ax.set_xticks(xs)
        ax.set_xlabel("step" if s.get("strategy") == "rsa" else "layer")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_ylim(-2, 102)
    for row in axes:
        row[0].set_ylabel("accuracy % (95% CI)")
    flat[len(deep) - 1].legend(fontsize=8)
    return _save(plt, fig, path)


def write_plots(summary: Mapping[str, Any], out_dir: str | Path, *, prefix: str = "") -> list[Path]:
    """Write every plot that applies to ``summary`` into ``out_dir``; return the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_accuracy_vs_compute(summary, out / f"{prefix}accuracy_vs_compute.png")]
    for make, name in ((plot_width_depth, "width_depth.png"), (plot_steps, "steps.png")):
        path = make(summary, out / f"{prefix}{name}")
        if path is not None:
            written.append(path)
    return written
