"""Experiment trackers: the study's results in MLflow (the trainer's own loss goes to TensorBoard / W&B).

With "mlflow" in `report_to`, a finished study is logged to the tracking server of
MLFLOW_TRACKING_URI (MLflow's default: a local SQLite file ./mlflow.db, artifacts in ./mlruns): one parent run per report
(the table, report, plots, config and model cards as artifacts; each arm's changes as metrics) and
a child run per arm and seed (its resolved settings as params, its training loss and its learning
and forgetting curve per step, its final perplexities, bits per byte and KL as metrics). A report already logged is not logged again, so a
cached rerun adds nothing. Tracking is a side effect: an unreachable tracker is a warning, not a
failed study.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from ftcore.config import StudyConfig

log = logging.getLogger("ftcore.tracking")
REPORT_TAG = "ftstudy.report"


def _flat(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def log_mlflow(cfg: StudyConfig, root: Path, results: dict[str, Any], arms: list[dict[str, Any]],
               evals: list[dict[str, Any]]) -> str | None:
    """Log the study to MLflow; return the parent run's id (None when this report was logged before).

    Raises ImportError when mlflow is not installed (`pip install 'ftstudy[mlflow]'`).
    """
    import mlflow

    report_key = Path(results["report"]).parent.name
    experiment = mlflow.set_experiment(f"ftstudy-{cfg.name}")
    done = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`{REPORT_TAG}` = '{report_key}'",
                              output_format="list")
    if done:
        log.info("mlflow: report %s is already logged (run %s)", report_key, done[0].info.run_id)
        return None
    table = pd.read_parquet(root / results["table"]).set_index("arm")
    with mlflow.start_run(run_name=f"study-{cfg.name}", tags={REPORT_TAG: report_key, "ftstudy.kind": "study"}) as parent:
        mlflow.log_params(_flat("", cfg.model_dump(mode="json", exclude={"arms"}), {}))
        for arm, row in table.iterrows():
            for s in ("domain", "general"):
                mlflow.log_metric(f"{arm}.{s}_ppl", float(row[f"{s}_ppl"]))
                if arm != "base":
                    mlflow.log_metric(f"{arm}.{s}_change_pct", float(row[f"{s}_change_pct"]))
            if arm != "base" and pd.notna(row.get("general_kl")):
                mlflow.log_metric(f"{arm}.general_kl", float(row["general_kl"]))
            # benchmark tasks (ftcore.task_forgetting): each task's score and change, and the task forgetting
            for column in [c for c in table.columns if c.startswith("task_") and c.endswith(("_score", "_change", "_pts"))]:
                if pd.notna(row.get(column)):
                    mlflow.log_metric(f"{arm}.{column}", float(row[column]))
        for name in ("table", "report", "perplexity", "frontier", "loss", "curves", "path", "config", "tasks",
                     "task_frontier"):
            if name in results and (root / results[name]).is_file():
                mlflow.log_artifact(str(root / results[name]))
        cards = (root / results["report"]).parent / "cards"
        if cards.is_dir():
            mlflow.log_artifacts(str(cards), artifact_path="cards")
        for arm in arms:
            _log_arm(cfg, root, arm, evals, parent.info.run_id)
        return parent.info.run_id


def _log_arm(cfg: StudyConfig, root: Path, arm: dict[str, Any], evals: list[dict[str, Any]], parent: str) -> None:
    import mlflow

    spec = next(a for a in cfg.arms if a.name == arm["arm"])
    settings = {"arm": arm["arm"], "method": arm["method"], "seed": arm["seed"], "replay_ratio": spec.replay_ratio,
                "train": cfg.train.model_dump(mode="json") | {"seed": arm["seed"]}, "chunk_len": cfg.chunk_len,
                "lora": cfg.lora_of(spec).model_dump(mode="json") if spec.method in ("lora", "qlora") else None,
                "dir": arm["dir"], "trainable_params": arm["summary"].get("trainable_params")}
    with mlflow.start_run(run_name=f"train-{arm['label']}", nested=True, parent_run_id=parent,
                          tags={"ftstudy.kind": "arm", "ftstudy.arm": arm["arm"]}):
        mlflow.log_params(_flat("", settings, {}))
        log_file = root / arm["dir"] / "train_log.jsonl"
        for line in log_file.read_text().splitlines() if log_file.is_file() else []:
            entry = json.loads(line)
            mlflow.log_metric("train_loss", float(entry["loss"]), step=int(entry["step"]))
        curve = root / arm["curves"] if arm.get("curves") else None
        if curve is not None and curve.is_file():
            for _, p in pd.read_parquet(curve).iterrows():
                for k in ("ppl", "bpb", "change_pct"):
                    mlflow.log_metric(f"curve_{p['set']}_{k}", float(p[k]), step=int(p["step"]))
        for e in evals:
            if e["arm"] == arm["arm"] and e.get("seed") == arm["seed"]:
                mlflow.log_metric(f"{e['set']}_ppl", float(e["ppl"]))
                mlflow.log_metric(f"{e['set']}_bpb", float(e["bpb"]))
                if e.get("kl") is not None:
                    mlflow.log_metric(f"{e['set']}_kl_to_base", float(e["kl"]))


def publish(cfg: StudyConfig, root: Path, results: dict[str, Any], arms: list[dict[str, Any]],
            evals: list[dict[str, Any]]) -> None:
    """Log to every tracker in cfg.report_to that keeps study results (MLflow); warn, never fail, on error."""
    if "mlflow" not in cfg.report_to:
        return
    try:
        run = log_mlflow(cfg, root, results, arms, evals)
        if run:
            log.info("mlflow: logged the study as run %s", run)
    except ImportError:
        log.warning("report_to names mlflow but it is not installed: pip install 'ftstudy[mlflow]'")
    except Exception as exc:  # noqa: BLE001 - a tracker that is down must not fail a finished study
        log.warning("mlflow: could not log the study (%s: %s)", type(exc).__name__, exc)
