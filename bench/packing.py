"""Packing against padded batches on the demo's data: padding share and training tokens/s, same run.

    .venv/bin/python -m bench.packing [--steps 5] [--repeats 2]

The demo's full arm (SmolLM2-135M, bf16 autocast, batch 8, chunk_len 256) trained for a few steps
with train.packing off and on, interleaved. Padding share: the share of the positions the model
computes that are padding, over the batches the collator builds from the training rows (padded
batches are as long as their longest row; packed ones are padding-free). Tokens/s: non-padding
tokens the trainer saw per second of its training loop.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from transformers import TrainerCallback

from bench.common import Clock, demo_config, prepared, record
from ftcore import study, training


class PaddingShare(TrainerCallback):
    """The share of padding positions in the trainer's own batches over one epoch, taken at the start."""

    def __init__(self, out: list):
        self.out = out

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        padded = computed = 0
        for batch in train_dataloader:
            mask = batch.get("attention_mask")
            computed += batch["input_ids"].numel()
            padded += int((mask == 0).sum()) if mask is not None else 0  # padding-free batches have no mask
        self.out.append(padded / computed)


def run(data, packing: bool, steps: int) -> dict[str, float]:
    """The demo's full arm for `steps` steps, packed or not, into a scratch directory (not the cached arm)."""
    plan = next(p for p in study.plan_arms(data) if p.name == "full")
    plan = plan.model_copy(update={"train": plan.train.model_copy(update={"packing": packing, "max_steps": steps})})
    clock, shares = Clock(), []  # the arm's SFTConfig counts the non-padding tokens it trains on
    with tempfile.TemporaryDirectory() as out:
        training.train_arm(plan.model_copy(update={"dir": out}), data.cfg.artifacts_dir,
                           callbacks=[clock, PaddingShare(shares)])
    return {"tokens_per_s": clock.tokens / clock.seconds, "padding_share": shares[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    data = prepared(demo_config())
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved, so drift of the machine hits both alike
        for packing in (False, True):
            runs[packing].append(run(data, packing, args.steps))
    med = {p: {k: statistics.median(r[k] for r in runs[p]) for k in ("tokens_per_s", "padding_share")} for p in runs}
    record("packing", {
        "model": "SmolLM2-135M", "steps": args.steps, "batch_size": data.cfg.train.batch_size,
        "chunk_len": data.cfg.chunk_len, "precision": data.cfg.precision,
        "padding_share_unpacked": round(med[False]["padding_share"], 4),
        "padding_share_packed": round(med[True]["padding_share"], 4),
        "tokens_per_s_unpacked": round(med[False]["tokens_per_s"], 1),
        "tokens_per_s_packed": round(med[True]["tokens_per_s"], 1),
        "ratio_packed_vs_unpacked": round(med[True]["tokens_per_s"] / med[False]["tokens_per_s"], 3),
        "runs": {str(p): [{k: round(v, 4) for k, v in r.items()} for r in runs[p]] for p in runs},
    })


if __name__ == "__main__":
    main()
