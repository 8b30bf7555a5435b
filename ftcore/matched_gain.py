"""Forgetting at equal domain gain: the arms compared where they have learned the same amount.

An arm's general change at its end mixes two things: how much it learned and what that cost. LoRA
"forgets less" may only mean it learned less, or trained at another learning rate (Biderman et al.
2024, "LoRA Learns Less and Forgets Less", compare methods on the learning–forgetting plane along
training). From each arm's curve (ftcore.curves: domain and general perplexity on fixed subsamples
at step 0 = the base, and along training) this module reads off the general change at a common
domain gain g:

- the gain of a point is the % fall in domain perplexity against step 0; the general change at g
  is interpolated linearly between the two measured points that bracket g where the arm *first*
  reaches it (a curve need not be monotone); an arm that never reaches g has no value there ("not
  reached") — nothing is extrapolated; a run whose curve has no point between step 0 and its last step
  (eval.every_steps not below its steps) is not read at all, the section saying why, since its value at g
  would be the straight line from the base to the end of training;
- g is by default the largest gain every compared run (arm and seed) reaches, as measured and in at
  least 95% of the bootstrap resamples (at the largest measured one, an arm's curve only just touches
  g and many resamples of it would not reach it), and any gains the user lists (config
  `report.matched_gains`, in %);
- uncertainty: a paired bootstrap over the subsample's units (domain: held-out documents;
  general: the evaluation's windows of chunk_len tokens, since the subsample holds few whole
  articles) — every resample recomputes both changes at every point of every run and finds g
  again — and the standard deviation over seeds; differences between arms at g are paired the
  same way. The noise rule is the report's (ftcore.stats.within_noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ftcore import stats

# A bootstrap value is reported only when at least this share of resamples reaches g; the default g is the
# largest gain every arm reaches in this share of them.
MIN_REACHED = 0.95
# Trained points (step > 0) each run's curve needs: with only its last one, "the general change at gain g" would be
# read off the straight line from the base to the end of training (eval.every_steps not below the arm's steps), a
# number that looks measured and is not.
MIN_TRAINED_POINTS = 2


def at_gain(gain: np.ndarray, value: np.ndarray, g: float) -> np.ndarray:
    """`value` where the path first reaches domain gain `g`, linearly interpolated between the two points that
    bracket it; NaN where it never does.

    gain, value: [..., points] along training (point 0 = step 0, gain 0). Returns [...].
    """
    gain, value = np.asarray(gain, dtype=float), np.asarray(value, dtype=float)
    reached = gain >= g - 1e-9  # a point measured at g itself reaches it, whatever the rounding
    first = np.argmax(reached, axis=-1)
    ok = reached.any(axis=-1) & (first > 0)
    before = np.maximum(first - 1, 0)
    take = lambda a, i: np.take_along_axis(a, i[..., None], axis=-1)[..., 0]  # noqa: E731
    g0, g1 = take(gain, before), take(gain, first)
    v0, v1 = take(value, before), take(value, first)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(g1 > g0, (g - g0) / (g1 - g0), 1.0)
    return np.where(ok, v0 + t * (v1 - v0), np.nan)


def unit_matrix(run: pd.DataFrame, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(nll [points x units], tokens [units]) of one run's curve on one set, points in step order."""
    rows = run[run.set == which].sort_values("step")
    nll = np.stack([np.asarray(u, dtype=float) for u in rows["unit_nll"]])
    tokens = np.asarray(rows["unit_tokens"].iloc[0], dtype=float)
    return nll, tokens


def changes(nll: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """% change of perplexity against point 0 under each resample: [resamples x points]."""
    mean = (weights @ nll.T) / (weights @ tokens)[:, None]
    return 100 * np.expm1(mean - mean[:, [0]])


def runs_of(curves: pd.DataFrame) -> dict[tuple[str, int], pd.DataFrame]:
    """Each arm's and seed's curve, in the curves' order (ftcore.forgetting.load)."""
    return {key: g for key, g in curves.groupby(["arm", "seed"], sort=False)}


def too_few_points(curves: pd.DataFrame) -> dict[str, int]:
    """The runs whose curve has fewer than MIN_TRAINED_POINTS points after step 0: {"arm" (or "arm, seed s"
    with several seeds): its last step}; empty when every run has enough."""
    runs = runs_of(curves)
    seeds = len({seed for _, seed in runs}) > 1
    return {f"{arm}, seed {seed}" if seeds else str(arm): int(run.step.max()) for (arm, seed), run in runs.items()
            if run.loc[run.step > 0, "step"].nunique() < MIN_TRAINED_POINTS}


def resampled_paths(curves: pd.DataFrame, resamples: int = stats.RESAMPLES) -> dict[tuple[str, int], dict]:
    """Per run (arm, seed): its path under each bootstrap resample of the documents (`gain`, `general`:
    [resamples x points], %) and as measured (`gain0`, `general0`: [points]), with `step` and `tokens`.

    Every run is resampled alike (the same documents). Raises ValueError when runs were not scored on the same
    documents.
    """
    runs = runs_of(curves)
    if not runs:
        return {}
    first = next(iter(runs.values()))
    sizes = {w: len(unit_matrix(first, w)[1]) for w in ("domain", "general")}
    weights = {w: stats.resample_weights(n, resamples, seed=i) for i, (w, n) in enumerate(sizes.items())}
    ones = {w: np.ones((1, n)) for w, n in sizes.items()}
    paths = {}
    for key, run in runs.items():
        (dn, dt), (gn, gt) = unit_matrix(run, "domain"), unit_matrix(run, "general")
        if len(dt) != sizes["domain"] or len(gt) != sizes["general"]:
            raise ValueError(f"the curve of {key} was scored on other units than the others: not paired")
        steps = run[run.set == "domain"].sort_values("step")
        paths[key] = {"gain": -changes(dn, dt, weights["domain"]), "general": changes(gn, gt, weights["general"]),
                      "gain0": -changes(dn, dt, ones["domain"])[0], "general0": changes(gn, gt, ones["general"])[0],
                      "step": steps["step"].to_numpy(float), "tokens": steps["tokens_seen"].to_numpy(float)}
    return paths


def common_gain(paths: dict[tuple[str, int], dict], groups: Sequence[Sequence[str]]) -> float:
    """The largest domain gain (%) that every group reaches with one of its arms (every seed of it), as measured
    and in at least MIN_REACHED of the resamples — so the comparison there has an interval — floored to 0.1.
    A group is an arm alone, or the settings of a swept arm entry."""
    def reach(arm: str, measured: bool) -> np.ndarray:
        runs = [p for (a, _), p in paths.items() if a == arm]
        return np.min([p["gain0"].max() if measured else p["gain"].max(axis=1) for p in runs], axis=0)

    def level(measured: bool) -> np.ndarray:
        return np.min([np.max([reach(a, measured) for a in group], axis=0) for group in groups], axis=0)

    g = min(float(level(True)), float(np.quantile(level(False), 1 - MIN_REACHED)))
    return math.floor(g * 10 + 1e-6) / 10  # (a measured 9.0 is 8.999999...)


def analyse(curves: pd.DataFrame, gains: Sequence[float], order: Sequence[str], reference: str | None,
            resamples: int = stats.RESAMPLES, paths: dict | None = None) -> pd.DataFrame:
    """Per gain g and arm: the general change at g (mean over seeds) with its seed spread, a bootstrap interval
    and the share of resamples that reach g; the step and training tokens where g is reached; the
    difference from `reference` at g with its interval and the noise mark.

    `curves` holds every run's points with per-document sums (columns arm, seed, step, tokens_seen, set,
    change_pct, unit_nll, unit_tokens); `paths` its resampled_paths, when already computed. Raises ValueError
    when runs were not scored on the same documents.
    """
    runs = runs_of(curves)
    paths = paths if paths is not None else resampled_paths(curves, resamples)
    if not paths:
        return pd.DataFrame()
    rows = []
    for g in gains:
        per_arm = {}
        for arm in order:
            keys = [k for k in runs if k[0] == arm]
            if not keys:
                continue
            point = np.array([at_gain(paths[k]["gain0"], paths[k]["general0"], g) for k in keys])
            boot = np.stack([at_gain(paths[k]["gain"], paths[k]["general"], g) for k in keys]).mean(axis=0)
            step = np.array([at_gain(paths[k]["gain0"], paths[k]["step"], g) for k in keys])
            tokens = np.array([at_gain(paths[k]["gain0"], paths[k]["tokens"], g) for k in keys])
            per_arm[arm] = boot
            reached = bool(np.isfinite(point).all())
            share = float(np.isfinite(boot).mean())
            row = {"gain_pct": g, "arm": arm, "seeds": len(keys), "reached": reached, "reached_share": share,
                   "general_change_pct": float(point.mean()) if reached else np.nan,
                   "general_change_std": stats.seed_std(point) if reached else np.nan,
                   "step": float(step.mean()) if reached else np.nan,
                   "tokens_seen": float(tokens.mean()) if reached else np.nan}
            row["ci_low"], row["ci_high"] = _interval(boot) if reached else (np.nan, np.nan)
            rows.append(row)
        by_arm = {r["arm"]: r for r in rows if r["gain_pct"] == g}
        ref = by_arm.get(reference)
        for arm, row in by_arm.items():
            if ref is None or arm == reference or not (row["reached"] and ref["reached"]):
                continue
            diff = row["general_change_pct"] - ref["general_change_pct"]
            spread = math.sqrt(np.nan_to_num(row["general_change_std"]) ** 2 + np.nan_to_num(ref["general_change_std"]) ** 2)
            ci = _interval(per_arm[arm] - per_arm[reference])
            # Too few resamples reach g: no interval, and the noise rule says nothing (NaN, not "within noise").
            noise = stats.within_noise(diff, ci, spread if spread > 0 else float("nan")) if np.isfinite(ci[0]) else np.nan
            row.update(reference=reference, diff_pp=diff, diff_ci_low=ci[0], diff_ci_high=ci[1], within_noise=noise)
    return pd.DataFrame(rows)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    """Percentile interval over the resamples that reach g; NaN when fewer than MIN_REACHED of them do."""
    finite = samples[np.isfinite(samples)]
    if len(finite) < MIN_REACHED * len(samples):
        return float("nan"), float("nan")
    return stats.interval(finite)


def best_of_each(table: pd.DataFrame, families: dict[str, list[str]], g: float) -> dict[str, str]:
    """Per family of arms (a method swept over settings), the member with the least general change at gain g
    among those whose every seed reaches it."""
    at = table[(table.gain_pct == g) & table.reached].set_index("arm")["general_change_pct"]
    best = {}
    for family, members in families.items():
        reached = at[at.index.isin(members)]
        if len(reached):
            best[family] = str(reached.idxmin())
    return best


def families_of(arms: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """(arm, family) pairs as {family: [arms]}, only the families with several members (a swept setting)."""
    out: dict[str, list[str]] = {}
    for arm, family in arms:
        out.setdefault(family, []).append(arm)
    return {f: m for f, m in out.items() if len(m) > 1}


def _num(x: float, sign: bool = True) -> str:
    """A change in % or points: one decimal, two where one would print 0.0 for a value that is not 0."""
    digits = 2 if abs(x) < 0.095 and x != 0 else 1
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _cell(r: pd.Series) -> str:
    if not r["reached"]:
        return "not reached"
    text = f"{_num(r['general_change_pct'])}%"
    if r["seeds"] > 1 and np.isfinite(r["general_change_std"]):
        text += f" ± {_num(r['general_change_std'], sign=False)}"
    if np.isfinite(r["ci_low"]):
        text += f" [{_num(r['ci_low'])}, {_num(r['ci_high'])}]"
    else:
        text += f" [no interval: g reached in only {100 * r['reached_share']:.0f}% of resamples]"
    return text


def _diff(r: pd.Series, unit: str = "") -> str:
    if pd.isna(r.get("diff_pp")):
        return "—"
    if not np.isfinite(r["diff_ci_low"]):  # no interval: nothing is said about noise either way
        return f"{_num(r['diff_pp'])}{unit} (no interval)"
    return (f"{'≈ ' if r['within_noise'] else ''}{_num(r['diff_pp'])}{unit} "
            f"[{_num(r['diff_ci_low'])}, {_num(r['diff_ci_high'])}]")


def headline(table: pd.DataFrame, g: float, what: str, lead: str = "At") -> str:
    """One sentence: every arm's general change at gain g, and its difference from the reference arm."""
    rows = table[table.gain_pct == g]
    parts = [f"{r['arm']} {_cell(r)}" for _, r in rows.iterrows()]
    diffs = [f"{r['arm']} vs {r['reference']} {_diff(r, ' points')}" for _, r in rows.iterrows()
             if not pd.isna(r.get("diff_pp"))]
    return (f"**{lead} a domain gain of {g:.1f}%** ({what}), the general perplexity change: " + ", ".join(parts)
            + ("; " + ", ".join(diffs) if diffs else "") + ".")


def _tokens(n: float) -> str:
    return f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def table_lines(table: pd.DataFrame, reference: str | None) -> list[str]:
    """The matched-gain table: per gain and arm, where the gain is reached and the general change there."""
    lines = [f"| domain gain | arm | step (training tokens) where reached | Δ general at that gain ± std [95% CI] | "
             f"vs {reference or 'reference'}, points [95% CI] |", "| ---: | --- | ---: | ---: | ---: |"]
    for _, r in table.iterrows():
        where = f"{r['step']:.1f} ({_tokens(r['tokens_seen'])})" if r["reached"] else "—"
        lines.append(f"| {r['gain_pct']:.1f}% | {r['arm']} | {where} | {_cell(r)} | {_diff(r)} |")
    return lines


def section(curves: pd.DataFrame, gains: Sequence[float], order: Sequence[str], reference: str | None,
            arms: Sequence[tuple[str, str]]) -> dict[str, object]:
    """The report's comparison at equal domain gain: {"headline": the report's first sentence, "lines": its
    section, "table": per gain and arm, "gain": the default g, "gains": every gain compared (for path.png)},
    plus "best", "best_gain", "best_table" when some arm entry was swept over settings (the headline is then
    each method at its best); empty without curves.

    `arms` are (arm, family) pairs in the study's order; `gains` the user's (report.matched_gains).
    """
    if curves.empty or "unit_nll" not in curves:
        return {}
    if thin := too_few_points(curves):
        runs = ", ".join(f"{run} (trained {steps} steps)" for run, steps in thin.items())
        curve = "the curves of {} hold" if len(thin) > 1 else "the curve of {} holds"
        last = min(thin.values())
        # An arm of one step (or none recorded) has no step in between to measure: only more steps can help.
        remedy = (f"Set eval.every_steps below {last} (e.g. --set eval.every_steps={max(1, last // 4)}), or to null for "
                  "about 10 points per arm." if last >= 2 else "Train more than one step (train.max_steps).")
        note = (f"Not compared at equal domain gain: {curve.format(runs)} no point between step 0 and the last step, so "
                "a general change at a common gain would be read off a straight line from the base to the end of "
                f"training, not measured; no arm is compared. {remedy}")
        return {"headline": note, "lines": [note], "gain": math.nan, "gains": []}
    paths = resampled_paths(curves)
    g = common_gain(paths, [[a] for a in order])
    first = next(iter(runs_of(curves).values()))
    units = {w: len(unit_matrix(first, w)[1]) for w in ("domain", "general")}
    families = families_of(arms)
    if not g > 0:
        note = ("No domain gain is reached by every arm in 95% of the resamples of its curve (some arm's curve barely "
                "or never falls below the base's domain perplexity), so the arms cannot all be compared at equal gain.")
        # A sweep's failed setting (e.g. a learning rate that diverged) still leaves each method at its best.
        best = _at_their_best(curves, paths, families, arms, order, reference) if families else {}
        if not best:
            return {"headline": note, "lines": [note], "gain": g, "gains": []}
        return {**best, "table": best["best_table"], "headline": best["best_headline"], "gain": best["best_gain"],
                "gains": [best["best_gain"]], "lines": [*best["best_lines"], "", note]}
    table = analyse(curves, sorted({g, *gains}), order, reference, paths=paths)
    what = "the largest every arm reaches on its curve, and in 95% of its resamples"
    every_arm = [headline(table, g, what, "Every setting, at" if families else "At"), "", *table_lines(table, reference)]
    out: dict[str, object] = {"table": table, "gain": g, "gains": sorted({g, *gains}), "headline": every_arm[0]}
    lines = [*every_arm]
    if families and (best := _at_their_best(curves, paths, families, arms, order, reference)):
        out |= best
        out["headline"] = best["best_headline"]
        out["gains"] = sorted({*out["gains"], best["best_gain"]})
        lines = [*best["best_lines"], "", *every_arm]
    few = [f"{n} {'held-out' if w == 'domain' else 'general'} documents" for w, n in units.items() if n < 5]
    lines += ["", "Each arm's general change where it has learned the same amount: read off its curve where the domain "
              "gain first reaches the level, interpolated between the two points that bracket it (never "
              f"extrapolated). Curve subsample: {units['domain']} held-out and {units['general']} general documents; "
              "[..] is the 95% paired bootstrap interval over those documents (each resample recomputes both changes "
              "along every curve and finds the level again; an interval needs 95% of the resamples to reach it), "
              "± the standard deviation over seeds; ≈ marks a difference within noise by the table's rule."]
    if few:
        lines += ["", f"⚠ Only {' and '.join(few)} in the curve subsample: the interval is rough; raise "
                  "eval.curve_tokens (or max_general_tokens) to cover more documents."]
    out["lines"] = lines
    return out


def _at_their_best(curves: pd.DataFrame, paths: dict, families: dict[str, list[str]], arms: Sequence[tuple[str, str]],
                   order: Sequence[str], reference: str | None) -> dict[str, object]:
    """Each swept arm entry (family) at its best setting, at the gain every family reaches with one setting."""
    singles = [a for a, f in arms if f not in families]
    g_best = common_gain(paths, [*families.values(), *([a] for a in singles)])
    if not g_best > 0:
        return {}
    at = analyse(curves, [g_best], order, reference, paths=paths)
    best = best_of_each(at, families, g_best)
    reaching = at[at.reached].arm.tolist()
    only = [f for f, members in families.items() if f in best and sum(m in reaching for m in members) == 1]
    chosen = [best.get(f, a) for a, f in _unique_families(arms)]
    ref = best.get(dict(arms).get(reference), reference)  # the reference entry at its best
    table = analyse(curves, [g_best], chosen, ref, paths=paths)
    what = "each swept entry at its best setting, at the largest gain every entry reaches with one of them"
    lines = [headline(table, g_best, what), "",
             "Per arm entry with several settings, the setting with the least general change at this gain — "
             + ", ".join(f"{f}: {best[f]}" + (" (its only setting that reaches it)" if f in only else "")
                         for f in best)
             + ". Chosen on the curve subsample of the held-out test documents, the same documents the comparison "
             "is measured on: the chosen settings' numbers are optimistic (no separate validation split).", "",
             *table_lines(table, ref)]
    return {"best": best, "best_gain": g_best, "best_table": table, "best_headline": lines[0], "best_lines": lines}


def _unique_families(arms: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for arm, family in arms:
        if family not in seen:
            seen.add(family)
            out.append((arm, family))
    return out
