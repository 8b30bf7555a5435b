"""An arm, resolved once: `plan_arm` turns (config, arm, seed, inputs) into a small frozen ArmPlan.

The plan holds everything training reads: the method, the replay share, the LoRA settings the arm
really uses (the study's, with the arm's own fields), the training settings at the arm's seed, the
effective learning rate, where its inputs are, its cache key and its directory. Every later layer
(the Prefect task, the arm's child process, the work-pool deployment, the trainer) receives the
plan, never the whole config and an arm name to look up again.

Paths in a plan are relative to the artifacts root (or absolute for a model outside it), so a plan,
like every cached result, stays valid when the root is moved, copied or mounted elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ftcore import keys
from ftcore.config import ArmSpec, LoraSpec, StudyConfig, TrainSpec


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelRef(_Frozen):
    """The fetched base model: where it is and what it is (a content digest of its files)."""

    source: str
    name: str
    revision: str | None = None  # the Hub commit the study resolved, for a Hub model
    base_model: str | None = None  # the Hub id a user loads this base by (a GGUF's original), for cards
    path: str  # relative to the artifacts root for a built model, absolute otherwise
    digest: str

    def locate(self, root: str | Path) -> Path:
        """The model's directory on this machine: under `root`, where it was, or (Hub) this machine's cache.

        Raises ModelError when it cannot be found.
        """
        from ftcore import sources

        path = Path(root) / self.path  # an absolute self.path stays as it is
        if path.is_dir():
            return path
        if self.source == "hub":
            return sources.hub_snapshot(self.name, self.revision)
        raise sources.ModelError(f"model: {path} does not exist on this machine; the study fetched "
                                 f"{self.source} model {self.name!r} there")


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


def plan_curve(cfg: StudyConfig, domain: dict[str, Any], general: dict[str, Any] | None) -> CurvePlan | None:
    """What every arm measures while it trains; None when curves are off or there is no general set."""
    if cfg.eval.every_steps == 0 or general is None:
        return None
    return CurvePlan(every_steps=cfg.eval.every_steps, tokens=cfg.eval.curve_tokens, domain_rows=domain["test"],
                     general_rows=general["path"], window=cfg.chunk_len, stride=cfg.eval.stride,
                     max_general_tokens=cfg.eval.max_general_tokens, batch_size=cfg.eval.batch_size,
                     precision=cfg.eval.precision, budget_pct=cfg.forgetting_budget_pct,
                     stop_at_budget=cfg.stop_at_budget)


def plan_arm(cfg: StudyConfig, arm: ArmSpec, seed: int, model: ModelRef, domain: dict[str, Any],
             replay: dict[str, Any] | None, general: dict[str, Any] | None = None) -> ArmPlan:
    """The plan of `arm` at `seed` on the tokenized `domain` (and `replay`) data of `cfg`.

    The key hashes what the arm trains with and the content digests of its inputs (model, domain
    rows, replay chunks when it mixes them in), and the training code (ftcore.keys); not paths,
    not the other arms. With curves on (eval.every_steps), what the arm measures while training is
    part of its result: the curve settings, the evaluation batch size and precision and the
    general set's digest are in the key too.
    """
    lora = cfg.lora_of(arm) if arm.method != "full" else None
    train = cfg.train.model_copy(update={"seed": seed})
    replaying = arm.replay_ratio > 0
    if replaying and replay is None:
        raise ValueError(f"arm {arm.name}: replay_ratio {arm.replay_ratio} but the study has no tokenized replay corpus")
    what = {
        "arm": {"name": arm.name, "method": arm.method, "replay_ratio": arm.replay_ratio,
                "lora": lora.model_dump(mode="json") if lora else None},
        "train": train.model_dump(mode="json"), "chunk_len": cfg.chunk_len, "precision": cfg.precision,
        "model": model.digest, "domain": domain["digest"], "replay": replay["digest"] if replaying else None,
    }
    curve = plan_curve(cfg, domain, general)
    if curve is not None:
        # The points are scored by ftcore.perplexity: its code is part of this result only when curves are on.
        what["curve"] = curve.model_dump(mode="json", exclude={"domain_rows", "general_rows"}) | {
            "general": general["digest"], "scoring": keys.module_digest("perplexity")}
    key = keys.step_key("train", what)
    return ArmPlan(
        name=arm.name, label=cfg.run_label(arm.name, seed), seed=seed, method=arm.method,
        replay_ratio=arm.replay_ratio, lora=lora, train=train,
        learning_rate=lora.learning_rate if lora else train.learning_rate,
        chunk_len=cfg.chunk_len, precision=cfg.precision, device=cfg.device, model=model,
        trackers=tuple(t for t in cfg.report_to if t != "mlflow"),  # MLflow gets the whole study (ftcore.tracking)
        train_rows=domain["train"], replay_rows=replay["path"] if replaying else None, curve=curve,
        key=key, dir=f"train-{arm.name}/{key}",
    )
