"""Where a finished study's time went: each stage's seconds from its steps' own timing, and each model stage's
throughput as a share of this CPU's matrix-multiply peak, measured in the same script.

    .venv/bin/python -m bench.breakdown --preset demo-base [--wall 3150] [--set key=value ...]

Run it after the study (`make demo-base`), on the same artifacts root and machine, with the code the study ran
(a later edit to a step's code gives it another key): it re-plans the study (every step a cache hit: nothing
is trained or scored again) and reads each step's `timing.json`. `--wall` is
the study's whole wall time in seconds (e.g. from `/usr/bin/time`); the rest of it (process start, the Prefect
server, waiting between steps) is shown as one row.

Model FLOPs per token (Kaplan et al. 2020, Table 1; PaLM's MFU convention, Chowdhery et al. 2022, App. B:
recomputation under gradient checkpointing is not counted): a forward pass is 2 × the weights of every linear
layer (the output layer included, tied or not) + 2 × n_layer × n_ctx × d_attn for attention; full fine-tuning
trains at 3 forwards per token, LoRA at 2 (the frozen weights get no gradient, the activations still do). The
curve points score the arm at every point and the base beside it once, at the first (its logits kept for the later
points, `curves.ReferenceCache`, where they fit its budget, as demo-base's do); an arm's evaluation, given the
base's stored decoder output (`models.StoredHidden`), 1 forward and the base's output layer (2 × its weights).
The peak is a 4096² linear layer on 4096 rows, bf16 under autocast where the CPU computes bf16 natively (what
precision 'auto' trains and scores in there), else fp32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from bench.common import record
from bench.precision import gflops
from ftcore import self_replay, study
from ftcore.config_files import load_config
from ftcore.inputs import check_inputs
from ftcore.results import Fingerprint
from ftcore.steps import TIMING, recorded
from ftcore.hardware import cpu_has_native_bf16


def seconds(step) -> float:
    path = step.dir / TIMING
    if not path.is_file():
        raise SystemExit(f"breakdown: {step.dir} has no {TIMING}: run the study first, on this artifacts root")
    return json.loads(path.read_text())["seconds"]


def forward_flops(model_dir: Path, n_ctx: int) -> tuple[float, float]:
    """Model FLOPs of one forward pass per token, 2 × linear weights + 2 × n_layer × n_ctx × d_attn, and of its
    output layer alone (2 × its weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    text = config.get_text_config()
    d_attn = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    return 2.0 * linear + 2.0 * text.num_hidden_layers * n_ctx * d_attn, 2.0 * model.get_output_embeddings().weight.numel()


def peak_gflops(size: int = 4096) -> tuple[float, str]:
    """The matmul peak of this CPU in the precision 'auto' uses here (bf16 autocast where native, else fp32)."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(size, size), torch.randn(size, size)
    native = cpu_has_native_bf16()

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=native):
            return layer(x)

    return gflops(run, 2.0 * size**3, 5), "bf16" if native else "fp32"


def stage(name: str, secs: float, tokens: float | None = None, flops_per_token: float | None = None) -> dict:
    row = {"stage": name, "seconds": round(secs, 1)}
    if tokens:
        row |= {"tokens": int(tokens), "tokens_per_s": round(tokens / secs, 1)}
        if flops_per_token:
            row["gflops_per_s"] = round(tokens * flops_per_token / secs / 1e9, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo-base")
    parser.add_argument("--wall", type=float, default=None, help="the study's whole wall time, seconds")
    parser.add_argument("--set", action="append", default=[], help="key=JSON override, as ftstudy run --set")
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    inputs = check_inputs(load_config(args.preset, **overrides), arms_in_process=False)
    p = study.prepare(inputs)
    cfg, root = p.cfg, p.root
    fwd, head = forward_flops(p.model_dir, cfg.chunk_len)
    own = study.own_role(cfg) if getattr(cfg, "self_replay", None) is not None else None  # generated, not read
    read = [r for r in inputs.versions if r != own]
    rows = [stage("fingerprint corpora", sum(seconds(study.fingerprint(inputs, r)) for r in read)),
            stage("fetch model", seconds(study.fetch_model(inputs)))]
    corpus = {r: recorded(study.fingerprint(inputs, r)) for r in read}
    tokenize = [study.tokenize_domain(cfg, p.model, corpus["domain"]),
                *(study.tokenize_stream(cfg, r, p.model, corpus[r]) for r in ("general", "replay") if r in corpus)]
    if p.generated:
        gen = p.generated
        tokenize.append(study.tokenize_stream(cfg, own, p.model, Fingerprint(digest=gen.digest, documents=gen.samples),
                                              self_replay.as_corpus(cfg.self_replay, root / gen.path)))
    rows.append(stage("tokenize", sum(seconds(s) for s in tokenize)))
    if p.generated:
        rows.append(stage("generate replay", seconds(study.generate_replay(inputs, p.model, p.domain, p.general)),
                          gen.tokens, fwd))
    domain_in = int(pd.read_parquet(root / p.domain.test, columns=["input_ids"])["input_ids"].map(len).sum())
    evals = []
    for which in ("domain", "general"):
        step = study.evaluate(p, which, study.BASE)
        value = recorded(step)
        evals.append(value)
        rows.append(stage(f"evaluate base, {which}", seconds(step), domain_in if which == "domain" else value.tokens, fwd))
    arms = []
    for plan in study.plan_arms(p):
        step = study.train(plan, root)
        arm = recorded(step)
        arms.append(arm)
        summary = arm.summary
        curve_s = summary.get("curve_seconds") or 0.0
        per_step = cfg.train.batch_size * cfg.train.grad_accum * summary["tokens_per_epoch"] / summary["rows"]
        trained = per_step * summary["steps"]
        rows.append(stage(f"train {plan.label} ({plan.method})", seconds(step) - curve_s, trained,
                          fwd * (3 if plan.method == "full" else 2)))
        if curve_s:
            points = [json.loads(line) for line in (root / arm.dir / "curves.jsonl").read_text().splitlines()]
            # curve_seconds times every point, step 0 (the model before training) included: so do the tokens.
            n_points, scored = len({pt["step"] for pt in points}), sum(pt["tokens"] for pt in points)
            rows.append(stage(f"curves {plan.label} ({n_points} points)", curve_s, scored,
                              fwd * (1 + 1 / n_points)))  # the base once, at the first point
        for base in evals[:2]:  # the base's evaluations, as run_study hands them to an arm's
            e = study.evaluate(p, base.set, arm, base)
            value = recorded(e)
            evals.append(value)
            beside = "base's output layer" if base.hidden else "base"
            rows.append(stage(f"evaluate {plan.label}, {base.set} (+ {beside} for KL)", seconds(e),
                              domain_in if base.set == "domain" else value.tokens, fwd + (head if base.hidden else fwd)))
    rows.append(stage("report", seconds(study.write_report(p, evals, arms, {}, None))))
    total = sum(r["seconds"] for r in rows)
    if args.wall:
        rows.append(stage("process start, server, orchestration, waits", args.wall - total))
    peak, dtype = peak_gflops()
    for r in rows:
        if "gflops_per_s" in r:
            r["share_of_peak"] = round(r["gflops_per_s"] / peak, 3)
        r["share_of_time"] = round(r["seconds"] / (args.wall or total), 3)
    record(f"breakdown-{args.preset}", {
        "preset": args.preset, "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
        "peak_gflops": round(peak, 1), "peak_dtype": dtype, "forward_gflop_per_token": round(fwd / 1e9, 4),
        "steps_seconds": round(total, 1), "wall_seconds": args.wall, "stages": rows})


if __name__ == "__main__":
    main()
