"""Every plot of the report, as PNG: perplexity, the learning–forgetting frontier (general and tasks), the
training loss, and the curves measured while the arms trained (curves, path).

Each function takes the report's tables and writes one figure atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ftcore.config import SETS  # noqa: E402
from ftcore.io import atomic_path  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_perplexity(table: pd.DataFrame, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.3 * len(table) + 4), 3.8))
    x = np.arange(len(table))
    for ax, name in zip(axes, SETS):
        values = table[f"{name}_ppl"].to_numpy()
        err = np.vstack([values - table[f"{name}_ppl_ci_low"], table[f"{name}_ppl_ci_high"] - values])
        ax.bar(x, values, yerr=err, capsize=3, color=["#888"] + ["#4a7ebb"] * (len(table) - 1))
        ax.axhline(values[0], color="k", lw=0.8, ls="--")
        ax.set_xticks(x, table["arm"], rotation=30, ha="right")
        ax.set_title(f"{name} perplexity, 95% CI (lower is better)")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    return save_figure(fig, path)


def plot_frontier(table: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path:
    """Domain gain vs general forgetting: every seed's run, each arm's mean with its intervals, the front."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    arms = table[table.arm != "base"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (_, r) in enumerate(arms.iterrows()):
        c = colors[i % len(colors)]
        seeds = runs[runs.arm == r["arm"]]
        ax.scatter(-seeds["domain_change_pct"], seeds["general_change_pct"], s=14, color=c, alpha=0.5)
        gain, forget = -r["domain_change_pct"], r["general_change_pct"]
        xerr = [[gain - -r["domain_change_ci_high"]], [-r["domain_change_ci_low"] - gain]]
        yerr = [[forget - r["general_change_ci_low"]], [r["general_change_ci_high"] - forget]]
        ax.errorbar(gain, forget, xerr=xerr, yerr=yerr, fmt="o", color=c, ms=7, capsize=3, lw=1,
                    mec="k" if r.get("pareto") else c, label=r["arm"])  # named in the legend: labels collided
    front = arms[arms["pareto"]].sort_values("domain_change_pct", ascending=False) if "pareto" in arms else arms.iloc[:0]
    if len(front):
        ax.step(-front["domain_change_pct"], front["general_change_pct"], where="post", color="k", lw=1, ls="--",
                label="Pareto front")
    return finish_frontier(fig, ax, path, "general forgetting (% rise in perplexity) ↓",
                           "learning vs forgetting (small dots: seeds; bars: 95% CI)")


def finish_frontier(fig, ax, path: Path, ylabel: str, title: str) -> Path:
    """A frontier plot's common part (the base at the origin, axes, legend), saved to `path`."""
    ax.scatter([0], [0], marker="x", color="k", label="base")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("domain gain (% fall in perplexity) →")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def plot_losses(logs: dict[str, Path], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, log_path in logs.items():
        entries = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
        if entries:
            ax.plot([e["step"] for e in entries], [e["loss"] for e in entries], label=arm)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    ax.set_title("training loss")
    return save_figure(fig, path)


def plot_task_frontier(arms: pd.DataFrame, path: Path) -> Path:
    """Domain gain (x, % fall in domain perplexity) vs task forgetting (y, mean change in points)."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    rows = arms[(arms.arm != "base") & arms["task_forgetting_pts"].notna()]
    for _, r in rows.iterrows():
        gain, change = -r["domain_change_pct"], r["task_forgetting_pts"]
        yerr = [[change - r["task_forgetting_ci_low"]], [r["task_forgetting_ci_high"] - change]]
        ax.errorbar(gain, change, yerr=yerr, fmt="o", ms=7, capsize=3, lw=1, label=r["arm"])
    return finish_frontier(fig, ax, path, "task change (mean accuracy change, points) ↑",
                           "learning vs task forgetting (bars: 95% CI over examples)")


def plot_curves(means: pd.DataFrame, path: Path) -> Path:
    """Domain and general perplexity against the step, a line per arm, seeds as a band."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, which in zip(axes, SETS):
        for i, (arm, g) in enumerate(means[means.set == which].groupby("arm", sort=False)):
            c = colors[i % len(colors)]
            ax.plot(g["step"], g["ppl"], marker="o", ms=3, color=c, label=arm)
            if g["seeds"].max() > 1:
                ax.fill_between(g["step"], g["ppl_min"], g["ppl_max"], color=c, alpha=0.2, lw=0)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{which} perplexity on the curve subsample")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_path(means: pd.DataFrame, path: Path, budget_pct: float | None = None, gains: Sequence[float] = ()) -> Path:
    """General change against domain gain along training, from the base (origin) to each arm's last point; the
    domain gains the arms are compared at (ftcore.matched_gain) as vertical lines."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    wide = means.pivot_table(index=["arm", "step"], columns="set", values="change_pct", sort=False).reset_index()
    for i, (arm, g) in enumerate(wide.groupby("arm", sort=False)):
        c = colors[i % len(colors)]
        g = g.sort_values("step")
        # Named in the legend, not beside the points: the ends of two arms often coincide and their labels collided.
        ax.plot(-g["domain"], g["general"], marker="o", ms=3, color=c, label=f"{arm} (last: step {int(g['step'].iloc[-1])})")
        ax.scatter(-g["domain"].iloc[-1], g["general"].iloc[-1], s=70, color=c, edgecolor="k", zorder=3)
    ax.scatter([0], [0], marker="x", color="k", label="base (step 0)", zorder=4)
    if budget_pct is not None:
        ax.axhline(budget_pct, color="r", lw=0.8, ls="--", label=f"forgetting budget +{budget_pct:g}%")
    for i, gain in enumerate(gains):
        ax.axvline(gain, color="0.4", lw=0.8, ls=":", label="compared at equal domain gain" if i == 0 else None)
        ax.annotate(f"{gain:.1f}%", (gain, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="0.3")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("domain gain along training (% fall in perplexity) →")
    ax.set_ylabel("general change (% rise in perplexity) ↓")
    ax.set_title("learning–forgetting path (large dot: last step)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
