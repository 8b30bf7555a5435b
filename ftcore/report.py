"""The study's results: tables (parquet + markdown), uncertainty, the frontier, where forgetting happens.

Inputs are the evaluations (one per model and set: base, and every arm at every seed), each with
its per-document scores. Outputs, all under the report directory:
- table.parquet / table.md: one row per arm (mean over seeds), % change against base with the seed
  spread and a bootstrap interval over documents, a mark where a change is within noise, and
  whether the arm is on the learning-forgetting Pareto front;
- runs.parquet: one row per arm and seed;
- general_docs.parquet: per arm, seed and general document, the change in NLL per token;
- report.md and the plots: perplexity, frontier (domain gain vs general forgetting), loss.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ftcore import plots, stats, task_forgetting
from ftcore.config import SETS
from ftcore.io import write_parquet, write_text

EXPECTED = {
    "domain": "domain perplexity falls 20-40% under fine-tuning",
    "general": "general perplexity rises under full FT, rises less with replay; LoRA keeps most of the domain gain with less forgetting",
}
NOISE_RULE = ("≈ marks a change within noise: its 95% bootstrap interval over documents contains 0, or it is "
              "smaller than twice the standard deviation over seeds (a rule of thumb, not a significance test)")
TOP_DOCS = 5
# The base model in 4-bit NF4 (ftcore.results.QUANTIZED_BASE): a row of its own when a study has QLoRA arms.
QUANTIZED_BASE = "base-nf4"
# A share of cut training examples above this is called out in the report (and logged when tokenizing).
TRUNCATION_WARNING = 0.05


@dataclass(frozen=True)
class Analysis:
    arms: pd.DataFrame
    runs: pd.DataFrame
    comparisons: pd.DataFrame
    general_docs: pd.DataFrame


def _docs(e: dict[str, Any]) -> pd.DataFrame:
    return e["docs"] if isinstance(e["docs"], pd.DataFrame) else pd.read_parquet(e["docs"])


def _arm_order(evals: list[dict[str, Any]], order: list[str] | None) -> list[str]:
    names = list(dict.fromkeys(e["arm"] for e in evals if e["arm"] != "base"))
    if order:
        names = [a for a in order if a in names] + [a for a in names if a not in order]
    return names


def run_table(evals: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per model run (base, every arm at every seed) with both sets' numbers and % change."""
    if not any(e["arm"] == "base" for e in evals):
        raise ValueError("the table needs the base model's evaluation")
    base = {e["set"]: e for e in evals if e["arm"] == "base"}
    rows: dict[tuple, dict[str, Any]] = {}
    for e in evals:
        key = (e["arm"], e.get("seed"))
        row = rows.setdefault(key, {"arm": e["arm"], "seed": e.get("seed")})
        row[f"{e['set']}_ppl"] = e["ppl"]
        row[f"{e['set']}_change_pct"] = 100 * (e["ppl"] / base[e["set"]]["ppl"] - 1)
        row[f"{e['set']}_bpb"] = e["bpb"]
        row[f"{e['set']}_tokens"] = e["tokens"]
        if e.get("kl") is not None:
            row[f"{e['set']}_kl"] = e["kl"]
    df = pd.DataFrame(list(rows.values()))
    df["seed"] = df["seed"].astype("Int64")
    return df


def analyse(evals: list[dict[str, Any]], order: list[str] | None = None, titles: pd.DataFrame | None = None,
            resamples: int = stats.RESAMPLES, reference: str | None = None) -> Analysis:
    """Every number of the report from the evaluations and their per-document scores.

    `reference` is the arm every other arm's change is compared with (default: full if present,
    else the first arm).
    """
    runs = run_table(evals)
    arms = _arm_order(evals, order)
    by = {(e["arm"], e.get("seed"), e["set"]): e for e in evals}
    seeds = {a: sorted(int(s) for s in runs.loc[runs.arm == a, "seed"].dropna()) for a in arms}
    table = [{"arm": "base", "seeds": 0} | {f"{s}_{k}": runs.loc[runs.arm == "base", f"{s}_{k}"].item()
                                           for s in SETS for k in ("ppl", "bpb", "tokens")}]
    table += [{"arm": a, "seeds": len(seeds[a])} for a in arms]
    comparisons = []
    if reference not in arms:
        reference = "full" if "full" in arms else (arms[0] if arms else None)
    mean_change_samples: dict[tuple[str, str], np.ndarray] = {}
    for s in SETS:
        models = [by[("base", None, s)]] + [by[(a, seed, s)] for a in arms for seed in seeds[a]]
        _, nll, tokens = stats.doc_matrix([_docs(e) for e in models])
        ppl = stats.resampled_ppl(nll, tokens, stats.resample_weights(len(tokens), resamples))
        table[0][f"{s}_ppl_ci_low"], table[0][f"{s}_ppl_ci_high"] = stats.interval(ppl[:, 0])
        table[0][f"{s}_change_pct"] = 0.0
        col = 1
        for i, a in enumerate(arms, start=1):
            cols = list(range(col, col + len(seeds[a])))
            col += len(seeds[a])
            per_seed = runs.set_index(["arm", "seed"]).loc[[(a, sd) for sd in seeds[a]]]
            change = per_seed[f"{s}_change_pct"].to_numpy()
            samples = 100 * (ppl[:, cols] / ppl[:, [0]] - 1).mean(axis=1)
            mean_change_samples[(a, s)] = samples
            row = table[i]
            row[f"{s}_ppl"] = float(per_seed[f"{s}_ppl"].mean())
            row[f"{s}_ppl_std"] = stats.seed_std(per_seed[f"{s}_ppl"].to_numpy())
            row[f"{s}_ppl_ci_low"], row[f"{s}_ppl_ci_high"] = stats.interval(ppl[:, cols].mean(axis=1))
            row[f"{s}_change_pct"] = float(change.mean())
            row[f"{s}_change_std"] = stats.seed_std(change)
            row[f"{s}_change_ci_low"], row[f"{s}_change_ci_high"] = stats.interval(samples)
            row[f"{s}_within_noise"] = stats.within_noise(
                row[f"{s}_change_pct"], (row[f"{s}_change_ci_low"], row[f"{s}_change_ci_high"]), row[f"{s}_change_std"])
            row[f"{s}_bpb"] = float(per_seed[f"{s}_bpb"].mean())
            row[f"{s}_tokens"] = int(per_seed[f"{s}_tokens"].iloc[0])
        _kl_to_base(s, models, table, arms, seeds, runs, resamples)
    table_df = pd.DataFrame(table)
    if arms:
        # The front is over the trained arms: the base and the 4-bit base (a reference point) are not on it.
        trained = ~table_df.arm.isin(["base", QUANTIZED_BASE])
        front = stats.pareto_front(-table_df.loc[trained, "domain_change_pct"], table_df.loc[trained, "general_change_pct"])
        table_df["pareto"] = False
        table_df.loc[trained, "pareto"] = front
        for a in arms:
            if a == reference:
                continue
            for s in SETS:
                diff_samples = mean_change_samples[(a, s)] - mean_change_samples[(reference, s)]
                ra, rr = table_df.set_index("arm").loc[a], table_df.set_index("arm").loc[reference]
                diff = ra[f"{s}_change_pct"] - rr[f"{s}_change_pct"]
                spread = math.sqrt(ra[f"{s}_change_std"] ** 2 + rr[f"{s}_change_std"] ** 2)
                ci = stats.interval(diff_samples)
                comparisons.append({"arm": a, "reference": reference, "set": s, "diff_pp": diff, "ci_low": ci[0],
                                    "ci_high": ci[1], "seed_std": spread, "within_noise": stats.within_noise(diff, ci, spread)})
    return Analysis(arms=table_df, runs=runs, comparisons=pd.DataFrame(comparisons),
                    general_docs=general_doc_changes(evals, titles))


def _kl_to_base(s: str, models: list[dict[str, Any]], table: list[dict[str, Any]], arms: list[str],
                seeds: dict[str, list[int]], runs: pd.DataFrame, resamples: int) -> None:
    """Each arm's mean KL(base ‖ arm) per token of set `s` (nats): mean over seeds, their spread, and a
    bootstrap interval over documents (the same resamples as the perplexities), into `table`."""
    docs = [_docs(e) for e in models[1:]]
    if not docs or not all("kl_sum" in d for d in docs):
        return
    tokens = np.asarray(docs[0]["n_tokens"], dtype=np.float64)
    kl = np.stack([np.asarray(d["kl_sum"], dtype=np.float64) for d in docs])
    weights = stats.resample_weights(len(tokens), resamples)
    per_model = (weights @ kl.T) / (weights @ tokens)[:, None]  # [resamples x arm runs]
    table[0].update({f"{s}_kl": 0.0, f"{s}_kl_ci_low": 0.0, f"{s}_kl_ci_high": 0.0})  # the base from itself
    col = 0
    for i, a in enumerate(arms, start=1):
        cols = list(range(col, col + len(seeds[a])))
        col += len(seeds[a])
        values = runs.set_index(["arm", "seed"]).loc[[(a, sd) for sd in seeds[a]], f"{s}_kl"].to_numpy()
        table[i][f"{s}_kl"] = float(values.mean())
        table[i][f"{s}_kl_std"] = stats.seed_std(values)
        table[i][f"{s}_kl_ci_low"], table[i][f"{s}_kl_ci_high"] = stats.interval(per_model[:, cols].mean(axis=1))


def general_doc_changes(evals: list[dict[str, Any]], titles: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per arm, seed and general document: NLL per token of base and arm, and the change (where forgetting is)."""
    base = _docs(next(e for e in evals if e["arm"] == "base" and e["set"] == "general"))
    base = base.assign(base_nll=base["nll_sum"] / base["n_tokens"])[["doc", "n_tokens", "base_nll"]]
    parts = []
    for e in evals:
        if e["arm"] == "base" or e["set"] != "general":
            continue
        d = _docs(e)
        part = base.merge(d.assign(nll=d["nll_sum"] / d["n_tokens"])[["doc", "nll"]], on="doc", validate="1:1")
        parts.append(part.assign(arm=e["arm"], seed=e.get("seed")))
    if not parts:
        return pd.DataFrame(columns=["arm", "seed", "doc", "title", "n_tokens", "base_nll", "nll", "delta_nll", "ppl_change_pct"])
    df = pd.concat(parts, ignore_index=True)
    df["delta_nll"] = df["nll"] - df["base_nll"]
    df["ppl_change_pct"] = 100 * np.expm1(df["delta_nll"])
    df["title"] = df["doc"].map(titles.set_index("doc")["title"]) if titles is not None else df["doc"].astype(str)
    df["seed"] = df["seed"].astype("Int64")
    return df[["arm", "seed", "doc", "title", "n_tokens", "base_nll", "nll", "delta_nll", "ppl_change_pct"]]


# --- words -------------------------------------------------------------------------------------

def _pct(row: pd.Series, s: str) -> str:
    text = f"{row[f'{s}_change_pct']:+.1f}%"
    if row["seeds"] > 1:
        text += f" ± {row[f'{s}_change_std']:.1f}"
    text += f" [{row[f'{s}_change_ci_low']:+.1f}, {row[f'{s}_change_ci_high']:+.1f}]"
    return ("≈ " if row[f"{s}_within_noise"] else "") + text


TABLE_COLUMNS = ("arm", "seeds", "domain ppl", "Δ domain ± std [95% CI]", "general ppl", "Δ general ± std [95% CI]",
                 "KL(base‖arm) domain, nats/token [95% CI]", "KL(base‖arm) general, nats/token [95% CI]",
                 "Δ tasks, points [95% CI]", "domain bits/byte", "general bits/byte", "front")
KL_COLUMNS = {"domain": TABLE_COLUMNS[6], "general": TABLE_COLUMNS[7]}
KL_COLUMN = KL_COLUMNS["general"]
TASKS_COLUMN = TABLE_COLUMNS[8]


def _kl(r: pd.Series, s: str) -> str:
    value = r.get(f"{s}_kl")
    if value is None or pd.isna(value):
        return "—"
    spread = f" ± {r[f'{s}_kl_std']:.2g}" if r["seeds"] > 1 else ""
    return f"{value:.3g}{spread} [{r[f'{s}_kl_ci_low']:.3g}, {r[f'{s}_kl_ci_high']:.3g}]"


def columns(table: pd.DataFrame) -> tuple[str, ...]:
    """The table's columns: a KL column only when the arms' KL on that set was measured, the task column only
    when benchmark tasks were (ftcore.task_forgetting)."""
    shown = {c for s, c in KL_COLUMNS.items() if f"{s}_kl" in table and table[f"{s}_kl"].notna().any()}
    if "task_forgetting_pts" in table and table["task_forgetting_pts"].notna().any():
        shown.add(TASKS_COLUMN)
    return tuple(c for c in TABLE_COLUMNS if c not in (*KL_COLUMNS.values(), TASKS_COLUMN) or c in shown)


def table_rows(table: pd.DataFrame) -> list[dict[str, str]]:
    """The table as readable rows (the cells of table.md), one dict per arm, keyed by `columns(table)`."""
    rows = []
    for _, r in table.iterrows():
        base = r["arm"] == "base"
        cells = [r["arm"], "—" if base else str(int(r["seeds"]))]
        for s in SETS:  # the base's interval beside its perplexity: it has no change of its own
            cells.append(f"{r[f'{s}_ppl']:.2f} [{r[f'{s}_ppl_ci_low']:.2f}, {r[f'{s}_ppl_ci_high']:.2f}]" if base
                         else f"{r[f'{s}_ppl']:.2f}")
            cells.append("—" if base else _pct(r, s))
        cells += ["0 (itself)" if base else _kl(r, s) for s in SETS]
        cells += ["0 (itself)" if base else task_forgetting.forgetting_cell(r)]
        cells += [f"{r['domain_bpb']:.3f}", f"{r['general_bpb']:.3f}", "" if base else ("●" if r.get("pareto") else "")]
        row = dict(zip(TABLE_COLUMNS, cells))
        rows.append({c: row[c] for c in columns(table)})
    return rows


# The UI's table artifact is read in a browser window: short headers, the bits per byte left to table.md.
COMPACT = {"Δ domain ± std [95% CI]": "Δ domain", "Δ general ± std [95% CI]": "Δ general",
           KL_COLUMNS["domain"]: "KL domain", KL_COLUMNS["general"]: "KL general", TASKS_COLUMN: "Δ tasks (pts)"}


def compact_rows(table: pd.DataFrame) -> list[dict[str, str]]:
    """The arms' rows of table_rows as the UI's table artifact shows them: what each arm changed, with short
    headers (COMPACT). What fits its page at 1400 px (about 830 px beside the page's sidebar): no base row (its
    perplexities are in the artifact's description, base_perplexity_line), no perplexity, bits-per-byte or KL
    interval cells (table.md and the report have them), seeds only when an arm ran several."""
    several = bool((table.loc[table.arm != "base", "seeds"] > 1).any())
    kept = []
    for (_, r), row in zip(table.iterrows(), table_rows(table)):
        if r["arm"] == "base":
            continue
        cells = {}
        for name, value in row.items():
            if name.endswith(("bits/byte", " ppl")) or (name == "seeds" and not several):
                continue
            cells[COMPACT.get(name, name)] = value.split(" [")[0] if name in KL_COLUMNS.values() else value
        kept.append(cells)
    return kept


def base_perplexity_line(table: pd.DataFrame) -> str:
    """'Base perplexity: domain 19.90 [18.76, 21.07], general 30.34 [25.60, 38.39]' (95% intervals over documents)."""
    r = table[table.arm == "base"].iloc[0]
    return "Base perplexity: " + ", ".join(
        f"{s} {r[f'{s}_ppl']:.2f} [{r[f'{s}_ppl_ci_low']:.2f}, {r[f'{s}_ppl_ci_high']:.2f}]" for s in SETS)


def markdown_table(table: pd.DataFrame) -> str:
    """Arms as rows: perplexity and change against base per set, with seeds, spread and intervals."""
    cols = columns(table)
    align = {"arm": "---", "front": ":---:"}
    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join(align.get(c, "---:") for c in cols) + " |"]
    out += ["| " + " | ".join(row.values()) + " |" for row in table_rows(table)]
    return "\n".join(out)


def embed_images(markdown: str, directory: Path) -> str:
    """The markdown with each `![alt](file.png)` of `directory` inlined as a data URI (for viewers that
    cannot read the file, such as the Prefect UI)."""
    import base64
    import re

    def inline(match: re.Match) -> str:
        path = Path(directory) / match.group(2)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([^)/:]+\.png)\)", inline, markdown)


def runs_markdown(runs: pd.DataFrame) -> str:
    out = ["| arm | seed | domain ppl | Δ domain | general ppl | Δ general |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for _, r in runs[runs.arm != "base"].iterrows():
        out.append(f"| {r['arm']} | {r['seed']} | {r['domain_ppl']:.2f} | {r['domain_change_pct']:+.1f}% | "
                   f"{r['general_ppl']:.2f} | {r['general_change_pct']:+.1f}% |")
    return "\n".join(out)


def _domain_verdict(d: float) -> str:
    if d >= 0:
        return "rose: no domain gain, against the expected fall of 20-40%"
    if d > -20:
        return "a smaller fall than the expected -20…-40%"
    return "within the expected -20…-40%" if d >= -40 else "a larger fall than the expected -20…-40%"


def expectation_checks(a: Analysis, methods: dict[str, str] | None = None) -> list[str]:
    """Each seed expectation, stated against the measured numbers (true or not), with noise marks.

    Every verdict is derived from the numbers printed beside it: a change within noise is never
    called a rise, a fall or a difference.
    """
    t = a.arms.set_index("arm")
    methods = methods or {}
    arms = [x for x in t.index if x not in ("base", QUANTIZED_BASE)]  # the trained arms
    lines = []
    for arm in arms:
        d = t.loc[arm, "domain_change_pct"]
        if t.loc[arm, "domain_within_noise"]:
            lines.append(f"{arm}: domain perplexity {d:+.1f}% — within noise: no measurable domain gain")
        else:
            lines.append(f"{arm}: domain perplexity {d:+.1f}% ({_domain_verdict(d)})")
    ref = a.comparisons["reference"].iloc[0] if len(a.comparisons) else (arms[0] if arms else None)
    if ref is None:
        return lines
    g = t.loc[ref, "general_change_pct"]
    if t.loc[ref, "general_within_noise"]:
        lines.append(f"{ref}: general perplexity {g:+.1f}% — within noise: no measurable forgetting")
    elif g > 0:
        expected = ", as expected of full fine-tuning" if methods.get(ref, "full") == "full" else ""
        lines.append(f"{ref}: general perplexity {g:+.1f}% (rose: forgetting{expected})")
    else:
        lines.append(f"{ref}: general perplexity {g:+.1f}% (fell: no forgetting measured)")
    cmp = a.comparisons.set_index(["arm", "set"]) if len(a.comparisons) else None
    for arm in arms:
        if arm == ref or cmp is None:
            continue
        c = cmp.loc[(arm, "general")]
        ga = t.loc[arm, "general_change_pct"]
        interval = f"difference {c['diff_pp']:+.1f} pp [{c['ci_low']:+.1f}, {c['ci_high']:+.1f}]"
        if c["within_noise"] or round(c["diff_pp"], 1) == 0:  # the words never outrun the printed digits
            verdict = f"no measurable difference from {ref}: {interval}, within noise"
        elif ga < g:
            verdict = f"lower than {ref}'s: {interval}, outside noise"
        else:
            verdict = f"higher than {ref}'s: {interval}, outside noise"
        lines.append(f"{arm}: general {ga:+.1f}% vs {ref} {g:+.1f}% ({verdict})")
    for arm in arms:  # a QLoRA arm's whole cost, and the part the 4-bit base alone accounts for
        if methods.get(arm) == "qlora" and QUANTIZED_BASE in t.index:
            q = t.loc[QUANTIZED_BASE]
            lines.append(f"{arm}: general {t.loc[arm, 'general_change_pct']:+.1f}% and domain "
                         f"{t.loc[arm, 'domain_change_pct']:+.1f}% against the base; the base in 4-bit NF4 alone: general "
                         f"{q['general_change_pct']:+.1f}%{' (within noise)' if q['general_within_noise'] else ''}, domain "
                         f"{q['domain_change_pct']:+.1f}%{' (within noise)' if q['domain_within_noise'] else ''}")
    ref_gain = t.loc[ref, "domain_change_pct"]
    for arm in arms:
        if methods.get(arm) != "lora" or methods.get(ref) == "lora" or ref_gain >= 0 or t.loc[ref, "domain_within_noise"]:
            continue
        d = t.loc[arm, "domain_change_pct"]
        if d >= 0 or t.loc[arm, "domain_within_noise"]:
            lines.append(f"{arm}: no measurable domain gain, where {ref} gained {-ref_gain:.1f}%")
            continue
        kept = d / ref_gain
        how = "more than" if kept > 1 else ("most of" if kept >= 0.5 else "less than half of")
        lines.append(f"{arm}: {100 * kept:.0f}% of {ref}'s domain gain ({how} it)")
    return lines


def forgetting_summary(docs: pd.DataFrame, order: list[str], top: int = TOP_DOCS) -> list[str]:
    """Where forgetting happens: per arm the share of documents that got worse, then the documents whose
    perplexity rose most (only documents that did rise are listed)."""
    if docs.empty:
        return []
    per_arm = docs.groupby(["arm", "doc", "title"], sort=False).agg(
        n_tokens=("n_tokens", "first"), ppl_change_pct=("ppl_change_pct", "mean")).reset_index()
    lines = ["Per document of the general text (seed mean), the change in perplexity against the base model.", ""]
    for arm in order:
        d = per_arm[per_arm.arm == arm]
        if d.empty:
            continue
        worse = int((d["ppl_change_pct"].round(1) > 0).sum())  # "worse" only where the printed change is
        lines.append(f"- {arm}: {worse} of {len(d)} documents got worse ({100 * worse / len(d):.0f}%); change per "
                     f"document: median {d['ppl_change_pct'].median():+.1f}%, from {d['ppl_change_pct'].min():+.1f}% "
                     f"to {d['ppl_change_pct'].max():+.1f}%")
    wide = per_arm.pivot_table(index=["doc", "title", "n_tokens"], columns="arm", values="ppl_change_pct")
    wide = wide[[a for a in order if a in wide.columns]]
    ranked = wide.assign(mean=wide.mean(axis=1)).sort_values("mean", ascending=False)
    worst = ranked[ranked["mean"].round(1) > 0].head(top)
    if worst.empty:
        return lines + ["", "No document got worse on average over the arms."]
    lines += ["", f"The {len(worst)} document{'s' if len(worst) > 1 else ''} whose perplexity rose most "
              "(mean over arms; only documents that rose):", "",
              "| document | tokens | " + " | ".join(wide.columns) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in wide.columns) + " |"]
    for (doc, title, n), r in worst.iterrows():
        lines.append(f"| {title.replace('|', '/')} | {n} | " + " | ".join(f"{r[a]:+.1f}%" for a in wide.columns) + " |")
    return lines


def truncation_note(split: str, st: dict[str, int], chunk_len: int | None = None) -> str | None:
    """A warning when a sizeable share of a split's examples was cut at chunk_len; None otherwise."""
    docs = st.get("docs") or 0
    cut = st.get("truncated", 0)
    if not docs or cut / docs <= TRUNCATION_WARNING:
        return None
    limit = f" of {chunk_len} tokens" if chunk_len else ""
    return (f"{cut} of {docs} {split} examples ({100 * cut / docs:.0f}%) were longer than chunk_len{limit} and were cut, "
            f"losing {st.get('truncated_tokens', 0)} tokens (their end, and any end marker): the arms learn, and are "
            "scored on, "
            "truncated completions; raise chunk_len to keep them whole")


def data_lines(data: dict[str, Any], chunk_len: int | None = None) -> list[str]:
    """What the study read: per set documents, rows and tokens; the tokens in the training loss (train,
    replay) or scored (test, general: `scored`, from the evaluations); what chunk_len cut; and a note per
    set on the documents dropped before tokenizing (`empty`: no text; `duplicates`: copies of another
    domain document, dropped before the held-out split). An entry without `rows` has notes only."""
    lines = ["| set | documents | rows | tokens | in the training loss | scored | skipped | cut at chunk_len | tokens cut |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, st in data.items():
        if not st or "rows" not in st:
            continue
        trained = name.endswith("train") or name.endswith("replay")
        lines.append(f"| {name} | {st.get('docs', 0)} | {st.get('rows', 0)} | {st.get('tokens', 0)} | "
                     f"{st.get('loss_tokens', 0) if trained else '—'} | {st.get('scored', '—')} | "
                     f"{st.get('skipped', 0)} | {st.get('truncated', 0)} | {st.get('truncated_tokens', 0)} |")
    notes = [note for name, st in data.items() if st and (note := dropped_note(name, st))]
    notes += [f"⚠ {note}" for name, st in data.items() if st and (note := truncation_note(name, st, chunk_len))]
    return lines + ([""] + [f"- {note}" for note in notes] if notes else [])


def dropped_note(name: str, st: dict[str, int]) -> str | None:
    """What reading a set dropped before tokenizing, in words; None when nothing was."""
    parts = []
    if st.get("duplicates"):
        parts.append(f"{st['duplicates']} duplicate documents (the same text as an earlier one) dropped before the "
                     "held-out split, so no held-out document is also a training one")
    if st.get("copies"):
        parts.append(f"{_count(st['copies'], 'held-out example')} dropped as copies of training text (most of its "
                     "scored tokens in 32-token runs of the training rows: the same text under another prompt)")
    if st.get("empty"):
        what = ("no text in any used field, or an empty completion" if name.startswith("domain") else
                "no text in any used field")
        parts.append(f"{_count(st['empty'], 'record')} without text dropped ({what})")
    return f"{name}: " + "; ".join(parts) if parts else None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def render_markdown(a: Analysis, title: str, details: dict[str, Any], figures: dict[str, Path],
                    methods: dict[str, str] | None = None, data: dict[str, Any] | None = None,
                    chunk_len: int | None = None, sections: dict[str, list[str]] | None = None,
                    lead: list[str] | None = None) -> str:
    """report.md: `lead` (the comparison at equal domain gain, ftcore.matched_gain) first, then the arms at the end
    of training, the seed's expectations, `sections`, where forgetting happens, the data and the run."""
    lines = [f"# Fine-tuning cost study: {title}", ""]
    if lead:
        lines += ["## At equal domain gain", ""] + lead + ["", "## At the end of training", ""]
    lines += [markdown_table(a.arms), "",
             f"Δ is the % change in perplexity against the base model; ± the standard deviation over seeds; "
             f"[..] the 95% bootstrap interval over documents ({stats.RESAMPLES} resamples, paired across models). "
             f"{NOISE_RULE}. ● marks the arms on the Pareto front of domain gain vs general forgetting."
             + (" KL(base‖arm) is the mean per-token KL divergence of the arm's next-token distribution from the "
                "base's on the general set, in nats (0 = the base's predictions unchanged; it does not depend on how "
                "well the base fit the text); exact over the vocabulary unless eval.kl_top_k sets the top-k lower bound."
                if KL_COLUMN in columns(a.arms) else "")
             + (" The domain KL is the same on the held-out domain text, the new task's own distribution (Shenfeld et "
                "al. 2025, \"RL's Razor\": forgetting is predicted by the KL measured there)."
                if KL_COLUMNS["domain"] in columns(a.arms) else ""), "",
             "## Against the seed recipe's expectations", "", f"Expected: {EXPECTED['domain']}; {EXPECTED['general']}.", ""]
    lines += [f"- {line}" for line in expectation_checks(a, methods)]
    if a.runs["seed"].notna().any() and a.arms["seeds"].max() > 1:
        lines += ["", "## Every seed", "", runs_markdown(a.runs)]
    for heading, section in (sections or {}).items():
        lines += ["", f"## {heading}", ""] + section
    forgetting = forgetting_summary(a.general_docs, [x for x in a.arms.arm if x != "base"])
    if forgetting:
        lines += ["", "## Where forgetting happens", ""] + forgetting
    if data:
        lines += ["", "## Data", "", "Domain splits are the format's training examples (instruction: prompt → "
                  "completion, skipped when no completion token is within chunk_len; lm: chunks of the documents' "
                  "stream); the general and replay sets are token streams cut into chunk_len rows.", ""]
        lines += data_lines(data, chunk_len)
    if details:
        lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in details.items()]
    if figures:
        lines += ["", "## Plots", ""] + [f"![{name}]({path.name})" for name, path in figures.items()]
    return "\n".join(lines) + "\n"


def write_report(
    evals: list[dict[str, Any]], out_dir: str | Path, title: str,
    loss_logs: dict[str, Path] | None = None, details: dict[str, Any] | None = None,
    order: list[str] | None = None, methods: dict[str, str] | None = None, titles: pd.DataFrame | None = None,
    reference: str | None = None, data: dict[str, Any] | None = None, chunk_len: int | None = None,
    sections: dict[str, list[str]] | None = None, more_plots: dict[str, Path] | None = None,
    task_table: pd.DataFrame | None = None, lead: list[str] | None = None,
) -> dict[str, str]:
    """Write the tables, report.md and the plots into out_dir; return their paths. `lead` (markdown lines) opens
    the report; `sections` (heading -> markdown lines) and `more_plots` (already drawn, e.g.
    ftcore.forgetting's) join it;
    `task_table` (ftcore.task_forgetting.analyse: per-arm task columns) joins the table, with its frontier plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a = analyse(evals, order, titles, reference=reference)
    if task_table is not None and len(task_table):
        a = dataclasses.replace(a, arms=a.arms.merge(task_table, on="arm", how="left"))
    drawn = {"perplexity": plots.plot_perplexity(a.arms, out / "perplexity.png"),
             "frontier": plots.plot_frontier(a.arms, a.runs, out / "frontier.png")}
    if "task_forgetting_pts" in a.arms and a.arms["task_forgetting_pts"].notna().any():
        drawn["task_frontier"] = plots.plot_task_frontier(a.arms, out / "task_frontier.png")
    if loss_logs:
        drawn["loss"] = plots.plot_losses(loss_logs, out / "loss.png")
    drawn.update(more_plots or {})
    write_parquet(a.arms, out / "table.parquet")
    write_parquet(a.runs, out / "runs.parquet")
    write_parquet(a.general_docs, out / "general_docs.parquet")
    write_text(markdown_table(a.arms) + "\n", out / "table.md")
    write_text(render_markdown(a, title, details or {}, drawn, methods, data, chunk_len, sections, lead),
               out / "report.md")
    return {"table": str(out / "table.parquet"), "runs": str(out / "runs.parquet"),
            "general_docs": str(out / "general_docs.parquet"), "report": str(out / "report.md"),
            **{name: str(p) for name, p in drawn.items()}}
