"""The forgetting gate: its verdict on hand-made tables, and the config rules around it."""

from __future__ import annotations

import pandas as pd
import pytest
from pydantic import ValidationError

from ftcore import gate
from ftcore.config_files import load_config


def _table(**general):
    return pd.DataFrame([{"arm": "base", "general_change_pct": 0.0, "general_change_ci_low": 0.0,
                          "general_change_ci_high": 0.0}] +
                        [{"arm": arm, "general_change_pct": g, "general_change_ci_low": g - 1,
                          "general_change_ci_high": g + 1} for arm, g in general.items()])


def _tasks(*rows):
    return pd.DataFrame([{"arm": arm, "task": task, "change": change, "unit": unit, "ci_low": change - 1,
                          "ci_high": change + 1} for arm, task, change, unit in rows])


def test_an_arm_within_the_budget_passes_and_one_over_it_does_not():
    table = _table(full=3.5, lora=0.4)
    ok = gate.verdict(table, None, ["lora"], budget_pct=2)
    assert ok.passed and ok.line.startswith("within budget: lora")
    over = gate.verdict(table, None, ["full", "lora"], budget_pct=2)
    assert not over.passed and over.over == ("full: general perplexity +3.5% [+2.5, +4.5]",)
    assert gate.verdict(table, None, ["full"], budget_pct=3.5).passed  # the budget itself is allowed


def test_a_task_breaks_the_gate_by_points_lost_or_perplexity_gained():
    table = _table(lora=0.0)
    tasks = _tasks(("lora", "arc_easy", -2.5, "pts"), ("lora", "hellaswag", +5.0, "pts"),
                   ("lora", "wikitext", +1.0, "%"))
    assert gate.verdict(table, tasks, ["lora"], budget_pct=2).over == ("lora: arc_easy -2.5 pts [-3.5, -1.5]",)
    assert gate.verdict(table, tasks, ["lora"], budget_pct=0.5).over == (
        "lora: arc_easy -2.5 pts [-3.5, -1.5]", "lora: wikitext +1.0% [+0.0, +2.0]")
    assert gate.verdict(table, tasks, ["lora"], budget_pct=3).passed


def test_a_gated_arm_that_was_not_measured_never_passes():
    assert gate.verdict(_table(full=0.0), None, ["lora"], 2).over == ("lora: not measured (the arm failed)",)


def test_gate_names_arms_families_or_all():
    arms = [("full-lr1e-5", "full"), ("full-lr5e-5", "full"), ("lora", "lora")]
    assert gate.gated_arms(("full",), arms) == ["full-lr1e-5", "full-lr5e-5"]
    assert gate.gated_arms(("lora", "full-lr5e-5"), arms) == ["full-lr5e-5", "lora"]
    assert gate.gated_arms(("all",), arms) == ["full-lr1e-5", "full-lr5e-5", "lora"]


@pytest.mark.parametrize("fields, message", [
    ({"gate": ["lora"]}, "gate ['lora'] needs forgetting_budget_pct"),
    ({"gate": ["lorra"], "forgetting_budget_pct": 2}, "gate names ['lorra'], which are not arms of this study"),
])
def test_a_gate_that_cannot_work_is_refused(fields, message):
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("smoke", **fields)
