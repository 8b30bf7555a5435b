"""Training throughput of each arm against a plain transformers Trainer on the same rows and settings.

    .venv/bin/python bench/train.py [--steps 3] [--repeats 3] [--arms full lora]

Same model (SmolLM2-135M), same tokenized domain rows (the demo's, ≤256 tokens), batch 8, bf16
autocast, the demo's learning rates, same seed. ftcore's arm is `ftcore.training.train_arm`
(TRL's SFTTrainer, completion-only loss, loss log, progress file, TensorBoard); the baseline is
`transformers.Trainer` with a padding collator and labels = -100 outside the completion, nothing
else. Both count non-padding input tokens (`include_num_input_tokens_seen`); the ratio is of
tokens per second of `trainer.train()` itself (model loading and saving excluded for both).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import datasets
import pandas as pd
import torch
from transformers import Trainer, TrainingArguments

from bench.common import Clock, demo_config, prepared, record
from ftcore import models, study, training


def ftcore_arm(data, arm) -> float:
    plan = next(p for p in study.plan_arms(data) if p.name == arm)
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        original = training.sft_config

        def counting(*a, **k):  # the arm's own SFTConfig, plus the token counter the baseline uses
            args = original(*a, **k)
            args.include_num_input_tokens_seen = "non_padding"
            return args

        training.sft_config = counting
        try:
            # An absolute dir outside the artifacts root: a fresh training, not the cached arm.
            training.train_arm(plan.model_copy(update={"dir": out}), data.cfg.artifacts_dir, callbacks=[clock])
        finally:
            training.sft_config = original
    return clock.tokens / clock.seconds


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attention[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def plain_trainer(cfg, arm, model_dir, train_path) -> float:
    rows = pd.read_parquet(train_path)[["input_ids", "labels"]]
    dataset = datasets.Dataset.from_pandas(rows, preserve_index=False)
    model = models.load_model(model_dir)
    if arm == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, training.peft_config(cfg.lora))
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.train.batch_size, gradient_accumulation_steps=cfg.train.grad_accum,
            learning_rate=cfg.lora.learning_rate if arm == "lora" else cfg.train.learning_rate, max_steps=cfg.train.max_steps,
            bf16=True, use_cpu=True, seed=cfg.train.seed, data_seed=cfg.train.seed, save_strategy="no", report_to=[],
            logging_steps=cfg.train.logging_steps, disable_tqdm=True, remove_unused_columns=False,
            include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        )
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[clock]).train()
    return clock.tokens / clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=["full", "lora"])
    args = parser.parse_args()
    cfg = demo_config(train={**demo_config().train.model_dump(), "max_steps": args.steps, "logging_steps": 1})
    data = prepared(cfg)
    results = {}
    for arm in args.arms:
        ours, base = [], []
        for _ in range(args.repeats):  # interleaved, so drift of the machine hits both alike
            ours.append(ftcore_arm(data, arm))
            base.append(plain_trainer(cfg, arm, data.model_dir, data.root / data.domain.train))
        results[arm] = {"ftcore_tokens_per_s": round(statistics.median(ours), 1),
                        "plain_trainer_tokens_per_s": round(statistics.median(base), 1),
                        "ratio": round(statistics.median(ours) / statistics.median(base), 3),
                        "runs": {"ftcore": [round(x, 1) for x in ours], "plain": [round(x, 1) for x in base]}}
    record("train", {"model": "SmolLM2-135M", "steps": args.steps, "batch_size": cfg.train.batch_size,
                     "precision": cfg.precision, "arms": results})


if __name__ == "__main__":
    main()
