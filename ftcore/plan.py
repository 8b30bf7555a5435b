"""An arm, resolved once: a small frozen ArmPlan (made by ftcore.study.plan_arm from config, arm, seed, inputs).

The plan holds everything training reads: the method, the replay share, the LoRA settings the arm
really uses (the study's, with the arm's own fields), the training settings at the arm's seed, the
effective learning rate, where its inputs are, its cache key and its directory. Every later layer
(the Prefect task, the arm's child process, the work-pool deployment, the trainer) receives the
plan, never the whole config and an arm name to look up again.

Paths in a plan are relative to the artifacts root (or absolute for a model outside it), so a plan,
like every cached result, stays valid when the root is moved, copied or mounted elsewhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from ftcore.config import LoraSpec, TrainSpec
from ftcore.results import ModelRef


# An arm's files beside its weights: the trainer's log and summary (ftcore.training), its curve points
# (ftcore.curves). Here, where the steps that list them can read them without importing the trainer.
TRAIN_LOG = "train_log.jsonl"
TRAIN_SUMMARY = "train_summary.json"  # written last: an arm without it did not finish training
CURVE_LOG = "curves.jsonl"
CURVE_FRAME = "curves.parquet"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CurvePlan(_Frozen):
    """What an arm measures while it trains (ftcore.curves): where, how often and how it scores."""

    every_steps: int | None  # None = about 10 points over the arm's steps
    tokens: int | None  # size of each subsample; None = the whole evaluation sets
    domain_rows: str  # held-out domain rows (test.parquet), relative to the artifacts root
    general_rows: str  # the general stream's chunks, relative to the artifacts root
    window: int  # the general stream's windows, as in the final evaluation: chunk_len,
    stride: int | None  # eval.stride
    max_general_tokens: int | None  # and eval.max_general_tokens
    batch_size: int
    precision: Literal["fp32", "bf16"]
    budget_pct: float | None  # forgetting_budget_pct
    stop_at_budget: bool
    kl: bool = False  # each point also measures KL(base ‖ model) per token, exactly (eval.kl_top_k None)


class ArmPlan(_Frozen):
    """One arm at one seed, resolved: all that training reads, its key and its directory."""

    name: str
    label: str  # the arm, with its seed when the study has several (task names, tables)
    seed: int
    method: Literal["full", "lora", "qlora"]
    replay_ratio: float
    lora: LoraSpec | None
    train: TrainSpec  # train.seed is the arm's seed
    learning_rate: float  # train.learning_rate for full, the LoRA learning rate for lora
    chunk_len: int
    precision: Literal["auto", "fp32", "bf16"]
    device: Literal["auto", "cpu", "cuda"]
    model: ModelRef
    trackers: tuple[str, ...] = ("tensorboard",)  # where the trainer logs its loss (not part of the key)
    train_rows: str  # tokenized domain training rows, relative to the artifacts root
    replay_rows: str | None  # tokenized replay chunks, when replay_ratio > 0
    curve: CurvePlan | None = None  # None: no curves (eval.every_steps = 0)
    key: str
    dir: str  # relative to the artifacts root: train-<name>/<key>

    @property
    def saves_merged(self) -> bool:
        return self.method == "lora" and self.lora is not None and self.lora.merge  # qlora never merges

    def outputs(self) -> list[str]:
        """The files downstream steps read: the trained weights (or adapter)."""
        if self.method == "full":
            return ["model"]
        return ["adapter", "model"] if self.saves_merged else ["adapter"]
