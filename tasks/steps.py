"""Prefect tasks around ftcore.study: each one's cache key is the step's content key.

Keys hash the content fingerprints of a step's inputs, the config fields it reads and the code
version (ftcore.study.code_version, which covers all of ftcore), never a run id or a path, so a
second run with nothing changed is all cache hits, and a changed input reruns exactly what depends
on it. Results are persisted under the artifacts root, so the cache holds across processes and
Prefect databases. Tasks pass small dicts (paths, keys, numbers), never models or DataFrames.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from ftcore import corpora, models, study
from ftcore.config import StudyConfig
from tasks.arm_process import run_arm_process
from tasks.devices import device_count, device_slot, visible_gpu


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _device(gpu_slot: int) -> str | None:
    return f"cuda:{gpu_slot}" if device_count() > 1 else None


# --- cache keys (Prefect calls these with the task's bound parameters) --------------------------

def _model_key(ctx, p) -> str:
    cfg: StudyConfig = p["cfg"]
    return "fetch-model-" + _hash(cfg.model.model_dump(mode="json"), models.source_version(cfg.model), study.code_version())


def _corpus_key(ctx, p) -> str:
    cfg: StudyConfig = p["cfg"]
    role = p["role"]
    spec = getattr(cfg, role)
    fields = cfg.fingerprint_fields("format", "test_docs", "split_seed") if role == "domain" else {}
    return f"fingerprint-{role}-" + _hash(spec.model_dump(mode="json"), fields, corpora.source_version(spec, role),
                                          study.code_version())


def result_storage(cfg: StudyConfig) -> Path:
    """Where Prefect persists task results (the cache): under the study's artifacts root."""
    return Path(cfg.artifacts_dir).expanduser().resolve() / ".prefect-results"


def _verified(cfg: StudyConfig, cache_key: str, step: str, key: str) -> str:
    """The cache key, after dropping the cached result if the step's artifacts no longer verify.

    A cache hit would otherwise hand out paths to files that were deleted, truncated or edited;
    without the persisted result Prefect runs the task, and ftcore recomputes the artifact.
    """
    if not study.is_done(study.step_dir(cfg, step, key)):
        (result_storage(cfg) / cache_key).unlink(missing_ok=True)
    return cache_key


def _domain_key(ctx, p) -> str:
    key = study.domain_key(p["cfg"], p["model"], p["corpus_fp"])
    return _verified(p["cfg"], f"tokenize-domain-{key}", "tokenize-domain", key)


def _stream_key(ctx, p) -> str:
    key = study.stream_key(p["cfg"], p["role"], p["model"], p["corpus_fp"])
    return _verified(p["cfg"], f"tokenize-{p['role']}-{key}", f"tokenize-{p['role']}", key)


def _arm_key(ctx, p) -> str:
    key = study.arm_key(p["cfg"], p["arm"], p["model"], p["domain"], p["replay"])
    return _verified(p["cfg"], f"train-{p['arm']}-{key}", f"train-{p['arm']}", key)


def _eval_key(ctx, p) -> str:
    step = f"eval-{p['arm']['arm'] if p.get('arm') else 'base'}-{p['which']}"
    key = study.eval_key(p["cfg"], p["model"], p["data"], p["which"], p.get("arm"))
    return _verified(p["cfg"], f"{step}-{key}", step, key)


CACHED = {"persist_result": True, "cache_expiration": None}


# --- tasks -------------------------------------------------------------------------------------

@task(name="fingerprint-corpus", task_run_name="fingerprint-{role}", cache_key_fn=_corpus_key, **CACHED)
def fingerprint_corpus(cfg: StudyConfig, role: str) -> str:
    """Content fingerprint of the domain, general or replay corpus."""
    return study.fingerprint_corpus(cfg, role)


@task(name="fetch-model", task_run_name="fetch-model", cache_key_fn=_model_key, retries=2, retry_delay_seconds=10, **CACHED)
def fetch_model(cfg: StudyConfig) -> dict[str, str]:
    """The base model as a local directory, and its content fingerprint."""
    model = study.fetch_model(cfg)
    study.check_model_fits(cfg, model["path"])
    return model


@task(name="tokenize-domain", task_run_name="tokenize-domain", cache_key_fn=_domain_key, **CACHED)
def tokenize_domain(cfg: StudyConfig, model: dict[str, str], corpus_fp: str) -> dict[str, Any]:
    """Domain train/test rows as parquet."""
    return study.tokenize_domain(cfg, model, corpus_fp)


@task(name="tokenize-stream", task_run_name="tokenize-{role}", cache_key_fn=_stream_key, **CACHED)
def tokenize_stream(cfg: StudyConfig, role: str, model: dict[str, str], corpus_fp: str) -> dict[str, Any]:
    """General benchmark or replay corpus as language-modelling chunks."""
    return study.tokenize_stream(cfg, role, model, corpus_fp)


@task(name="evaluate", task_run_name="eval-{label}-{which}", cache_key_fn=_eval_key, **CACHED)
def evaluate(cfg: StudyConfig, model: dict[str, str], data: dict[str, Any], which: str,
             arm: dict[str, Any] | None = None, label: str = "base") -> dict[str, Any]:
    """Perplexity and bits per byte of the base model or an arm, on one set; holds a device slot."""
    with device_slot() as slot:
        return study.evaluate(cfg, model, data, which, arm, device=_device(slot))


def _train_run_name() -> str:
    from prefect.runtime import task_run

    return f"train-{task_run.parameters.get('label') or task_run.parameters['arm']}"


@task(name="train-arm", task_run_name=_train_run_name, cache_key_fn=_arm_key, **CACHED)
def train_arm(cfg: StudyConfig, arm: str, model: dict[str, str], domain: dict[str, Any],
              replay: dict[str, Any] | None, label: str | None = None) -> dict[str, Any]:
    """One arm at cfg.train.seed, in its own process on a free device slot, or as a run of the train-arm deployment.

    `label` names the task run (the arm, with its seed when the study has several)."""
    if cfg.executor == "work-pool":
        return train_on_work_pool(cfg, arm, model, domain, replay)
    return train_in_subprocess(cfg, arm, model, domain, replay)


def train_in_subprocess(cfg: StudyConfig, arm: str, model: dict[str, str], domain: dict[str, Any],
                        replay: dict[str, Any] | None, key: str | None = None) -> dict[str, Any]:
    """Train one arm in a child process on a free device slot of this machine (from a task or a flow)."""
    logger = get_run_logger()
    # The key is computed once and handed to the child, so both agree on the arm's directory.
    key = key or study.arm_key(cfg, arm, model, domain, replay)
    arm_dir = study.step_dir(cfg, f"train-{arm}", key)
    progress_id = create_progress_artifact(0.0, description=f"train-{arm}: optimizer steps done (%)")

    def on_progress(p: dict[str, Any]) -> None:
        if p.get("max_steps"):
            update_progress_artifact(progress_id, 100.0 * p["step"] / p["max_steps"])

    with device_slot() as slot:
        gpu = visible_gpu(slot) if device_count() > 1 or _has_cuda() else None
        logger.info("train-%s on device slot %d%s", arm, slot, f" (CUDA_VISIBLE_DEVICES={gpu})" if gpu is not None else "")
        result = run_arm_process(cfg, arm, model, domain, replay, gpu, logger.info, key, on_progress, arm_dir)
    update_progress_artifact(progress_id, 100.0)
    if result["summary"]["resumed_from_step"]:
        logger.info("train-%s resumed from checkpoint step %d", arm, result["summary"]["resumed_from_step"])
    return result


def train_on_work_pool(cfg: StudyConfig, arm: str, model: dict[str, str], domain: dict[str, Any],
                       replay: dict[str, Any] | None) -> dict[str, Any]:
    """Run the train-arm deployment and read the arm's result from the shared artifacts root.

    The arm's run is a subflow of this task, so the UI shows it under the study run; the worker
    that picks it up writes to the same artifacts root (a path every worker mounts).
    """
    from prefect.deployments import run_deployment

    key = study.arm_key(cfg, arm, model, domain, replay)
    run = run_deployment(
        cfg.train_deployment,
        parameters={"config": cfg.model_dump(mode="json"), "arm": arm, "model": model, "domain": domain,
                    "replay": replay, "key": key},
        timeout=None,
    )
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"train-{arm}: deployment run {run.name} ({cfg.train_deployment}) ended {state}: "
                           f"{(run.state.message or '') if run.state else ''}"[:400])
    arm_dir = study.step_dir(cfg, f"train-{arm}", key)
    if not study.is_done(arm_dir):
        raise RuntimeError(f"train-{arm}: run {run.name} completed but {arm_dir} holds no complete arm; "
                           "is artifacts_dir a path every worker mounts?")
    summary = json.loads((Path(arm_dir) / "train_summary.json").read_text())
    return {"key": key, "arm": arm, "seed": cfg.train.seed, "dir": str(arm_dir), "summary": summary}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _results_key(ctx, p) -> str:
    key = study.report_key(p["cfg"], p["evals"], p["failed"])
    return _verified(p["cfg"], f"report-{key}", "report", key)


@task(name="write-results", task_run_name="write-results", cache_key_fn=_results_key, **CACHED)
def write_results(cfg: StudyConfig, evals: list[dict[str, Any]], arms: list[dict[str, Any]],
                  failed: dict[str, str]) -> dict[str, Any]:
    """The arms x (domain, general) table (parquet, markdown), the report and the plots."""
    return study.write_results(cfg, evals, arms, failed)
