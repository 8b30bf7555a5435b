"""Peak resident memory of each stage with the demo model (SmolLM2-135M), each stage in a fresh process.

    .venv/bin/python bench/memory.py

Stages: tokenize (domain, instruction format), eval (base model, 16 general windows), train-full and
train-lora (2 optimizer steps, batch 8, bf16 autocast), eval-lora (base + adapter merged, 16 windows).
For scale: the import of torch/transformers/trl alone, and the fp32 weights' size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from bench.common import ROOT, demo_config, peak_rss_mb, prepared, record

STAGES = ("imports", "tokenize", "eval", "train-full", "train-lora", "eval-lora")


def run_stage(stage: str, work: Path) -> None:
    from ftcore import chunking, corpora, models, perplexity, study, training

    if stage == "imports":
        print(json.dumps({"stage": stage, "peak_rss_mb": round(peak_rss_mb()), "rss_before_stage_mb": round(peak_rss_mb())}))
        return
    cfg = demo_config(train={**demo_config().train.model_dump(), "max_steps": 2})
    data = prepared(cfg)
    windows = perplexity.stream_windows(pd.read_parquet(data.root / data.general.path), cfg.chunk_len)[:16]
    before = peak_rss_mb()
    if stage == "tokenize":
        tokenizer = models.load_tokenizer(data.model_dir)
        corpus = corpora.load_corpus(cfg.domain, "domain", cfg.format)
        chunking.tokenize_instruction(corpus.records, cfg.format, tokenizer, cfg.chunk_len)
    elif stage == "eval":
        perplexity.score_rows(models.load_model(data.model_dir), windows, cfg.eval.batch_size)
    elif stage.startswith("train-"):
        arm = stage.split("-")[1]
        plan = next(p for p in study.plan_arms(data) if p.name == arm)
        # An absolute dir outside the artifacts root: a fresh training, not the cached arm.
        training.train_arm(plan.model_copy(update={"dir": str(work / arm)}), data.cfg.artifacts_dir)
    elif stage == "eval-lora":
        perplexity.score_rows(models.load_trained(work / "lora", data.model_dir), windows, cfg.eval.batch_size)
    print(json.dumps({"stage": stage, "peak_rss_mb": round(peak_rss_mb()), "rss_before_stage_mb": round(before)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.stage:
        return run_stage(args.stage, Path(args.work))
    cfg = demo_config()
    weights_mb = sum(p.stat().st_size for p in prepared(cfg).model_dir.glob("*.safetensors")) / 2**20
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for stage in STAGES:
            out = subprocess.run([sys.executable, "-m", "bench.memory", "--stage", stage, "--work", work], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout
            results[stage] = json.loads(out.strip().splitlines()[-1])
    record("memory", {"model": "SmolLM2-135M", "fp32_weights_mb": round(weights_mb),
                      "stages": {s: {k: v for k, v in r.items() if k != "stage"} for s, r in results.items()}})


if __name__ == "__main__":
    main()
