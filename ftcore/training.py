"""The training arms: one SFTTrainer setup; arms differ by their training mix and a PEFT config.

An arm arrives resolved, as an ArmPlan (ftcore.plan): a method and a replay share,
- method full: every weight trains, at train.learning_rate;
- method lora: LoRA adapters (peft) with the arm's LoRA settings and their own learning rate;
- method qlora: the same adapters on the base loaded in 4-bit NF4 (bitsandbytes);
- replay_ratio > 0: general-text chunks are added to the domain rows until they are that share
  of the training tokens (the `replay` shorthand is full at the study's replay_ratio).

An arm's directory holds `checkpoints/` (resume points, TensorBoard under checkpoints/runs),
`train_log.jsonl` (every logged loss), then `model/` (full weights; for LoRA when merged) or
`adapter/`, and last `train_summary.json`, written only when the arm finished.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch
from peft import LoraConfig, PeftModel
from transformers import PrinterCallback, Trainer, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from ftcore import chunked_loss, curves
from ftcore.config import InputError, LoraSpec, TrainSpec, check_devices_per_arm
from ftcore.hardware import resolve_device, resolve_precision
from ftcore.io import atomic_path, crash_point, write_json
from ftcore.models import load_model, load_quantized, load_tokenizer, quiet_library_deprecations
from ftcore.plan import TRAIN_LOG, TRAIN_SUMMARY, ArmPlan
from ftcore.progress import Progress

log = logging.getLogger("ftcore.training")
datasets.disable_progress_bars()  # TRL's per-map bars flood task logs; ProgressLog reports instead
SUMMARY = TRAIN_SUMMARY


class ReplayBudgetError(InputError):
    """The replay corpus is too small for the requested replay_ratio."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the arm stops instead of saving garbage."""


# --- the training mix --------------------------------------------------------------------------

def build_training_mix(domain: pd.DataFrame, replay: pd.DataFrame | None, ratio: float, seed: int) -> pd.DataFrame:
    """Domain rows plus replay rows drawn (by seed) until replay is `ratio` of all training tokens."""
    cols = ["input_ids", "completion_mask"]
    mix = domain[cols].assign(source="domain")
    if replay is None or ratio == 0:
        return mix.reset_index(drop=True)
    domain_tokens = int(domain["input_ids"].map(len).sum())
    want = ratio / (1 - ratio) * domain_tokens
    order = np.random.default_rng(seed).permutation(len(replay))
    lengths = replay["input_ids"].map(len).to_numpy()[order]
    cumulative = np.cumsum(lengths)
    if cumulative[-1] < want:
        raise ReplayBudgetError(
            f"replay: {int(cumulative[-1])} tokens available, {int(want)} needed for replay_ratio={ratio}; "
            "raise replay.max_docs or lower replay_ratio"
        )
    # Take the prefix whose token count lands closest to the target.
    n = int(np.searchsorted(cumulative, want))
    if n > 0 and abs(cumulative[n - 1] - want) <= abs(cumulative[n] - want):
        n -= 1
    picked = replay.iloc[order[: n + 1]][cols].assign(source="replay")
    return pd.concat([mix, picked], ignore_index=True)


def replay_share(mix: pd.DataFrame) -> float:
    tokens = mix["input_ids"].map(len)
    return float(tokens[mix["source"] == "replay"].sum() / tokens.sum())


# --- trainer setup -----------------------------------------------------------------------------

def sft_config(train: TrainSpec, learning_rate: float, max_length: int, precision: str, device: str,
               out_dir: Path, report_to: tuple[str, ...] = ("tensorboard",), method: str = "full") -> SFTConfig:
    """TRL's SFTConfig with the recipe's values set explicitly (SFTConfig's defaults — bf16, activation
    checkpointing, lr 2e-5 — differ from TrainingArguments'); checkpoints under out_dir/checkpoints.

    With train.devices_per_arm = N > 1 (the arm's N processes started by torchrun), each process
    accumulates grad_accum / N micro-batches, so the global batch is batch_size x grad_accum as in one
    process; gloo is the backend on a CPU; `method` full with train.distributed fsdp adds FSDP's settings.
    """
    device = resolve_device(device)
    fsdp = fsdp_settings(train, method)
    check_devices_per_arm(train, full=method == "full", device=device)  # only full arms are sharded
    return SFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum // train.devices_per_arm,
        ddp_backend="gloo" if device == "cpu" and train.devices_per_arm > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable parameter takes part in the loss
        **fsdp,
        learning_rate=learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5 reads a value < 1 as a ratio of the steps
        weight_decay=train.weight_decay,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        # Trainer's default replaces NaN/inf step losses in the logged mean by the window's average
        # (0.0 when every step is NaN), which hides divergence from LossLog; log the true mean.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        bf16=resolve_precision(precision, device) == "bf16",
        fp16=False,
        # Under FSDP its own activation checkpointing (fsdp_config) replaces this one.
        activation_checkpointing=train.gradient_checkpointing and not fsdp,
        seed=train.seed,
        data_seed=train.seed,
        use_cpu=device == "cpu",
        report_to=list(report_to) or "none",
        disable_tqdm=True,
        completion_only_loss=True,
        max_length=max_length,
        packing=train.packing,
        packing_strategy="bfd",  # padding-free: examples separated by their position ids
        dataloader_num_workers=0,
        # Training tokens seen, for the curves (padding-free packed rows have no attention mask to count by).
        include_num_input_tokens_seen="all" if train.packing else "non_padding",
    )


def fsdp_settings(train: TrainSpec, method: str) -> dict[str, Any]:
    """The FSDP settings of a full fine-tune sharded across the arm's processes, written out: FSDP2
    (PyTorch's fully_shard, through accelerate), parameters, gradients and optimizer state sharded and
    re-sharded after each forward (FULL_SHARD), one unit per transformer block (the model's
    _no_split_modules), a full state dict saved (one Hugging Face model, as without FSDP), the
    weights loaded by every process. Empty for LoRA arms, DDP or one process."""
    if train.distributed != "fsdp" or train.devices_per_arm < 2 or method != "full":
        return {}
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False, "cpu_offload": False,
        "activation_checkpointing": train.gradient_checkpointing}}


def is_main_process() -> bool:
    """Whether this is the arm's first process (RANK 0, set by torchrun), the one that writes results."""
    return int(os.environ.get("RANK", "0")) == 0


def peft_config(lora: LoraSpec) -> LoraConfig:
    """peft's LoraConfig for causal-LM adapters from the arm's LoRA settings: LoRA (Hu et al. 2021), with
    DoRA (Liu et al. 2024) and rank-stabilized scaling (Kalajdzievski 2023) when asked for."""
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      use_dora=lora.use_dora, use_rslora=lora.use_rslora, task_type="CAUSAL_LM")


class LossLog(TrainerCallback):
    """Append every logged loss to train_log.jsonl; stop the arm on a non-finite loss."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        _truncate_log(path, resume_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        entry = {"step": state.global_step, "epoch": state.epoch, "loss": loss,
                 "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"), "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        log.info("step %d: loss %.4f", state.global_step, loss)
        grad_norm = logs.get("grad_norm")
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm} (loss {loss})"
            raise NonFiniteLossError(f"training diverged: {what} at step {state.global_step}; "
                                     "lower the learning rate (or lora.alpha / lora.learning_rate for LoRA)")


class ProgressLog(TrainerCallback):
    """Optimizer steps done, with an ETA, in the log (ftcore.progress); every step's progress to `report` (the
    arm's watcher)."""

    def __init__(self, label: str, report: Callable[[dict[str, Any]], None] | None = None):
        self.label, self.report = label, report

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = Progress(self.label, total=state.max_steps, unit="steps", done=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.advance(state.global_step - self.progress.done)
        if self.report is not None:
            self.report({"step": state.global_step, "max_steps": state.max_steps, "eta_s": round(self.progress.eta, 1)})


def _truncate_log(path: Path, resume_step: int) -> None:
    """Drop log lines past the resume step: the steps after the checkpoint are trained again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
    path.write_text("".join(line + "\n" for line in keep))


def newest_complete_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """The newest checkpoint that was fully written; partial ones (a kill while saving) are removed.

    Trainer writes trainer_state.json after the weights, optimizer and RNG states, so a checkpoint
    without it was interrupted mid-save and cannot be resumed from.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    complete = []
    for path in root.glob("checkpoint-*"):
        if not path.name.split("-")[-1].isdigit():
            continue
        if (path / "trainer_state.json").is_file():
            complete.append(path)
        else:
            log.warning("removing incomplete checkpoint %s (interrupted while saving)", path)
            shutil.rmtree(path, ignore_errors=True)
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


def _checkpoint_step(checkpoint: str | None) -> int:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0


# --- the arm -----------------------------------------------------------------------------------

class SkipFinalCheckpoint(TrainerCallback):
    """No checkpoint at the last step: the arm's model is saved right after, and a checkpoint of a
    full fine-tune is three times the model (weights and two Adam moments) written for nothing."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = False


class CrashPoint(TrainerCallback):
    """Fault injection for the resume tests: FTSTUDY_CRASH_AT=after-checkpoint-<step> SIGKILLs the arm's first
    process right after that checkpoint is written (ftcore.io.crash_point); nothing happens otherwise."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            crash_point(f"after-checkpoint-{state.global_step}")


def _chunked_loss_applies(model) -> bool:
    """Whether the chunked loss applies to `model` (chunked_loss.splits_exactly, probed once per model); logged at the
    first step (the curve points may have probed the model before), so a run that takes the slower loss says so."""
    chunked = chunked_loss.splits_exactly(model)
    if not getattr(model, "_ftstudy_loss_logged", False):
        model._ftstudy_loss_logged = True
        log.info("training loss: %s", "through the output layer in chunks of positions" if chunked else
                 "the model's own forward (its logits are not its output layer on the decoder's last state)")
    return chunked


class PlainLossSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the cross-entropy over the completion labels, through the output layer a chunk
    of positions at a time (ftcore.chunked_loss) where the model allows, else the model's own.

    TRL 1.x computes the loss through a fused, chunked LM head that also yields entropy and top-1
    accuracy for its logs. Without Triton (on a CPU) it scores every position, recomputes the head
    in the backward pass and computes a softmax entropy over the vocabulary: a training step took
    1.8x as long as a plain Trainer's on the same rows (bench/train.py). The model's own loss holds
    every position's logits at once, several GB per batch for a 262k vocabulary (BENCHMARKS.md §12).
    The loss is the same mean over completion tokens; only TRL's entropy/accuracy log fields are lost.
    On GPUs TRL's fused head is kept: there it skips prompt positions and never holds the full logits.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Several processes scale the loss for their token average (Trainer.compute_loss): left to the Trainer.
        if (return_outputs or "labels" not in inputs or self.accelerator.num_processes > 1
                or not _chunked_loss_applies(model)):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # The model's forward carries accelerate's autocast; the decoder called directly needs it here.
        with self.accelerator.autocast():
            return chunked_loss.causal_lm_loss(
                model, inputs, num_items_in_batch if self.model_accepts_loss_kwargs else None)


def train_arm(plan: ArmPlan, root: str | Path, callbacks: list[TrainerCallback] | None = None,
              on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the planned arm into `root/plan.dir`, resuming from its newest checkpoint; return the summary.

    Raises ReplayBudgetError when the replay corpus is too small for the plan's replay share and
    NonFiniteLossError when training diverges.
    """
    root = Path(root)
    out_dir = root / plan.dir
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(plan.seed)
    replay = pd.read_parquet(root / plan.replay_rows) if plan.replay_rows else None
    mix = build_training_mix(pd.read_parquet(root / plan.train_rows), replay, plan.replay_ratio, plan.seed)
    dataset = datasets.Dataset.from_pandas(mix[["input_ids", "completion_mask"]], preserve_index=False)

    args = sft_config(plan.train, plan.learning_rate, plan.chunk_len, plan.precision, plan.device, out_dir,
                      plan.trackers, plan.method)
    main = is_main_process()  # under torchrun every process trains; only the first writes logs and results
    # In another number of processes the global batch would silently differ from the recipe's.
    check_devices_per_arm(plan.train, processes=int(os.environ.get("WORLD_SIZE", "1")))
    checkpoint = newest_complete_checkpoint(args.output_dir)
    if checkpoint:
        log.info("train-%s: resuming from %s", plan.label, checkpoint)
    model_dir = plan.model.locate(root)
    tokenizer = load_tokenizer(model_dir)
    curve = (curves.CurveLog(plan.curve, root, out_dir, _checkpoint_step(checkpoint), tokenizer.pad_token_id,
                             f"train-{plan.label}", model_dir, plan.method) if plan.curve and main else None)
    writers = [LossLog(out_dir / TRAIN_LOG, _checkpoint_step(checkpoint)),
               ProgressLog(f"train-{plan.label}", on_progress)] if main else []
    trainer_class = PlainLossSFTTrainer if args.use_cpu else SFTTrainer
    trainer = trainer_class(
        model=starting_model(plan, model_dir, bf16=args.bf16),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config(plan.lora) if plan.lora else None,
        callbacks=[*writers, SkipFinalCheckpoint(), CrashPoint(), *([curve] if curve else []), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # LossLog and ProgressLog report instead of raw dicts
    if args.world_size > 1:
        log.info("train-%s: %d processes, %s (%s), each accumulating %d micro-batch(es) of %d rows per optimizer "
                 "step", plan.label, args.world_size, "FSDP full-shard" if trainer.is_fsdp_enabled else "DDP",
                 args.ddp_backend or "nccl", args.gradient_accumulation_steps, args.per_device_train_batch_size)
    if curve:
        curve.emit = trainer.log  # curve points to the trainer's own loggers (TensorBoard, W&B) at their step
    started = time.monotonic()
    with quiet_library_deprecations():
        result = trainer.train(resume_from_checkpoint=checkpoint)
    kept = curves.stop_at_budget(trainer.model, plan, out_dir) if curve else None
    if trainer.is_fsdp_enabled:  # gathering the full state dict takes every process
        _save_sharded(trainer, tokenizer, out_dir, main)
    elif main:
        _save_arm(trainer, tokenizer, out_dir, merge=plan.saves_merged,
                  base_model=plan.model.base_model or plan.model.name)
    if curve:
        curves.write_frame(out_dir)
    summary = {
        "arm": plan.name,
        "method": plan.method,
        "seed": plan.seed,
        "steps": trainer.state.global_step,
        "resumed_from_step": _checkpoint_step(checkpoint),
        "train_loss": result.training_loss,
        "seconds": time.monotonic() - started,
        "rows": len(mix),
        "tokens_per_epoch": int(mix["input_ids"].map(len).sum()),
        "replay_share": replay_share(mix),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        # Seconds this run spent measuring curve points (after a resume: since the resume).
        "curve_seconds": round(curve.seconds, 3) if curve else None,
        "budget": kept,
    }
    if main:
        write_json(summary, out_dir / SUMMARY)
    if args.world_size > 1:
        # Leave together, the process group closed: a process that exits while gloo's threads still talk to
        # the others can abort (SIGABRT) and fail an arm that had finished.
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.state.destroy_process_group()
    return summary


def starting_model(plan: ArmPlan, model_dir: Path, bf16: bool) -> torch.nn.Module:
    """The model an arm starts from: the base in fp32, or for QLoRA in 4-bit NF4, prepared for training
    adapters on it (peft's prepare_model_for_kbit_training: norms in fp32, input gradients on)."""
    if plan.method != "qlora":
        return load_model(model_dir)
    from peft import prepare_model_for_kbit_training

    device = resolve_device(plan.device)
    if device == "cuda" and plan.train.devices_per_arm > 1:  # each of the arm's processes on its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    model = load_quantized(model_dir, device, torch.bfloat16 if bf16 else torch.float32)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.train.gradient_checkpointing)


def _save_arm(trainer: SFTTrainer, tokenizer, out_dir: Path, merge: bool, base_model: str) -> None:
    model = trainer.model
    if isinstance(model, PeftModel):
        with atomic_path(out_dir / "adapter") as tmp:
            model.save_pretrained(tmp)
            # peft writes a template card; the study writes the arm's own (with its numbers) at report time,
            # outside this step's manifest.
            (tmp / "README.md").unlink(missing_ok=True)
            portable_adapter_config(tmp / "adapter_config.json", base_model)
        if not merge:
            return
        model = merged_as_trained(model)
    with atomic_path(out_dir / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _save_sharded(trainer: SFTTrainer, tokenizer, out_dir: Path, main: bool) -> None:
    """An FSDP-sharded full fine-tune saved as one ordinary model: every process takes part in gathering the
    full state dict into a name all of them know; the first then adds the tokenizer and renames it."""
    staging = out_dir / ".model.gathering"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if main:
        tokenizer.save_pretrained(staging)
        shutil.rmtree(out_dir / "model", ignore_errors=True)
        staging.rename(out_dir / "model")


def portable_adapter_config(path: Path, base_model: str) -> None:
    """The same adapter config, written the same way every time: target_modules sorted (peft writes a set in
    arbitrary order, which made identical trainings differ on disk and their evaluations run again) and
    the base model by its name instead of this machine's path (which broke loading after a move)."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merged_as_trained(model: PeftModel, rtol: float = 1e-3) -> torch.nn.Module:
    """The adapter merged into the base, checked to compute what the trained (unmerged) model computes.

    Raises RuntimeError when the logits on a probe sequence differ by more than `rtol` of their
    scale (e.g. a merge that also changed a tied weight): such a model must not be published as the arm.
    """
    probe = torch.arange(min(32, model.config.vocab_size), device=next(model.parameters()).device)[None]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=probe).logits.float()
        merged = model.merge_and_unload()
        after = merged(input_ids=probe).logits.float()
    diff = (after - before).abs().max().item()
    scale = before.abs().max().item() or 1.0
    if diff > rtol * scale:
        raise RuntimeError(f"merging the adapter changed the model's logits by up to {diff:.3g} (of {scale:.3g}): the "
                           "merged model is not the trained one; set lora.merge=false")
    return merged
