"""Speed options for training and evaluation on this CPU, each against today's code in the same script.

    .venv/bin/python -m bench.options [--preset demo-base] [--steps 3] [--repeats 2] [--only NAME ...] [--out NAME]

Each variant runs in its own process (so no allocator or thread state carries over), interleaved over the
repeats, on the preset's own model and rows (curves off): training variants train the preset's arm for
`--steps` steps into a temporary directory; evaluation variants score the general set's first 4096 tokens
with the base model. Reported per variant: tokens/s, the training loss or perplexity (an option that changes
them beyond the report's noise is not kept), user/system CPU seconds and peak RSS. The variants:

- full-own-loss / lora-own-loss: the model's own loss (every position's logits at once): the code before
  ftcore.chunked_loss;
- full / lora: today's trainer (the loss through the output layer 256 positions at a time, ftcore.chunked_loss);
- full-foreach: AdamW's multi-tensor (foreach) implementation instead of the fused one (transformers' default
  on torch >= 2.8);
- lora-bf16-base: the frozen base model's weights held in bf16 instead of fp32 under autocast;
- full-compile / lora-compile: the decoder under `torch.compile` (inductor, dynamic shapes: rows differ in
  length); eval-compile: the model's forward under it for scoring. Their first step (or first half of the
  evaluation) includes compiling: `tokens_per_s` counts it, `steady_tokens_per_s` is the steps after the first
  (evaluation: the second of two passes over the rows), `first_step_s` / `compile_s` what compiling cost;
- eval-b4 / eval (batch 8, today) / eval-b16: evaluation batch size;
- curve-point / curve-point-recomputed: one curve point of the preset's full arm (both sets, the exact KL, the
  base beside it) after a first one, with the base's logits kept from the first (curves.ReferenceCache, today)
  or computed again (before).

Training variants also report `steady_tokens_per_s` (steps after the first) and `first_step_s`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from bench.common import ROOT, record, run_child

TRAIN = ("full-own-loss", "full", "full-foreach", "full-compile", "lora-own-loss", "lora", "lora-bf16-base",
         "lora-compile")
EVAL = ("eval-b4", "eval", "eval-b16", "eval-compile", "curve-point", "curve-point-recomputed")


def child(preset: str, variant: str, steps: int) -> None:
    import tempfile

    import pandas as pd
    import torch

    from bench.common import Clock
    from ftcore import chunked_loss, models, perplexity, study, training
    from ftcore.config_files import load_config
    from ftcore.inputs import check_inputs

    base = load_config(preset)
    cfg = load_config(preset, artifacts_dir=str(ROOT / "bench-artifacts" / preset),
                      train={**base.train.model_dump(), "max_steps": steps, "logging_steps": 1},
                      eval={**base.eval.model_dump(), **({} if variant.startswith("curve") else {"every_steps": 0})})
    p = study.prepare(check_inputs(cfg, arms_in_process=True))
    result: dict = {"variant": variant}
    if variant.startswith("curve-point"):
        result.update(curve_point(p, variant))
    elif variant.startswith("eval"):
        batch = int(variant.split("-b")[1]) if "-b" in variant else cfg.eval.batch_size
        model = models.load_model(p.model_dir)
        if variant == "eval-compile":
            model.compile(dynamic=True)
        rows = perplexity.general_set(pd.read_parquet(p.root / p.general.path), cfg.chunk_len, cfg.eval.stride,
                                      4096).rows
        pad = models.load_tokenizer(p.model_dir).pad_token_id
        start = time.perf_counter()
        scores = perplexity.score_rows(model, rows, batch, pad, p.cfg.eval.precision)
        seconds = time.perf_counter() - start
        summary = perplexity.summarize(scores)
        result.update(tokens_per_s=summary["tokens"] / seconds, ppl=summary["ppl"])
        if variant == "eval-compile":  # a second pass: compiled already
            start = time.perf_counter()
            again = perplexity.summarize(perplexity.score_rows(model, rows, batch, pad, p.cfg.eval.precision))
            steady = time.perf_counter() - start
            result.update(steady_tokens_per_s=again["tokens"] / steady, compile_s=seconds - steady,
                          ppl_again=again["ppl"])
    else:
        arm = variant.split("-")[0]
        if variant.endswith("own-loss"):
            chunked_loss.supports = lambda model: False
        if variant == "full-foreach":
            original = training.sft_config

            def foreach(*a, **k):
                args = original(*a, **k)
                args.optim = "adamw_torch"  # torch.optim.AdamW, foreach on by default
                return args

            training.sft_config = foreach
        if variant == "lora-bf16-base":
            load = training.load_model
            training.load_model = lambda path: load(path).to(torch.bfloat16)
        if variant.endswith("compile"):
            start_model = training.starting_model

            def compiled(*a, **k):
                model = start_model(*a, **k)
                # The decoder: the chunked loss calls it directly, then the output layer itself.
                (model.get_base_model() if hasattr(model, "get_base_model") else model).get_decoder().compile(
                    dynamic=True)
                return model

            training.starting_model = compiled
        plan = next(x for x in study.plan_arms(p) if x.name == arm)
        clock = Clock()
        with tempfile.TemporaryDirectory() as out:
            summary = training.train_arm(plan.model_copy(update={"dir": out}), p.root, callbacks=[clock])
        trained = summary["tokens_per_epoch"] / summary["rows"] * cfg.train.batch_size * cfg.train.grad_accum * steps
        later = clock.step_seconds[1:]
        result.update(tokens_per_s=trained / clock.seconds, loss=summary["train_loss"],
                      steady_tokens_per_s=trained / steps * len(later) / sum(later) if later else None,
                      first_step_s=clock.step_seconds[0])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(user_s=usage.ru_utime, system_s=usage.ru_stime, peak_rss_gb=usage.ru_maxrss / 2**20)
    print(json.dumps(result))


def curve_point(p, variant: str) -> dict:
    """A curve point as CurveLog scores it (both sets, KL to the base loaded beside), timed after a first point."""
    from ftcore import curves, models, perplexity, study

    plan = next(x for x in study.plan_arms(p) if x.method == "full")
    curve = plan.curve
    model = models.load_model(p.model_dir)
    sets = curves.subsample(curve, p.root)
    reference = curves.ReferenceCache(models.reference_logits("full", model, p.model_dir),
                                      max_bytes=0 if variant.endswith("recomputed") else None)
    pad = models.load_tokenizer(p.model_dir).pad_token_id

    def point() -> tuple[float, int, float]:
        start, tokens, kl = time.perf_counter(), 0, 0.0
        for rows in sets.values():
            s = perplexity.summarize(perplexity.score_rows(model, rows.rows, curve.batch_size, pad, curve.precision,
                                                           reference_logits=reference))
            tokens, kl = tokens + s["tokens"], kl + s["kl"]
        return time.perf_counter() - start, tokens, kl

    first, tokens, _ = point()
    seconds, _, kl = point()
    return {"tokens_per_s": tokens / seconds, "point_s": seconds, "first_point_s": first, "kl": kl,
            "kept_gb": reference.bytes / 1e9, "hits": reference.hits}


def _before(variant: str) -> bool:
    """A variant that is the code before a kept option: its ratio is today's against it."""
    return variant.endswith(("own-loss", "recomputed"))


def run(preset: str, variant: str, steps: int) -> dict:
    return run_child("bench.options", ["--child", variant, "--preset", preset, "--steps", str(steps)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo-base")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=TRAIN + EVAL)
    parser.add_argument("--out", help="results name under bench/results (default: options-PRESET)")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(args.preset, args.child, args.steps)
    variants = args.only or list(TRAIN + EVAL)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):  # interleaved, so drift of the machine hits every variant alike
        for variant in variants:
            runs[variant].append(run(args.preset, variant, args.steps))
            print(json.dumps(runs[variant][-1]), flush=True)
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "variant" and rs[0][k] is not None}
           for v, rs in runs.items()}
    ratios = {}
    for variant, today in (("full-own-loss", "full"), ("full-foreach", "full"), ("lora-own-loss", "lora"),
                           ("lora-bf16-base", "lora"), ("eval-b4", "eval"), ("eval-b16", "eval"),
                           ("full-compile", "full"), ("lora-compile", "lora"), ("eval-compile", "eval"),
                           ("curve-point-recomputed", "curve-point")):
        if variant in med and today in med:
            ratios[f"{today} / {variant}" if _before(variant) else f"{variant} / {today}"] = round(
                (med[today]["tokens_per_s"] / med[variant]["tokens_per_s"]) if _before(variant)
                else (med[variant]["tokens_per_s"] / med[today]["tokens_per_s"]), 3)
    for variant, today in (("full-compile", "full"), ("lora-compile", "lora"), ("eval-compile", "eval")):
        if variant in med and today in med and "steady_tokens_per_s" in med[variant]:
            ratios[f"{variant} / {today}, compiled (steady)"] = round(
                med[variant]["steady_tokens_per_s"] / med[today].get("steady_tokens_per_s", med[today]["tokens_per_s"]), 3)
    record(args.out or f"options-{args.preset}", {"preset": args.preset, "steps": args.steps, "repeats": args.repeats,
                                      "median": med, "ratios": ratios, "runs": runs})


if __name__ == "__main__":
    main()
