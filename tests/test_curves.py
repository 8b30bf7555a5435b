"""Learning and forgetting curves: measured while each arm trains, resumable, with a forgetting budget."""

import importlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from ftcore import curves, study
from ftcore.results import BASE
from ftcore.steps import run_step

TRAIN = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}


def _prepared(study_config, **fields):
    return study.prepare(study_config(**{"train": TRAIN, **fields}))


def _plan(prepared, name):
    return next(p for p in study.plan_arms(prepared) if p.name == name)


def _curve(root, result) -> pd.DataFrame:
    return pd.read_parquet(Path(root) / result.curves)


@pytest.mark.parametrize("arm, precision", [("full", "fp32"), ("lora", "bf16")])
def test_last_point_on_the_whole_sets_equals_the_final_evaluation(study_config, arm, precision):
    # Trained under bf16 autocast, the points are still scored in the evaluation's precision (fp32).
    prepared = _prepared(study_config, arms=[arm], eval={"curve_tokens": None, "every_steps": 2}, precision=precision)
    root = prepared.cfg.artifacts_dir
    trained = run_step(study.train(_plan(prepared, arm), root))
    curve = _curve(root, trained)
    assert sorted(set(curve.step)) == [0, 2, 4]  # step 0 (the base), every 2 steps, the last step
    for which in ("domain", "general"):
        final = run_step(study.evaluate(prepared, which, trained))
        last = curve[(curve.step == 4) & (curve.set == which)].iloc[0]
        assert last["tokens"] == final.tokens
        assert last["ppl"] == pytest.approx(final.ppl, rel=1e-6)
        assert last["bpb"] == pytest.approx(final.bpb, rel=1e-6)
        base = run_step(study.evaluate(prepared, which, BASE))
        first = curve[(curve.step == 0) & (curve.set == which)].iloc[0]
        assert first["ppl"] == pytest.approx(base.ppl, rel=1e-6)  # step 0 is the base model
    assert (curve.tokens_seen.diff().dropna() >= 0).all() and curve.tokens_seen.iloc[-1] > 0
    log = (Path(root) / trained.dir / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 4  # measuring a point does not swallow that step's loss log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((Path(root) / trained.dir / "checkpoints" / "runs").iterdir()))).Reload()
    tb = events.Scalars("eval/general_ppl")
    assert [e.step for e in tb] == [0, 2, 4]
    assert [e.value for e in tb] == pytest.approx(list(curve[curve.set == "general"].ppl), rel=1e-6)


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated kill after step 3")


def test_a_killed_and_resumed_arm_draws_the_uninterrupted_curve(study_config, tmp_path):
    prepared = _prepared(study_config, arms=["full"], eval={"every_steps": 1, "curve_tokens": 300})
    root, plan = prepared.cfg.artifacts_dir, _plan(prepared, "full")
    with pytest.raises(KeyboardInterrupt):
        run_step(study.train(plan, root, callbacks=[Crash()]))
    assert sorted({p["step"] for p in curves.read_points(Path(root) / plan.dir)}) == [0, 1, 2, 3]
    resumed = run_step(study.train(plan, root))
    assert resumed.summary["resumed_from_step"] == 2
    clean_root = tmp_path / "clean"
    shutil.copytree(root, clean_root, ignore=shutil.ignore_patterns("train-*"))
    clean = run_step(study.train(plan, clean_root))
    a, b = _curve(root, resumed), _curve(clean_root, clean)
    assert list(a.step) == list(b.step) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert list(a.tokens_seen) == list(b.tokens_seen)
    assert a.ppl.to_numpy() == pytest.approx(b.ppl.to_numpy(), rel=1e-5)


def _points(rows):
    """curves.jsonl points from (step, domain ppl change %, general ppl change %) rows."""
    import math
    return [{"step": s, "set": which, "nll": math.log1p(change / 100)}
            for s, d, g in rows for which, change in (("domain", d), ("general", g))]


def test_the_budget_picks_the_first_step_over_it_and_the_best_step_within_it():
    rows = [(0, 0, 0), (10, -5, 0.5), (20, -9, 1.9), (30, -8, 1.0), (40, -12, 2.5), (50, -14, 1.5), (60, -15, 4.0)]
    first_over, best = curves.best_within(_points(rows), budget_pct=2.0)
    assert first_over == 40  # +2.5% is the first change over 2%
    assert best == 50  # within 2%: the largest domain gain is -14% at step 50 (after a step over the budget)
    assert curves.best_within(_points(rows), budget_pct=0.1) == (10, 0)  # nothing trained stays within: step 0
    assert curves.best_within(_points(rows), budget_pct=10) == (None, 60)


def test_stop_at_budget_stops_and_keeps_the_best_step_within_it(study_config, tmp_path):
    # A "general" text of digits, which training on the abstracts makes less likely at once, and a
    # budget no step keeps: the arm stops at the first point over it, and its model is step 0's, the base.
    digits = tmp_path / "digits.txt"
    digits.write_text("".join(" ".join(str((7 * i + j) % 10) for j in range(40)) + "\n" for i in range(40)))
    prepared = _prepared(study_config, arms=["full"], eval={"every_steps": 1, "curve_tokens": 300},
                         general={"source": "file", "path": str(digits), "file_format": "text", "max_docs": None},
                         train={**TRAIN, "learning_rate": 5e-3}, forgetting_budget_pct=1e-6, stop_at_budget=True)
    root = Path(prepared.cfg.artifacts_dir)
    trained = run_step(study.train(_plan(prepared, "full"), root))
    budget = trained.summary["budget"]
    assert budget["stopped_at_step"] == budget["first_over_step"] == trained.summary["steps"] == 1
    assert budget["model_step"] == budget["best_step"] == 0
    assert curves.snapshots(root / trained.dir) == {} and budget["best_weights"] is None  # the saved model is it
    saved = load_file(root / trained.dir / "model" / "model.safetensors")
    base = load_file(prepared.model_dir / "model.safetensors")
    assert all(torch.equal(saved[k], base[k]) for k in base)
    final = run_step(study.evaluate(prepared, "general", trained))
    assert final.ppl == pytest.approx(run_step(study.evaluate(prepared, "general", BASE)).ppl, rel=1e-6)


# --- KL(base ‖ arm) ----------------------------------------------------------------------------------

def _kl_by_hand(base_model, tuned, rows):
    """Mean over predicted tokens of sum_v p(v) (log p(v) - log q(v)), p the base's, q the arm's, in float64."""
    from ftcore import perplexity

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels, _ in rows:
            x = torch.tensor([ids])
            p = torch.log_softmax(base_model(input_ids=x).logits[0, :-1].double(), -1)
            q = torch.log_softmax(tuned(input_ids=x).logits[0, :-1].double(), -1)
            keep = torch.tensor(labels[1:]) != perplexity.IGNORE
            total += float((p.exp() * (p - q)).sum(-1)[keep].sum())
            count += int(keep.sum())
    return total / count


@pytest.mark.parametrize("arm_name, top_k", [("full", None), ("lora", None), ("full", 100_000)])
def test_kl_to_the_base_matches_a_hand_computation(study_config, tmp_path, arm_name, top_k):
    # None: exact, the base beside the arm (a LoRA arm: its adapter switched off); k >= vocab: the stored top-k.
    from transformers import AutoModelForCausalLM

    from ftcore import models, perplexity

    prepared = _prepared(study_config, arms=[arm_name], eval={"every_steps": 0, "kl_top_k": top_k})
    root = Path(prepared.cfg.artifacts_dir)
    trained = run_step(study.train(_plan(prepared, arm_name), root))
    base = run_step(study.evaluate(prepared, "general", BASE))
    arm = run_step(study.evaluate(prepared, "general", trained, base))
    rows = perplexity.stream_windows(pd.read_parquet(root / prepared.general.path), prepared.cfg.chunk_len, None,
                                     prepared.cfg.eval.max_general_tokens)
    base_model = AutoModelForCausalLM.from_pretrained(prepared.model_dir)
    tuned = models.load_trained(root / trained.dir, prepared.model_dir)
    assert arm.kl > 0
    assert arm.kl == pytest.approx(_kl_by_hand(base_model, tuned, rows), rel=1e-4)
    docs = pd.read_parquet(root / arm.docs)
    assert docs["kl_sum"].sum() == pytest.approx(arm.kl * arm.tokens, rel=1e-9)  # split by document
    if top_k:  # the base against its own stored top-k: exactly 0
        itself = perplexity.score_rows(base_model, rows, 8, 0, reference=perplexity.read_reference(root / base.reference))
        assert itself["kl_sum"].sum() == 0.0
        assert base.hidden is None
    else:
        assert base.reference is None and base.hidden  # the exact KL stores the base's decoder output, no top-k


@pytest.mark.parametrize("which", ["domain", "general"])
@pytest.mark.parametrize("arm_name, precision", [("full", "fp32"), ("lora", "fp32"), ("full", "bf16")])
def test_the_exact_kl_from_the_bases_stored_hidden_states_equals_the_base_run_beside_the_arm(
        study_config, monkeypatch, which, arm_name, precision):
    """An arm's evaluation given the base's (as the study runs it) applies only the base's output layer to the decoder
    output the base's evaluation stored: every row's KL and NLL equal, bit for bit, those of the same evaluation
    with the whole base run beside the arm (no base given), on the domain (prompts, rows of many lengths) and the
    general set, in fp32 and under bf16 autocast; and the stored batches were used, not the base's decoder."""
    from ftcore import models

    prepared = _prepared(study_config, arms=[arm_name], eval={"every_steps": 0, "precision": precision, "batch_size": 3})
    root = Path(prepared.cfg.artifacts_dir)
    trained = run_step(study.train(_plan(prepared, arm_name), root))
    base = run_step(study.evaluate(prepared, which, BASE))
    lookups = []
    real_call = models.StoredHidden.__call__
    monkeypatch.setattr(models.StoredHidden, "__call__", lambda self, input_ids, attention_mask, **kw:
                        lookups.append(input_ids.shape) or real_call(self, input_ids, attention_mask, **kw))
    stored = run_step(study.evaluate(prepared, which, trained, base))
    batches = len(lookups)
    whole = run_step(study.evaluate(prepared, which, trained))
    assert batches > 1 and len(lookups) == batches  # every batch from the stored states; none without them
    a, b = pd.read_parquet(root / stored.scores), pd.read_parquet(root / whole.scores)
    assert (a["kl_sum"] > 0).any() and a["kl_sum"].tolist() == b["kl_sum"].tolist()
    assert a["nll_sum"].tolist() == b["nll_sum"].tolist() and stored.kl == whole.kl
    assert stored.digest != whole.digest or stored.kl == whole.kl  # two steps (the base is in one's key), one answer


@pytest.mark.parametrize("arm_name", ["full", "lora"])
def test_kl_on_the_domain_matches_a_hand_computation_and_is_zero_for_the_base(study_config, arm_name):
    """KL(base ‖ arm) on the held-out domain completions (Shenfeld et al. 2025): exact, per predicted token."""
    from transformers import AutoModelForCausalLM

    from ftcore import models, perplexity

    prepared = _prepared(study_config, arms=[arm_name], eval={"every_steps": 0})
    root = Path(prepared.cfg.artifacts_dir)
    trained = run_step(study.train(_plan(prepared, arm_name), root))
    arm = run_step(study.evaluate(prepared, "domain", trained))
    rows = perplexity.domain_rows(pd.read_parquet(root / prepared.domain.test))
    base_model = AutoModelForCausalLM.from_pretrained(prepared.model_dir)
    tuned = models.load_trained(root / trained.dir, prepared.model_dir)
    assert arm.kl > 0 and arm.kl == pytest.approx(_kl_by_hand(base_model, tuned, rows), rel=1e-4)
    assert pd.read_parquet(root / arm.docs)["kl_sum"].sum() == pytest.approx(arm.kl * arm.tokens, rel=1e-9)
    itself = perplexity.score_rows(base_model, rows, 8, 0, reference_logits=models.reference_logits(
        "full", base_model, prepared.model_dir))
    assert itself["kl_sum"].abs().max() < 1e-9  # the base against itself


def test_each_curve_point_keeps_its_units_and_kl(study_config):
    """What the matched-gain bootstrap resamples: per held-out document and general window, the NLL and tokens of
    every point (summing to the point's totals), and the point's KL to the base (0 at step 0)."""
    prepared = _prepared(study_config, arms=["lora"], eval={"every_steps": 2, "curve_tokens": 300})
    trained = run_step(study.train(_plan(prepared, "lora"), prepared.cfg.artifacts_dir))
    curve = _curve(prepared.cfg.artifacts_dir, trained)
    for _, p in curve.iterrows():
        assert sum(p["unit_nll"]) / sum(p["unit_tokens"]) == pytest.approx(p["nll"], rel=1e-6)  # per-token NLL is float32
        assert sum(p["unit_tokens"]) == p["tokens"]
    assert curve[curve.step == 0]["kl"].abs().max() < 1e-9 and (curve[curve.step > 0]["kl"] > 0).all()


def test_the_base_is_scored_once_per_batch_and_the_cache_changes_no_number(tiny_model):
    """ReferenceCache: the second pass over the same rows computes no base logits and gives the same KL, bit for
    bit; over its byte budget it keeps nothing and computes every time."""
    from transformers import AutoModelForCausalLM

    from ftcore import models, perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    base = models.reference_logits("full", model, tiny_model)
    calls = []
    counted = lambda ids, mask: calls.append(ids.shape) or base(ids, mask)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    rows = [(ids, ids, len(ids)) for ids in (torch.randint(3, 60, (n,), generator=g).tolist() for n in (9, 7, 12, 5, 8))]
    torch.nn.init.normal_(model.lm_head.weight, std=0.5, generator=g)  # the model is not the base: KL > 0

    def kl(reference):
        return perplexity.score_rows(model, rows, 2, 0, reference_logits=reference)["kl_sum"].to_numpy()

    plain = kl(base)
    cache = curves.ReferenceCache(counted)
    first, second = kl(cache), kl(cache)
    assert len(calls) == 3 and cache.hits == 3  # 5 rows in batches of 2: three base passes, then none
    assert (plain > 0).all() and (first == plain).all() and (second == plain).all()
    calls.clear()
    none_kept = curves.ReferenceCache(counted, max_bytes=0)
    assert (kl(none_kept) == plain).all() and (kl(none_kept) == plain).all() and len(calls) == 6


@pytest.mark.parametrize("arm", ["full", "lora"])
def test_curve_points_are_the_same_with_the_base_kept_or_scored_again(study_config, monkeypatch, arm):
    """Every point's perplexity, KL and per-document units equal bit for bit whether the base's logits are kept
    from the first point or computed again at each (a LoRA arm's base is its own model with the adapter off,
    which training must not reach)."""
    prepared = _prepared(study_config, arms=[arm], eval={"every_steps": 2, "curve_tokens": 300})

    root = Path(prepared.cfg.artifacts_dir)

    def points(max_bytes):
        monkeypatch.setattr(importlib.import_module("ftcore.curves"), "REFERENCE_CACHE_BYTES", max_bytes)
        step = study.train(_plan(prepared, arm), root)
        shutil.rmtree(step.dir, ignore_errors=True)  # trained afresh, not the recorded result
        return _curve(root, run_step(step))

    kept, again = points(2**30), points(0)
    assert len(kept) == 6 and (kept[kept.step > 0]["kl"] > 0).all()
    for column in ["step", "set", "nll", "kl", "unit_nll", "unit_kl"]:
        assert [np.asarray(v).tolist() for v in kept[column]] == [np.asarray(v).tolist() for v in again[column]], column


def test_top_k_kl_is_a_lower_bound_of_the_full_kl():
    from ftcore import perplexity

    torch.manual_seed(0)
    p, q = torch.log_softmax(torch.randn(50, 300) * 3, -1), torch.log_softmax(torch.randn(50, 300) * 3, -1)
    exact = (p.double().exp() * (p.double() - q.double())).sum(-1)
    for k in (1, 8, 64, 299):
        values, ids = p.topk(k, -1)
        approx = perplexity.kl_top_k(q, ids, values)
        assert (approx <= exact * (1 + 1e-5)).all()
    values, ids = p.topk(300, -1)
    assert perplexity.kl_top_k(q, ids, values).numpy() == pytest.approx(exact.numpy(), rel=1e-5)


# --- the analysis: fit, budget table, report -----------------------------------------------------------

def test_the_kls_rank_correlation_with_forgetting_needs_five_points():
    """Over 3 or 4 curve points any ρ is ±1 or near it and could be chance (seen: ρ +1.00 "closely" over n = 3);
    from 5 on it is reported."""
    from ftcore import forgetting

    def points(n):
        return pd.DataFrame([{"arm": "full", "seed": 0, "step": 10 * i, "set": which, "kl": 0.01 * i,
                              "change_pct": 0.5 * i + (0.1 if which == "domain" else 0.0)}
                             for i in range(n + 1) for which in ("domain", "general")])

    for n in (3, 4):
        assert forgetting.kl_predicts(points(n)) == [
            f"KL and forgetting: {n} trained curve points, too few to say how well the KL predicts the general change "
            "(with fewer than 5, no Spearman ρ could be told from chance at 5%)."]
    lines = forgetting.kl_predicts(points(5))
    assert lines[0].startswith("Over n = 5 curve points") and "| KL on the general text | +1.00 | 1.00 |" in lines


def test_the_power_law_fit_recovers_a_known_law_and_says_when_it_cannot():
    from ftcore import forgetting

    t = np.arange(0, 101, 10, dtype=float)
    truth = forgetting.shifted_power_law(t, 0.02, 0.5, 5.0)
    fit = forgetting.fit_power_law(t, truth)
    assert fit["r2"] > 0.9999
    assert fit["predict"](200) == pytest.approx(forgetting.shifted_power_law(200.0, 0.02, 0.5, 5.0), rel=1e-3)
    noise = np.random.default_rng(0).normal(0, 0.05, len(t))
    noise[0] = 0.0
    assert forgetting.fit_power_law(t, noise)["r2"] < forgetting.POOR_FIT  # no law in noise: flagged
    assert "a fit needs" in forgetting.fit_power_law(t[:3], truth[:3])["error"]
