"""What the learning curves and the KL cost, and how exact the top-k KL is, on the demo's model and data.

    .venv/bin/python -m bench.curves [--steps 6] [--every 3] [--tokens 4096]

In one script, on the demo's full arm (SmolLM2-135M, batch 8, chunk_len 256, the demo preset's
training precision), trained into scratch directories:
- the arm for `--steps` steps with curves every `--every` steps at the demo's curve settings, and the
  same arm without curves: the ratio of the two training walls, and from the run with curves the
  cost of one point and of one step, hence the share the demo's own settings (6 points over 30
  steps) add to an arm;
- the general evaluation (`--tokens` tokens of the stream) of the base without and with storing its
  top-k (`--top-k`), and of the trained arm without and with the top-k KL: its added evaluation time;
- the top-k KL against the exact full-vocabulary KL on those tokens (bench/kl.py).
Results: bench/results/curves.json (BENCHMARKS.md, section 9).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench.common import demo_config, prepared, record
from bench.kl import top_k_errors
from ftcore import curves, models, perplexity, study, training


def train(data, steps: int, every: int | None, out: Path) -> dict:
    """The demo's full arm for `steps` steps into `out` (curves every `every` steps, or none); its wall and summary."""
    plan = next(p for p in study.plan_arms(data) if p.name == "full")
    update = {"train": plan.train.model_copy(update={"max_steps": steps, "save_steps": 10**6}), "dir": str(out)}
    update["curve"] = plan.curve.model_copy(update={"every_steps": every}) if every else None
    started = time.perf_counter()
    summary = training.train_arm(plan.model_copy(update=update), data.cfg.artifacts_dir)
    return {"wall_s": time.perf_counter() - started, "summary": summary,
            "points": len({p["step"] for p in curves.read_points(out)}) if every else 0}


def timed_scores(model, rows, batch: int, **kw) -> tuple[float, pd.DataFrame]:
    started = time.perf_counter()
    scores = perplexity.score_rows(model, rows, batch, 0, "fp32", **kw)
    return time.perf_counter() - started, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=64, help="k of the top-k KL whose cost is measured")
    args = parser.parse_args()
    cfg = demo_config()
    data = prepared(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        with_curves = train(data, args.steps, args.every, Path(tmp) / "with")
        without = train(data, args.steps, None, Path(tmp) / "without")
        point_s = with_curves["summary"]["curve_seconds"] / with_curves["points"]
        step_s = (with_curves["summary"]["seconds"] - with_curves["summary"]["curve_seconds"]) / args.steps
        demo_points = len(range(0, cfg.train.max_steps + 1, cfg.eval.every_steps))
        demo_share = demo_points * point_s / (cfg.train.max_steps * step_s)

        rows = perplexity.stream_windows(pd.read_parquet(data.root / data.general.path), cfg.chunk_len, None,
                                         args.tokens)
        base = models.load_model(data.model_dir)
        plain_s, _ = timed_scores(base, rows, cfg.eval.batch_size)
        topk_s, ref = timed_scores(base, rows, cfg.eval.batch_size, top_k=args.top_k)
        del base
        arm = models.load_trained(Path(tmp) / "with", data.model_dir, "cpu")
        arm_plain_s, _ = timed_scores(arm, rows, cfg.eval.batch_size)
        arm_kl_s, _ = timed_scores(arm, rows, cfg.eval.batch_size, reference=perplexity.top_k_reference(ref))
        del arm
        errors = top_k_errors(data.model_dir, Path(tmp) / "with", rows)
    record("curves", {
        "arm": "full", "steps": args.steps, "every": args.every, "curve_tokens": cfg.eval.curve_tokens,
        "precision": cfg.precision, "eval_precision": cfg.eval.precision,
        "train_wall_with_curves_s": with_curves["wall_s"], "train_wall_without_s": without["wall_s"],
        "ratio_with_over_without": with_curves["wall_s"] / without["wall_s"], "points": with_curves["points"],
        "seconds_per_point": point_s, "seconds_per_step": step_s,
        "demo_points": demo_points, "demo_steps": cfg.train.max_steps, "demo_added_share_of_training": demo_share,
        "general_eval_tokens": args.tokens, "base_eval_s": plain_s, "base_eval_with_top_k_s": topk_s,
        "arm_eval_s": arm_plain_s, "arm_eval_with_kl_s": arm_kl_s,
        "top_k_error": errors,
    })


if __name__ == "__main__":
    main()
