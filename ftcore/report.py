"""The study's table (parquet + markdown), the check against the seed's expectations, and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ftcore.io import atomic_path, write_parquet, write_text  # noqa: E402

ROW_ORDER = ["base", "full", "replay", "lora"]
EXPECTED = {
    "domain": "domain perplexity falls 20-40% under fine-tuning",
    "general": "general perplexity rises under full FT, rises less with replay; LoRA keeps most of the domain gain with less forgetting",
}


def build_table(evals: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """evals[arm][set] = perplexity summary -> one row per arm with % change against base."""
    if "base" not in evals:
        raise ValueError("the table needs the base model's evaluation")
    rows = []
    for arm in sorted(evals, key=lambda a: (ROW_ORDER.index(a) if a in ROW_ORDER else len(ROW_ORDER), a)):
        row: dict[str, Any] = {"arm": arm}
        for name in ("domain", "general"):
            s, base = evals[arm][name], evals["base"][name]
            row[f"{name}_ppl"] = s["ppl"]
            row[f"{name}_change_pct"] = 100 * (s["ppl"] / base["ppl"] - 1)
            row[f"{name}_bpb"] = s["bpb"]
            row[f"{name}_tokens"] = s["tokens"]
        rows.append(row)
    return pd.DataFrame(rows)


def expectation_checks(table: pd.DataFrame) -> list[str]:
    """Each seed expectation, stated against the measured numbers (true or not)."""
    t = table.set_index("arm")
    lines = []
    arms = [a for a in t.index if a != "base"]
    for arm in arms:
        d = t.loc[arm, "domain_change_pct"]
        verdict = "within" if -40 <= d <= -20 else ("a smaller fall than" if d > -20 else "a larger fall than")
        lines.append(f"{arm}: domain perplexity {d:+.1f}% ({verdict} the expected -20…-40%)")
    if "full" in t.index:
        g = t.loc["full", "general_change_pct"]
        lines.append(f"full: general perplexity {g:+.1f}% ({'rose, as expected' if g > 0 else 'did not rise: no forgetting measured'})")
        for arm, claim in (("replay", "less forgetting than full"), ("lora", "less forgetting than full")):
            if arm in t.index:
                ga = t.loc[arm, "general_change_pct"]
                holds = ga < g
                lines.append(f"{arm}: general {ga:+.1f}% vs full {g:+.1f}% ({claim}: {'yes' if holds else 'no'})")
        if "lora" in t.index and t.loc["full", "domain_change_pct"] < 0:
            kept = t.loc["lora", "domain_change_pct"] / t.loc["full", "domain_change_pct"]
            lines.append(f"lora: keeps {100 * kept:.0f}% of full FT's domain gain ({'most' if kept >= 0.5 else 'less than half'})")
    return lines


def markdown_table(table: pd.DataFrame) -> str:
    out = ["| arm | domain ppl | Δ domain | general ppl | Δ general | domain bits/byte | general bits/byte |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in table.itertuples(index=False):
        dd = "—" if r.arm == "base" else f"{r.domain_change_pct:+.1f}%"
        dg = "—" if r.arm == "base" else f"{r.general_change_pct:+.1f}%"
        out.append(f"| {r.arm} | {r.domain_ppl:.2f} | {dd} | {r.general_ppl:.2f} | {dg} | {r.domain_bpb:.3f} | {r.general_bpb:.3f} |")
    return "\n".join(out)


def render_markdown(table: pd.DataFrame, title: str, details: dict[str, Any], plots: dict[str, Path]) -> str:
    lines = [f"# Fine-tuning cost study: {title}", "", markdown_table(table), "",
             "## Against the seed recipe's expectations", "", f"Expected: {EXPECTED['domain']}; {EXPECTED['general']}.", ""]
    lines += [f"- {line}" for line in expectation_checks(table)]
    if details:
        lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in details.items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({path.name})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


# --- plots -------------------------------------------------------------------------------------

def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_perplexity(table: pd.DataFrame, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, name in zip(axes, ("domain", "general")):
        ax.bar(table["arm"], table[f"{name}_ppl"], color=["#888"] + ["#4a7ebb"] * (len(table) - 1))
        ax.axhline(table.loc[table["arm"] == "base", f"{name}_ppl"].item(), color="k", lw=0.8, ls="--")
        ax.set_title(f"{name} perplexity (lower is better)")
        for i, v in enumerate(table[f"{name}_ppl"]):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    return _save(fig, path)


def plot_tradeoff(table: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4))
    arms = table[table["arm"] != "base"]
    ax.scatter(-arms["domain_change_pct"], arms["general_change_pct"], s=40)
    for r in arms.itertuples(index=False):
        ax.annotate(r.arm, (-r.domain_change_pct, r.general_change_pct), textcoords="offset points", xytext=(5, 5))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("domain gain (% fall in perplexity)")
    ax.set_ylabel("general forgetting (% rise in perplexity)")
    ax.set_title("learning vs forgetting")
    return _save(fig, path)


def plot_losses(logs: dict[str, Path], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, log_path in logs.items():
        entries = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
        if entries:
            ax.plot([e["step"] for e in entries], [e["loss"] for e in entries], label=arm)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.set_title("training loss")
    return _save(fig, path)


def write_report(
    evals: dict[str, dict[str, dict[str, float]]], out_dir: str | Path, title: str,
    loss_logs: dict[str, Path] | None = None, details: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write table.parquet, table.md, report.md and the plots into out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(evals)
    plots = {"perplexity": plot_perplexity(table, out / "perplexity.png"),
             "tradeoff": plot_tradeoff(table, out / "tradeoff.png")}
    if loss_logs:
        plots["loss"] = plot_losses(loss_logs, out / "loss.png")
    write_parquet(table, out / "table.parquet")
    write_text(markdown_table(table) + "\n", out / "table.md")
    write_text(render_markdown(table, title, details or {}, plots), out / "report.md")
    return {"table": str(out / "table.parquet"), "report": str(out / "report.md"),
            **{name: str(p) for name, p in plots.items()}}
