"""Forgetting along training, from the arms' curves (ftcore.curves): plots, the budget and a power-law fit.

- curves.png: domain and general perplexity against the optimizer step, one line per arm (the
  mean over seeds, the band their range);
- path.png: the learning–forgetting path, general change against domain gain along training
  (Biderman et al. 2024), from the base at the origin to the arm's last point (marked);
- the forgetting budget per arm and seed: the first step over it and the best step within it;
- per arm, the general change fitted with a shifted power law in the update steps, the form
  Kalajdzievski 2024 find for forgetting: Δnll(t) = a · ((t + c)^b − c^b), in nats per token,
  anchored at 0 at step 0 (the base); reported with R² and the change it predicts at twice the
  steps trained, which is an extrapolation.

Changes are against step 0 of the same curve, on the curve's subsample (not the final evaluation's
sets unless eval.curve_tokens is None).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ftcore import curves, matched_gain, plots

MIN_POINTS = 4  # trained points (step > 0) a fit needs
# Curve points the KL's rank correlation with forgetting needs: with 4, even a perfect ρ of ±1 has a two-sided exact
# p of 2/24 = 0.083 (every order of 4 equally likely), so no ρ could be told from chance at 5%; with 5, 2/120.
MIN_RANKED = 5
POOR_FIT = 0.9  # R² under this is reported as a poor fit


def load(arms: list[dict[str, Any]], root: str | Path) -> pd.DataFrame:
    """Every arm's curves.parquet, with arm and seed columns (empty when no arm has curves)."""
    parts = [pd.read_parquet(Path(root) / a["curves"]).assign(arm=a["arm"], seed=a["seed"])
             for a in arms if a.get("curves")]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def seed_means(df: pd.DataFrame) -> pd.DataFrame:
    """Per arm, step and set: perplexity and change (mean, min and max over seeds), mean nll change."""
    df = df.sort_values(["seed", "set", "step"], kind="stable")  # arms stay in the study's order
    df = df.assign(delta_nll=df.groupby(["arm", "seed", "set"])["nll"].transform(lambda s: s - s.iloc[0]))
    return df.groupby(["arm", "set", "step"], sort=False).agg(
        ppl=("ppl", "mean"), ppl_min=("ppl", "min"), ppl_max=("ppl", "max"), change_pct=("change_pct", "mean"),
        delta_nll=("delta_nll", "mean"), tokens_seen=("tokens_seen", "mean"), seeds=("seed", "nunique")).reset_index()


# --- the power-law fit --------------------------------------------------------------------------------

def shifted_power_law(t: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a * ((t + c) ** b - c ** b)


def fit_power_law(steps: np.ndarray, delta_nll: np.ndarray) -> dict[str, Any]:
    """Least-squares fit of Δnll(t) = a · ((t + c)^b − c^b) (scipy.optimize.curve_fit; b in (0, 3], c > 0).

    Returns a, b, c, r2, points and `predict` (a function of t), or `error` saying why there is no fit
    (too few trained points, no convergence).
    """
    from scipy.optimize import curve_fit

    t, y = np.asarray(steps, dtype=float), np.asarray(delta_nll, dtype=float)
    n = int((t > 0).sum())
    if n < MIN_POINTS:
        return {"points": n, "error": f"{n} trained point{'s' if n != 1 else ''}; a fit needs {MIN_POINTS}"}
    span = float(t.max())
    best = None
    for b0 in (0.3, 0.6, 1.0):
        for c0 in (1.0, span / 10, span):
            slope = y[-1] / max(shifted_power_law(span, 1.0, b0, c0), 1e-12)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    params, _ = curve_fit(shifted_power_law, t, y, p0=(slope, b0, c0),
                                          bounds=([-np.inf, 1e-3, 1e-3], [np.inf, 3.0, 10 * span]), maxfev=5000)
            except (RuntimeError, ValueError):
                continue
            sse = float(((shifted_power_law(t, *params) - y) ** 2).sum())
            if best is None or sse < best[1]:
                best = (params, sse)
    if best is None:
        return {"points": n, "error": "the least-squares fit did not converge"}
    (a, b, c), sse = best
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - sse / sst if sst > 0 else float("nan")
    return {"a": float(a), "b": float(b), "c": float(c), "r2": r2, "points": n,
            "predict": lambda x: float(shifted_power_law(np.asarray(x, dtype=float), a, b, c))}


def fits(means: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per arm, the power-law fit of its mean general change, with the change predicted at 2x its steps."""
    out = {}
    for arm, g in means[means.set == "general"].groupby("arm", sort=False):
        fit = fit_power_law(g["step"].to_numpy(), g["delta_nll"].to_numpy())
        last = int(g["step"].max())
        if "error" not in fit:
            fit["at_2x"] = 100 * math.expm1(fit["predict"](2 * last))
        out[arm] = fit | {"last_step": last}
    return out


# --- the budget ------------------------------------------------------------------------------------

def budget_rows(df: pd.DataFrame, budget_pct: float, summaries: dict[tuple[str, int], dict[str, Any]]) -> list[dict]:
    """Per arm and seed: the first step over the budget and the best step within it, with its changes."""
    rows = []
    for (arm, seed), g in df.groupby(["arm", "seed"], sort=False):
        points = g.to_dict("records")
        first_over, best = curves.best_within(points, budget_pct)
        at = curves.changes(points).get(best, {})
        kept = (summaries.get((arm, seed)) or {}).get("budget") or {}
        rows.append({"arm": arm, "seed": seed, "first_over": first_over, "best": best,
                     "best_domain": at.get("domain"), "best_general": at.get("general"),
                     "stopped_at": kept.get("stopped_at_step"), "model_step": kept.get("model_step")})
    return rows


# --- words -------------------------------------------------------------------------------------------

def _fit_text(fit: dict[str, Any]) -> tuple[str, str]:
    if "error" in fit:
        return f"no fit ({fit['error']})", "—"
    poor = " ⚠ poor fit" if not fit["r2"] >= POOR_FIT else ""
    law = f"{fit['a']:.3g} · ((t + {fit['c']:.3g})^{fit['b']:.3g} − {fit['c']:.3g}^{fit['b']:.3g}), R² {fit['r2']:.2f}{poor}"
    return law, f"{fit['at_2x']:+.1f}% at step {2 * fit['last_step']} (extrapolated)"


def section(df: pd.DataFrame, means: pd.DataFrame, budget_pct: float | None,
            summaries: dict[tuple[str, int], dict[str, Any]], whole: bool = False) -> list[str]:
    """The report's "Forgetting along training" section (markdown lines)."""
    sizes = df[df.step == 0].groupby("set")["tokens"].first()
    lines = [f"Every arm was scored while it trained, at {df.groupby(['arm', 'seed'])['step'].nunique().max()} points "
             f"(step 0 = before training), on {'the whole evaluation sets' if whole else 'a fixed subsample'}: "
             f"{int(sizes.get('domain', 0))} domain and {int(sizes.get('general', 0))} general tokens. Changes are "
             "against step 0 on these tokens; the "
             "general change is fitted with a shifted power law in the step t (Kalajdzievski 2024), in nats per "
             "token, and its value at twice the steps is an extrapolation.", "",
             "| arm | steps | Δ domain (last point) | Δ general (last point) | largest Δ general (step) | "
             "general Δnll(t) fit | predicted |", "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for arm, fit in fits(means).items():
        g = means[(means.arm == arm)]
        gen, dom = g[g.set == "general"], g[g.set == "domain"]
        peak = gen.loc[gen["change_pct"].idxmax()]
        rose = f"{peak['change_pct']:+.1f}% ({int(peak['step'])})" if peak["change_pct"] > 0 else "never rose"
        law, predicted = _fit_text(fit)
        lines.append(f"| {arm} | {fit['last_step']} | {dom['change_pct'].iloc[-1]:+.1f}% | {gen['change_pct'].iloc[-1]:+.1f}% "
                     f"| {rose} | {law} | {predicted} |")
    if budget_pct is not None:
        lines += ["", f"Forgetting budget: general perplexity at most +{budget_pct:g}% against step 0.", "",
                  "| arm | seed | first step over the budget | best step within it | its Δ domain | its Δ general "
                  "| saved model |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in budget_rows(df, budget_pct, summaries):
            saved = (f"step {r['model_step']} (stopped at step {r['stopped_at']})" if r["stopped_at"] is not None
                     else f"step {r['model_step']} (the last)" if r["model_step"] is not None else "—")
            lines.append(f"| {r['arm']} | {r['seed']} | {r['first_over'] if r['first_over'] is not None else 'none'} | "
                         f"{r['best']} | {r['best_domain']:+.1f}% | {r['best_general']:+.1f}% | {saved} |")
    return lines


def best_within_budget(df: pd.DataFrame, budget_pct: float, summaries: dict[tuple[str, int], dict[str, Any]],
                       families: list[tuple[str, str]]) -> list[str]:
    """Each method at its best within the forgetting budget: per family of arms, the setting whose best step
    within the budget (mean over seeds) gains most on the domain (the report's lines)."""
    rows = pd.DataFrame(budget_rows(df, budget_pct, summaries))
    gain = (-rows.groupby("arm", sort=False)["best_domain"].mean()).to_dict()
    general = rows.groupby("arm", sort=False)["best_general"].mean().to_dict()
    lines = [f"**Each method at its best within the forgetting budget** (general perplexity at most +{budget_pct:g}% "
             "on the curve subsample): per method the setting whose best step within the budget gains most on the "
             "domain, chosen on the held-out test documents (optimistic).", "",
             "| method | best setting | its domain gain within the budget | its general change there |",
             "| --- | --- | ---: | ---: |"]
    for family, members in matched_gain.families_of(families).items():
        best = max(members, key=lambda m: gain.get(m, float("-inf")))
        lines.append(f"| {family} | {best} | {gain[best]:+.1f}% | {general[best]:+.1f}% |")
    return lines


def kl_predicts(df: pd.DataFrame) -> list[str]:
    """How well the KL to the base on each set predicts the general change, over every arm, seed and curve point
    after step 0: Spearman's rank correlation and the R² of a straight line, with n, and what they say here."""
    from scipy import stats as st

    if "kl" not in df or df["kl"].isna().all():
        return []
    wide = df[df.step > 0].pivot_table(index=["arm", "seed", "step"], columns="set", values=["kl", "change_pct"])
    wide = wide.dropna()
    n, runs = len(wide), wide.reset_index()[["arm", "seed"]].drop_duplicates().shape[0]
    if n < MIN_RANKED:
        return [f"KL and forgetting: {n} trained curve points, too few to say how well the KL predicts the general "
                f"change (with fewer than {MIN_RANKED}, no Spearman ρ could be told from chance at 5%)."]
    y = wide[("change_pct", "general")].to_numpy()
    lines = [f"Over n = {n} curve points ({runs} runs: every arm and seed, each step after 0), how well the "
             "KL(base ‖ model) per token predicts the general change in perplexity (Shenfeld et al. 2025, \"RL's "
             "Razor\", find the KL on the new task's own distribution predicts forgetting):", "",
             "| predictor | Spearman ρ | R² (straight line) |", "| --- | ---: | ---: |"]
    rho = {}
    for which, name in (("domain", "KL on the held-out domain text"), ("general", "KL on the general text")):
        x = wide[("kl", which)].to_numpy()
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            lines.append(f"| {name} | — | — |")
            continue
        rho[which] = float(st.spearmanr(x, y).statistic)
        lines.append(f"| {name} | {rho[which]:+.2f} | {st.linregress(x, y).rvalue ** 2:.2f} |")
    lines += ["", _kl_verdict(rho) + f" The points of one run are not independent ({runs} runs): read ρ as a "
              "description of this study, not as a test."]
    return lines


def _kl_verdict(rho: dict[str, float]) -> str:
    """What the two correlations say, in words that follow the numbers."""
    d, g = rho.get("domain"), rho.get("general")
    if d is None or g is None:
        return "One of the KLs or the general change did not vary: nothing to compare."
    if min(d, g) <= -0.3:
        return ("More KL went with a *lower* general perplexity here: the KL measures how far the model moved from "
                "the base, not whether that hurt the general text.")

    def how(r: float) -> str:
        return "closely" if r >= 0.7 else ("loosely" if r >= 0.3 else "not at all")

    if how(d) == how(g):
        return f"Both KLs tracked the general change {how(d)} (ρ {d:+.2f} on the domain, {g:+.2f} on the general text)."
    cheap = " — a cheap early warning of forgetting from your own data alone" if d >= 0.7 else ""
    return (f"The domain KL tracked the general change {how(d)} (ρ {d:+.2f}){cheap}; the general KL {how(g)} "
            f"(ρ {g:+.2f}).")


def write(arms: list[dict[str, Any]], root: str | Path, out: Path, budget_pct: float | None,
          whole: bool = False, gains: tuple[float, ...] = (), order: list[str] | None = None,
          reference: str | None = None, families: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The curves' plots, the report's sections and the matched-gain comparison (ftcore.matched_gain) for the
    finished arms; empty when no arm has curves. `whole`: scored on the whole evaluation sets
    (eval.curve_tokens None); `gains`: the user's matched gains; `order`, `reference`, `families`: the
    arms to compare (in the study's order), the arm compared against, each arm's family ((arm, family))."""
    df = load(arms, root)
    if df.empty:
        return {}
    means = seed_means(df)
    summaries = {(a["arm"], a["seed"]): a["summary"] for a in arms}
    order = order or list(dict.fromkeys(df["arm"]))
    families = families or [(a, a) for a in order]
    matched = matched_gain.section(df, gains, order, reference, families)
    if budget_pct is not None and matched_gain.families_of(families):
        matched["lines"] = [*matched.get("lines", []), "", *best_within_budget(df, budget_pct, summaries, families)]
    return {"plots": {"curves": plots.plot_curves(means, out / "curves.png"),
                      "path": plots.plot_path(means, out / "path.png", budget_pct, matched.get("gains", ()))},
            "lines": section(df, means, budget_pct, summaries, whole), "matched": matched, "kl": kl_predicts(df)}
