"""The forgetting gate: a study a CI pipeline can fail on, like a test.

With `gate` and `forgetting_budget_pct` set, the study's verdict is "over budget" when a gated arm's
general perplexity rose more than the budget (%, the end-of-training change, mean over seeds) or,
on a benchmark task, an accuracy-like score fell more than the budget read as points (a
perplexity-like task: rose more than the budget in %). The point estimate decides, so a rerun
gives the same verdict; the line quotes the 95% interval so a reader sees how close the call was.
`ftstudy run` then exits EXIT_OVER_BUDGET (3), distinct from a failed run (1) and bad input (2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

EXIT_OVER_BUDGET = 3


@dataclass(frozen=True)
class Verdict:
    """The gate's outcome: `over` lists '<arm>: <what>' per breach (empty when within budget); `line` says it in one
    line."""

    over: tuple[str, ...]
    line: str

    @property
    def passed(self) -> bool:
        return not self.over


class OverBudget(Exception):
    """A study whose gated arms forgot more than the budget; carries the verdict (the study's results are written)."""

    def __init__(self, verdict: Verdict):
        super().__init__(verdict.line)
        self.verdict = verdict


def study_verdict(cfg: Any, files: dict[str, Path]) -> Verdict | None:
    """The verdict of a finished study (`cfg`: its StudyConfig; `files`: ftcore.study.report_files of its
    results); None when `cfg.gate` is empty."""
    if not cfg.gate:
        return None
    arms = gated_arms(cfg.gate, [(a.name, a.family or a.name) for a in cfg.arms])
    tasks = pd.read_parquet(files["tasks"]) if "tasks" in files else None
    return verdict(pd.read_parquet(files["table"]), tasks, arms, cfg.forgetting_budget_pct)


def gated_arms(gate: tuple[str, ...], arms: list[tuple[str, str]]) -> list[str]:
    """The arm names `gate` selects among `arms` ((name, family) pairs): 'all', an arm's name, or a family's
    name (every learning rate or replay ratio it was expanded into)."""
    if "all" in gate:
        return [name for name, _ in arms]
    return [name for name, family in arms if name in gate or family in gate]


def verdict(table: pd.DataFrame, tasks: pd.DataFrame | None, arms: list[str], budget_pct: float) -> Verdict:
    """The gate's verdict for `arms` from the report's table.parquet (`table`: one row per arm with
    general_change_pct and its 95% interval, %) and tasks.parquet (`tasks`: per arm and task the change,
    in points for accuracy-like tasks, % for perplexity-like ones; None without tasks).

    An arm missing from the table (it failed) counts as a breach: a gate never passes an arm it could
    not measure.
    """
    rows = table.set_index("arm")
    over = []
    for arm in arms:
        if arm not in rows.index:
            over.append(f"{arm}: not measured (the arm failed)")
            continue
        row = rows.loc[arm]
        change = float(row["general_change_pct"])
        if change > budget_pct:
            over.append(f"{arm}: general perplexity {change:+.1f}% [{row['general_change_ci_low']:+.1f}, "
                        f"{row['general_change_ci_high']:+.1f}]")
        for task in _task_rows(tasks, arm):
            pts = task["unit"] == "pts"
            if (-task["change"] if pts else task["change"]) > budget_pct:
                unit = " pts" if pts else "%"
                over.append(f"{arm}: {task['task']} {task['change']:+.1f}{unit} [{task['ci_low']:+.1f}, "
                            f"{task['ci_high']:+.1f}]")
    budget = f"the forgetting budget of {budget_pct:g}% (general perplexity; points on accuracy tasks)"
    if over:
        return Verdict(tuple(over), f"over budget: {'; '.join(over)} exceed {budget}")
    return Verdict((), f"within budget: {', '.join(arms)} within {budget}")


def _task_rows(tasks: pd.DataFrame | None, arm: str) -> list[dict]:
    if tasks is None or tasks.empty:
        return []
    return tasks[(tasks["arm"] == arm) & tasks["change"].notna()].to_dict("records")
