"""Learning and forgetting curves: an arm scored on fixed subsamples of both sets while it trains.

Biderman et al. 2024 ("LoRA Learns Less and Forgets Less") plot learning against forgetting along
training; Kalajdzievski 2024 ("Scaling Laws for Forgetting When Fine-Tuning Large Language
Models") find that forgetting grows as a shifted power law in the update steps. Both need the
arm measured while it trains, not only at its end.

`CurveLog`, a callback of the arm's own trainer, scores the model being trained every
`every_steps` optimizer steps, at step 0 (the model before training: the base, or for QLoRA the
4-bit base) and at the last step, with the final evaluation's scoring code
(`perplexity.score_rows`, the same batch size and precision) on
- domain: the first held-out rows until `tokens` predicted tokens (the split is already random),
- general: the first `tokens` tokens of the general stream, in the final evaluation's windows.
With `tokens` None both are the whole evaluation sets, so the last point is the final evaluation.

Points go to `curves.jsonl` in the arm's directory as they are measured (a resumed arm keeps the
points up to its checkpoint and measures the rest again), to the trainer's loggers (TensorBoard,
W&B: `eval/domain_ppl`, ...), and when the arm ends to `curves.parquet` (step, tokens_seen, set,
ppl, nll, bpb, tokens, change_pct against step 0).

A forgetting budget (ftcore.config `forgetting_budget_pct`): at each point the general change
against step 0 is compared with it; the point within budget with the largest domain gain so far
keeps its trainable weights in `within-budget/step-<N>/` (a full arm: the model's size once, in
fp32; LoRA: the adapter). With `stop_at_budget` the arm stops at the first point over budget and
`train_arm` restores that step's weights before saving the arm. When the arm ends only the best
step's weights stay, and only when they are not the saved model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

from ftcore import models, perplexity
from ftcore.io import atomic_path, write_parquet
from ftcore.plan import CURVE_FRAME, CURVE_LOG, ArmPlan, CurvePlan

log = logging.getLogger("ftcore.curves")
LOG, FRAME = CURVE_LOG, CURVE_FRAME
WITHIN_BUDGET = "within-budget"
POINTS = 10  # about this many points per arm when eval.every_steps is None
SETS = ("domain", "general")


def interval(every_steps: int | None, max_steps: int) -> int:
    """Optimizer steps between two curve points: `every_steps`, or about POINTS points over `max_steps`."""
    return every_steps or max(1, math.ceil(max_steps / POINTS))


def subsample(curve: CurvePlan, root: str | Path) -> dict[str, perplexity.ScoredSet]:
    """What each curve point scores, per set: rows of the final evaluation's, with their documents.

    domain: held-out rows in their order (the split is random) until `curve.tokens` predicted tokens;
    general: the final evaluation's windows (within max_general_tokens), `curve.tokens` predicted tokens'
    worth of them spread evenly over the scored stream, so that the points cover as many documents as the
    final evaluation does (the comparison at equal gain resamples documents). With tokens None: every row.
    """
    root = Path(root)
    domain = perplexity.domain_set(pd.read_parquet(root / curve.domain_rows))
    general = perplexity.general_set(pd.read_parquet(root / curve.general_rows), curve.window, curve.stride,
                                     curve.max_general_tokens)
    if curve.tokens is None:
        return {"domain": domain, "general": general}
    predicted = np.cumsum([_predicted(row) for row in domain.rows])
    domain = domain.take(range(min(len(domain.rows), int(np.searchsorted(predicted, curve.tokens)) + 1)))
    return {"domain": domain, "general": general.take(spread(general.rows, curve.tokens))}


def _predicted(row: tuple[list[int], list[int], int]) -> int:
    return sum(1 for label in row[1][1:] if label != perplexity.IGNORE)


def spread(rows: list[tuple[list[int], list[int], int]], tokens: int) -> list[int]:
    """Indices of rows evenly spaced over `rows`, as few as predict at least `tokens` tokens (all when they
    hold fewer)."""
    counts = np.array([_predicted(row) for row in rows])
    if counts.sum() <= tokens:
        return list(range(len(rows)))
    n = max(1, int(math.ceil(tokens / counts.mean())))
    while True:
        index = sorted(set(np.linspace(0, len(rows) - 1, n).round().astype(int).tolist()))
        if counts[index].sum() >= tokens or n >= len(rows):
            return index
        n += 1


def read_points(out_dir: str | Path) -> list[dict[str, Any]]:
    """The points measured so far (curves.jsonl), oldest first."""
    path = Path(out_dir) / LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def changes(points: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per measured step, the % change of each set's perplexity against step 0 (empty without step 0)."""
    by_step: dict[int, dict[str, float]] = {}
    for p in points:
        by_step.setdefault(p["step"], {})[p["set"]] = p["nll"]
    if 0 not in by_step or len(by_step[0]) < len(SETS):
        return {}
    start = by_step[0]
    return {step: {s: 100 * math.expm1(nll[s] - start[s]) for s in SETS if s in nll}
            for step, nll in sorted(by_step.items()) if len(nll) == len(SETS)}


def best_within(points: list[dict[str, Any]], budget_pct: float) -> tuple[int | None, int | None]:
    """(first step whose general change exceeds the budget, step within it with the largest domain gain).

    Step 0 (no change) is within any budget, so a best step always exists once step 0 is measured;
    ties keep the earlier step.
    """
    first_over, best, best_domain = None, None, math.inf
    for step, change in changes(points).items():
        if change["general"] > budget_pct:
            first_over = step if first_over is None else first_over
        elif change["domain"] < best_domain:
            best, best_domain = step, change["domain"]
    return first_over, best


def write_frame(out_dir: str | Path) -> Path:
    """curves.parquet from curves.jsonl, with each point's % change against step 0."""
    points = read_points(out_dir)
    columns = ["step", "tokens_seen", "set", "ppl", "nll", "bpb", "tokens", "unit_nll", "unit_tokens"]
    df = pd.DataFrame(points, columns=columns + (["kl", "unit_kl"] if points and "kl" in points[0] else []))
    start = df[df.step == 0].set_index("set")["nll"]
    df["change_pct"] = [100 * math.expm1(n - start[s]) if s in start else float("nan") for s, n in zip(df["set"], df["nll"])]
    return write_parquet(df, Path(out_dir) / FRAME)


# --- the weights of the best step within the budget -------------------------------------------------

def snapshots(out_dir: str | Path) -> dict[int, Path]:
    root = Path(out_dir) / WITHIN_BUDGET
    found = {int(p.name.split("-")[1]): p for p in root.glob("step-*")} if root.is_dir() else {}
    return dict(sorted(found.items()))


def save_snapshot(model: torch.nn.Module, out_dir: str | Path, step: int) -> Path:
    """The model's trainable weights at `step` (safetensors), written atomically."""
    from safetensors.torch import save_file

    weights = {name: p.detach().to("cpu", copy=True).contiguous()
               for name, p in model.named_parameters() if p.requires_grad}
    with atomic_path(Path(out_dir) / WITHIN_BUDGET / f"step-{step}") as tmp:
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / "trainable.safetensors"))
    return Path(out_dir) / WITHIN_BUDGET / f"step-{step}"


def restore_snapshot(model: torch.nn.Module, snapshot: str | Path) -> None:
    """Load the trainable weights of a snapshot back into `model`. Raises RuntimeError when they do not
    match the model's trainable parameters (a snapshot of another arm)."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(snapshot) / "trainable.safetensors"))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise RuntimeError(f"{snapshot} does not hold this model's trainable weights")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))


# --- the callback ----------------------------------------------------------------------------------

@contextlib.contextmanager
def without_training_autocast(model: torch.nn.Module):
    """The model's own forward while scoring: under mixed precision accelerate wraps `model.forward` in
    the training autocast (keeping the unwrapped one as `_original_forward`), which would score the
    points in bf16 instead of the evaluation's precision (and on a CPU without native bf16, 6x slower)."""
    original = model.__dict__.get("_original_forward")
    if original is None:
        yield
        return
    wrapped = model.forward
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


class CurveLog(TrainerCallback):
    """Score the model being trained on the curve subsamples; keep and act on the forgetting budget.

    `emit` receives each point's metrics for the trainer's loggers (Trainer.log). `pad_id` pads the
    scored batches as in the final evaluation.
    """

    def __init__(self, curve: CurvePlan, root: str | Path, out_dir: str | Path, resume_step: int, pad_id: int,
                 label: str = "train", base_dir: str | Path | None = None, method: str = "full"):
        self.curve, self.out_dir, self.pad_id, self.label = curve, Path(out_dir), pad_id, label
        self.rows = subsample(curve, root)
        self.emit = None
        self.seconds = 0.0
        self.base_dir, self.method, self._reference = base_dir, method, None
        self._forget_after(resume_step)

    def _forget_after(self, step: int) -> None:
        """Drop points and snapshots past the resume step: the steps after it are trained again."""
        path = self.out_dir / LOG
        if path.is_file():
            kept = [p for p in read_points(self.out_dir) if p["step"] <= step]
            path.write_text("".join(json.dumps(p) + "\n" for p in kept))
        for s, snap in snapshots(self.out_dir).items():
            if s > step:
                shutil.rmtree(snap, ignore_errors=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.every = interval(self.curve.every_steps, state.max_steps)
        if state.global_step == 0 and not any(p["step"] == 0 for p in read_points(self.out_dir)):
            self._measure(model, state, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._measure(model, state, control)

    def on_save(self, args, state, control, **kwargs):
        # Once a checkpoint at or after the best step exists, no resume can go back before it: older
        # snapshots are not needed any more.
        found = snapshots(self.out_dir)
        if found:
            newest = max(found)
            for step, snap in found.items():
                if step != newest and newest <= state.global_step:
                    shutil.rmtree(snap, ignore_errors=True)

    def _measure(self, model, state, control) -> None:
        started = time.perf_counter()
        training = model.training
        points = [self._score(model, state, s) for s in SETS]
        model.train(training)
        with open(self.out_dir / LOG, "a") as f:
            f.writelines(json.dumps(p) + "\n" for p in points)
        self.seconds += time.perf_counter() - started
        change = changes(read_points(self.out_dir)).get(state.global_step, {})
        log.info("%s: step %d: %s (%.1fs)", self.label, state.global_step, ", ".join(
            f"{p['set']} ppl {p['ppl']:.3f}" + (f" ({change[p['set']]:+.1f}%)" if p["set"] in change else "")
            for p in points), time.perf_counter() - started)
        if self.emit is not None:
            # Trainer.log clears the step's pending loss log (should_log); keep it, or the loss of every
            # step with a curve point would go unlogged.
            should_log = control.should_log
            self.emit({f"eval_{p['set']}_{k}": p[k] for p in points for k in ("ppl", "bpb")})
            control.should_log = should_log
        if self.curve.budget_pct is not None:
            self._budget(model, state, control)

    def _score(self, model, state, which: str) -> dict[str, Any]:
        rows = self.rows[which]
        with without_training_autocast(model):
            scores = perplexity.score_rows(model, rows.rows, self.curve.batch_size, self.pad_id,
                                           self.curve.precision, label=f"{self.label}-curve-{which}",
                                           keep_tokens=rows.token_docs is not None,
                                           reference_logits=self.reference(model) if self.curve.kl else None)
        s = perplexity.summarize(scores)
        # Per-document sums (a held-out abstract; a general article): what the comparison at equal domain gain
        # resamples (ftcore.matched_gain).
        docs = rows.per_document(scores)
        units = {"unit_nll": docs["nll_sum"].tolist(), "unit_tokens": docs["n_tokens"].astype(int).tolist()}
        if "kl_sum" in docs:
            units |= {"kl": s["kl"], "unit_kl": docs["kl_sum"].tolist()}
        return {"step": state.global_step, "tokens_seen": int(getattr(state, "num_input_tokens_seen", 0) or 0),
                "set": which, "ppl": s["ppl"], "nll": s["nll"], "bpb": s["bpb"], "tokens": s["tokens"], **units}

    def reference(self, model):
        """The base's logits beside the model being trained, for the points' KL (ftcore.models.reference_logits):
        a LoRA model with its adapter off; for a full arm the base, loaded once on the model's device. Either way
        computed once per batch and kept (ReferenceCache)."""
        if self._reference is None:
            self._reference = ReferenceCache(models.reference_logits(self.method, model, self.base_dir,
                                                                     str(next(model.parameters()).device)))
        return self._reference

    def _budget(self, model, state, control) -> None:
        first_over, best = best_within(read_points(self.out_dir), self.curve.budget_pct)
        if best == state.global_step:
            save_snapshot(model, self.out_dir, best)
            log.info("%s: step %d is the best within the forgetting budget so far (weights kept)", self.label, best)
        if first_over == state.global_step:
            log.info("%s: step %d is the first over the forgetting budget of %.1f%%", self.label, first_over,
                     self.curve.budget_pct)
            if self.curve.stop_at_budget:
                control.should_training_stop = True


# What the base's curve-point logits may hold in memory: demo-base's (4 batches of up to 8 x 256 positions of a
# 262k vocabulary in bf16) take 2.4 GB (BENCHMARKS.md §12).
REFERENCE_CACHE_BYTES = 4 * 2**30


class ReferenceCache:
    """`logits(input_ids, attention_mask)` of the base, each batch computed once and then reused.

    The base does not change while an arm trains (a full or QLoRA arm's is a second, frozen model loaded beside it;
    a LoRA arm's is its own frozen weights with the adapter off) and every point scores the same batches, so a
    later point's KL is the one recomputing would give, bit for bit, for half of the point's model passes.
    Batches are known by
    their token ids and mask; kept on the CPU (a GPU keeps its memory for training), at most `max_bytes`
    of them, the rest computed each time.
    """

    def __init__(self, logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_bytes: int | None = None):
        self.logits = logits
        self.max_bytes = REFERENCE_CACHE_BYTES if max_bytes is None else max_bytes
        self.kept: dict[tuple, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        key = (tuple(input_ids.shape), input_ids.cpu().numpy().tobytes(), attention_mask.cpu().numpy().tobytes())
        if key in self.kept:
            self.hits += 1
            return self.kept[key].to(input_ids.device)
        out = self.logits(input_ids, attention_mask)
        size = out.numel() * out.element_size()
        if self.bytes + size <= self.max_bytes:
            self.kept[key] = out.to("cpu", copy=True)  # `out` may be a reused buffer (ftcore.models.ReusedLogits)
            self.bytes += size
        return out

    def release(self) -> None:
        """The base's buffer dropped when a point's pass ends (what it kept stays): not held while the arm trains."""
        if hasattr(self.logits, "release"):
            self.logits.release()


def stop_at_budget(model: torch.nn.Module, plan: ArmPlan, out_dir: str | Path) -> dict[str, Any] | None:
    """The forgetting budget's outcome for a trained arm (None without a budget); when the arm stopped at
    the budget, its best step's weights are restored into `model`, which is then saved as the arm.

    Raises RuntimeError when that step's snapshot is missing (it is kept until a later best replaces it).
    """
    curve = plan.curve
    if curve is None or curve.budget_pct is None:
        return None
    points = read_points(out_dir)
    first_over, best = best_within(points, curve.budget_pct)
    last = max(p["step"] for p in points)
    stopped = curve.stop_at_budget and first_over is not None
    if stopped and best != last:
        found = snapshots(out_dir)
        if best not in found:
            raise RuntimeError(f"{out_dir}: the weights of step {best}, the best within the forgetting budget, are missing")
        restore_snapshot(model, found[best])
        log.info("stopped at step %d (over the forgetting budget); the arm is its step %d", first_over, best)
    model_step = best if stopped else last
    # Only the best step's weights stay, and only when they are not the arm's saved model already.
    for step, snap in snapshots(out_dir).items():
        if step != best or best == model_step:
            shutil.rmtree(snap, ignore_errors=True)
    return {"budget_pct": curve.budget_pct, "first_over_step": first_over, "best_step": best,
            "stopped_at_step": first_over if stopped else None, "model_step": model_step,
            "best_weights": f"{WITHIN_BUDGET}/step-{best}" if best != model_step else None}
