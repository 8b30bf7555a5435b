"""Forgetting at equal domain gain: interpolation, "not reached", the bootstrap, sweeps as data, McNemar."""

import math

import numpy as np
import pandas as pd
import pytest

from ftcore import matched_gain
from ftcore.config_files import load_config
from ftcore.results import DomainRows, ModelRef, Stream
from ftcore.study import plan_arm
from ftcore.task_forgetting import flips, mcnemar


def test_the_general_change_is_read_where_the_path_first_reaches_the_gain():
    gain = np.array([0.0, 4.0, 8.0, 12.0])
    general = np.array([0.0, 1.0, 3.0, 2.0])
    assert matched_gain.at_gain(gain, general, 6.0) == pytest.approx(2.0)  # halfway between 1.0 and 3.0
    assert matched_gain.at_gain(gain, general, 8.0) == pytest.approx(3.0)  # a measured point
    assert np.isnan(matched_gain.at_gain(gain, general, 12.5))  # never reached: nothing extrapolated
    # Not monotone: the gain rises past 6, falls back, rises again; the first crossing counts.
    wavy = np.array([0.0, 7.0, 5.0, 9.0])
    assert matched_gain.at_gain(wavy, np.array([0.0, 7.0, 0.0, 9.0]), 6.0) == pytest.approx(6.0)
    # Vectorized over resamples: one row reaches, one does not.
    rows = matched_gain.at_gain(np.array([[0.0, 10.0], [0.0, 3.0]]), np.array([[0.0, 5.0], [0.0, 1.0]]), 4.0)
    assert rows[0] == pytest.approx(2.0) and np.isnan(rows[1])


def _curve(arm, seed, gains, generals, domain_docs, general_windows, rng=None, noise=0.0):
    """A run's curve from per-point % changes: unit sums that give exactly those changes (plus unit noise)."""
    rng = rng or np.random.default_rng(0)
    rows = []
    for step, (gain, general) in enumerate(zip(gains, generals)):
        for which, change, n in (("domain", -gain, domain_docs), ("general", general, general_windows)):
            tokens = np.full(n, 100.0)
            per_token = 3.0 + math.log1p(change / 100) + (rng.normal(0, noise, n) if step else 0.0)
            rows.append({"arm": arm, "seed": seed, "step": step * 10, "tokens_seen": step * 1000, "set": which,
                         "change_pct": change, "unit_nll": list(per_token * tokens), "unit_tokens": list(tokens)})
    return rows


def test_a_curve_without_a_point_between_step_0_and_its_end_is_not_read_at_equal_gain():
    """eval.every_steps at or above the arm's steps leaves step 0 and the last step: the "change at gain g" would be
    the straight line from the base to the end (seen: LoRA 1.1 points under full, outside noise, where the curves with
    points every 5 steps said 2.1 within noise). Refused, naming the arm; one point between is enough to read."""
    arms = [("full", "full"), ("lora", "lora")]
    rows = (_curve("full", 0, [0, 5, 10, 15], [0, 2, 4, 6], 30, 20) + _curve("lora", 0, [0, 9], [0, 1.5], 30, 20))
    section = matched_gain.section(pd.DataFrame(rows), [], ["full", "lora"], "full", arms)
    assert section["headline"] == (
        "Not compared at equal domain gain: the curve of lora (trained 10 steps) holds no point between step 0 and the "
        "last step, so a general change at a common gain would be read off a straight line from the base to the end "
        "of training, not measured; no arm is compared. Set eval.every_steps below 10 (e.g. --set "
        "eval.every_steps=2), or to null for about 10 points per arm.")
    assert section["lines"] == [section["headline"]] and section["gains"] == [] and "table" not in section
    seeds = pd.DataFrame(_curve("full", 0, [0, 5], [0, 2], 30, 20) + _curve("full", 1, [0, 10], [0, 4], 30, 20))
    assert "the curves of full, seed 0 (trained 10 steps), full, seed 1 (trained 10 steps) hold" in (
        matched_gain.section(seeds, [], ["full"], None, arms[:1])["headline"])
    enough = pd.DataFrame(_curve("full", 0, [0, 5, 10], [0, 2, 4], 30, 20) + _curve("lora", 0, [0, 6, 9], [0, 1, 1.5], 30, 20))
    assert matched_gain.section(enough, [], ["full", "lora"], "full", arms)["headline"].startswith("**At a domain gain")


def test_an_arm_of_one_step_is_told_to_train_more_not_to_lower_every_steps():
    """With one step there is no step in between to measure: "set eval.every_steps below 1" would be no remedy."""
    rows = _curve("full", 0, [0, 4], [0, 1], 30, 20)
    for row in rows:
        row["step"] //= 10  # the points at steps 0 and 1
    headline = matched_gain.section(pd.DataFrame(rows), [], ["full"], None, [("full", "full")])["headline"]
    assert "the curve of full (trained 1 steps) holds no point" in headline
    assert headline.endswith("no arm is compared. Train more than one step (train.max_steps).")


def test_the_comparison_at_equal_gain_with_its_default_gain_and_the_reference():
    rows = (_curve("full", 0, [0, 5, 10, 15], [0, 2, 4, 6], 30, 20)
            + _curve("lora", 0, [0, 3, 6, 9], [0, 0.5, 1.0, 1.5], 30, 20))
    curves = pd.DataFrame(rows)
    paths = matched_gain.resampled_paths(curves, resamples=50)
    assert matched_gain.common_gain(paths, [["full"], ["lora"]]) == 9.0  # lora's largest gain (no noise: in every resample)
    table = matched_gain.analyse(curves, [9.0, 12.0], ["full", "lora"], "full").set_index(["gain_pct", "arm"])
    assert table.loc[(9.0, "full"), "general_change_pct"] == pytest.approx(3.6, abs=1e-6)  # 5 -> 10 gives 2 -> 4
    assert table.loc[(9.0, "lora"), "general_change_pct"] == pytest.approx(1.5, abs=1e-6)
    assert table.loc[(9.0, "full"), "step"] == pytest.approx(18.0)
    assert table.loc[(9.0, "lora"), "diff_pp"] == pytest.approx(-2.1, abs=1e-6)
    # Without noise every resample gives the same path: the interval is the point.
    assert table.loc[(9.0, "lora"), "ci_low"] == pytest.approx(1.5, abs=1e-6)
    assert not table.loc[(12.0, "lora"), "reached"] and np.isnan(table.loc[(12.0, "lora"), "general_change_pct"])
    section = matched_gain.section(curves, [12.0], ["full", "lora"], "full", [("full", "full"), ("lora", "lora")])
    assert section["gain"] == 9.0 and section["headline"].startswith("**At a domain gain of 9.0%**")
    assert "| 12.0% | lora | — | not reached | — |" in section["lines"]


def test_the_bootstrap_interval_covers_the_true_value():
    """A small simulation: units whose noise averages out to known paths; the 95% interval covers the truth in
    about 95% of studies (here at least 85 of 100)."""
    covered = 0
    for trial in range(100):
        rng = np.random.default_rng(trial)
        rows = (_curve("full", 0, [0, 5, 10, 15], [0, 2, 4, 6], 40, 40, rng, noise=0.05)
                + _curve("lora", 0, [0, 3, 6, 9], [0, 0.5, 1.0, 1.5], 40, 40, rng, noise=0.05))
        table = matched_gain.analyse(pd.DataFrame(rows), [4.0], ["full", "lora"], "full", resamples=300)
        lora = table.set_index("arm").loc["lora"]
        truth = 0.5 + (4.0 - 3.0) / 3.0 * 0.5  # interpolated on the noise-free path
        covered += bool(lora["ci_low"] <= truth <= lora["ci_high"])
    assert covered >= 85


def test_lists_of_learning_rates_and_replay_ratios_are_arms():
    cfg = load_config("smoke", arms=[{"name": "lora", "method": "lora", "learning_rate": [1e-4, 3e-4, 1e-3]},
                                     {"name": "replay", "replay_ratio": [0.01, 0.1]}, "full"])
    assert cfg.arm_names == ["lora-lr1e-4", "lora-lr3e-4", "lora-lr1e-3", "replay-0.01", "replay-0.1", "full"]
    assert [a.group for a in cfg.arms] == ["lora", "lora", "lora", "replay", "replay", "full"]
    assert [cfg.learning_rate_of(a) for a in cfg.arms[:3]] == [1e-4, 3e-4, 1e-3]
    model = ModelRef(source="local", name="m", path="/m", digest="m")
    domain = DomainRows(digest="d", train="t", test="e", stats={})
    replay = Stream(digest="r", path="r", docs="x", stats={})

    def keys(cfg):
        return {a.name: plan_arm(cfg, a, 0, model, domain, replay) for a in cfg.arms}

    plans = keys(cfg)
    assert len({p.key for p in plans.values()}) == 6  # one cache entry per value
    assert [plans[f"lora-lr{x}"].learning_rate for x in ("1e-4", "3e-4", "1e-3")] == [1e-4, 3e-4, 1e-3]
    assert plans["replay-0.1"].replay_ratio == 0.1 and plans["replay-0.1"].dir.startswith("train-replay-0.1/")
    # One value changed: only its arm's key changes.
    changed = load_config("smoke", arms=[{"name": "lora", "method": "lora", "learning_rate": [1e-4, 3e-4, 2e-3]},
                                         {"name": "replay", "replay_ratio": [0.01, 0.1]}, "full"])
    after = keys(changed)
    assert {n for n in plans if n in after and plans[n].key == after[n].key} == set(plans) - {"lora-lr1e-3"}
    with pytest.raises(ValueError, match="learning_rate and lora.learning_rate both set"):
        load_config("smoke", arms=[{"name": "x", "method": "lora", "learning_rate": 1e-4, "lora": {"learning_rate": 1e-3}}])


def test_flips_and_an_exact_mcnemar_test_on_a_hand_made_task():
    base = pd.DataFrame({"value": [1, 1, 1, 1, 0, 0, 0, 0, 1, 0]})
    arm = pd.DataFrame({"value": [0, 0, 0, 1, 0, 1, 0, 0, 1, 0]})  # 3 right -> wrong, 1 wrong -> right
    got = flips(base, [arm])
    assert (got["right_to_wrong"], got["wrong_to_right"]) == (3, 1)
    # Two-sided exact binomial: 2 * P(X <= 1 | n = 4, p = 1/2) = 2 * 5/16.
    assert got["mcnemar_p"] == pytest.approx(10 / 16)
    assert mcnemar(0, 0) == 1.0 and mcnemar(10, 0) == pytest.approx(2 / 2**10)
    assert flips(pd.DataFrame({"value": [0.3, 0.9]}), [pd.DataFrame({"value": [0.1, 0.2]})]) == {}  # not right/wrong


def test_each_method_at_its_best_setting():
    """Two learning rates per method: each method's best is its setting with the least general change at the gain
    every method reaches with some setting; the choice is marked as made on the test documents."""
    rows = (_curve("full-lr1e-5", 0, [0, 2, 4], [0, 1, 2], 20, 20) + _curve("full-lr1e-4", 0, [0, 6, 12], [0, 6, 12], 20, 20)
            + _curve("lora-lr1e-4", 0, [0, 3, 6], [0, 0.3, 0.6], 20, 20) + _curve("lora-lr1e-3", 0, [0, 5, 10], [0, 2, 4], 20, 20))
    arms = [("full-lr1e-5", "full"), ("full-lr1e-4", "full"), ("lora-lr1e-4", "lora"), ("lora-lr1e-3", "lora")]
    section = matched_gain.section(pd.DataFrame(rows), [], [a for a, _ in arms], "full-lr1e-5", arms)
    assert section["gain"] == 4.0  # the largest every arm reaches
    # Every method reaches 10 with one setting (full-lr1e-4: 12, lora-lr1e-3: 10): compared there.
    assert section["best_gain"] == 10.0 and section["best"] == {"full": "full-lr1e-4", "lora": "lora-lr1e-3"}
    best = section["best_table"].set_index("arm")
    assert best.loc["lora-lr1e-3", "general_change_pct"] == pytest.approx(4.0) and best.loc["lora-lr1e-3", "reference"] == "full-lr1e-4"
    assert any("optimistic" in line for line in section["lines"])


def test_a_setting_that_never_gains_leaves_each_method_at_its_best():
    """A swept learning rate that diverged (domain perplexity up all along): no gain is common to every arm, yet
    each method is still compared at its best (seen: demo-frontier's full at 1.5e-4 removed the whole comparison)."""
    rows = (_curve("full-lr1e-5", 0, [0, 4, 8], [0, 1, 2], 20, 20) + _curve("full-lr1e-4", 0, [0, -5, -15], [0, 20, 50], 20, 20)
            + _curve("lora-lr1e-4", 0, [0, 3, 6], [0, 0.3, 0.6], 20, 20))
    arms = [("full-lr1e-5", "full"), ("full-lr1e-4", "full"), ("lora-lr1e-4", "lora")]
    section = matched_gain.section(pd.DataFrame(rows), [], [a for a, _ in arms], "full-lr1e-5", arms)
    assert section["best"] == {"full": "full-lr1e-5"} and section["best_gain"] == 6.0 and section["gain"] == 6.0
    best = section["best_table"].set_index("arm")
    assert best.loc["full-lr1e-5", "general_change_pct"] == pytest.approx(1.5) and "full-lr1e-4" not in best.index
    assert best.loc["lora-lr1e-4", "diff_pp"] == pytest.approx(-0.9)
    assert section["headline"].startswith("**At a domain gain of 6.0%**")
    assert any("cannot all be compared" in line for line in section["lines"])


def test_each_method_at_its_best_within_a_forgetting_budget():
    from ftcore import forgetting

    rows = (_curve("full-a", 0, [0, 2, 4], [0, 1, 2], 20, 20) + _curve("full-b", 0, [0, 6, 12], [0, 6, 12], 20, 20)
            + _curve("lora-a", 0, [0, 3, 6], [0, 0.3, 0.6], 20, 20))
    df = pd.DataFrame(rows)
    df["nll"] = df["unit_nll"].map(sum) / df["unit_tokens"].map(sum)
    lines = forgetting.best_within_budget(df, 3.0, {}, [("full-a", "full"), ("full-b", "full"), ("lora-a", "lora")])
    # within +3%: full-a reaches 4% gain (general +2%), full-b only 0 (its first point is +6%): full-a is full's best
    assert "| full | full-a | +4.0% | +2.0% |" in lines
