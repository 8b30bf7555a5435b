"""Prefect tasks around ftcore.steps, and the runner that hands ftcore.study's DAG to them.

ftcore's step directories are the one truth of "done": a task whose step directory already holds
a verified result returns it in a `Cached` state without computing anything; otherwise it runs
the step, which records its result there. Prefect persists no results of its own, so nothing in
Prefect's storage can disagree with the artifacts, go stale, or point at an old artifacts root.

Tasks pass small dicts and frozen plans (paths relative to the artifacts root, digests, numbers),
never models or DataFrames. Bad input (ftcore's InputError) fails a task without a traceback or a
retry; only the model download retries, and only on network errors.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State

from ftcore import sources, steps
from ftcore.benchmarks import TaskRef
from ftcore.config import InputError, StudyConfig
from ftcore.plan import ArmPlan, ModelRef
from tasks.arm_process import train_in_subprocess
from tasks.devices import device_count, device_slot, device_slots, visible_gpu

# Prefect's own result cache stays off: the Cached state comes from ftcore's step directories.
UNCACHED = {"cache_policy": NO_CACHE, "persist_result": False}


def cached(step: steps.Step, *args: Any) -> State | None:
    """A Cached state holding the step's recorded result, when its directory verifies."""
    done = steps.recorded(step.where(*args))
    return None if done is None else Completed(name="Cached", data=done)


def quiet_input_errors(fn):
    """Bad input ends the task Failed with the message alone (no traceback), keeping the error for the caller."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            get_run_logger().error(str(exc))
            return Failed(message=str(exc), data=exc)
    return wrapper


def _network_only(task_, task_run, state) -> bool:
    """Retry condition: a network failure is retried, anything else (bad input, a bug) fails at once."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the state's own exception, inspected
        return sources.is_transient(exc)
    return False


# --- tasks -------------------------------------------------------------------------------------

@task(name="fingerprint-corpus", task_run_name="fingerprint-{role}", **UNCACHED)
@quiet_input_errors
def fingerprint_corpus(cfg: StudyConfig, role: str) -> dict[str, Any]:
    """Content fingerprint of the domain, general or replay corpus."""
    return cached(steps.FINGERPRINT, cfg, role) or steps.fingerprint_corpus(cfg, role)


@task(name="fetch-model", task_run_name="fetch-model", retries=2, retry_delay_seconds=10,
      retry_condition_fn=_network_only, **UNCACHED)
@quiet_input_errors
def fetch_model(cfg: StudyConfig) -> dict[str, Any]:
    """The base model as a local directory and its content digest."""
    return cached(steps.FETCH_MODEL, cfg) or steps.fetch_model(cfg)


@task(name="tokenize-domain", task_run_name="tokenize-domain", **UNCACHED)
@quiet_input_errors
def tokenize_domain(cfg: StudyConfig, model: ModelRef, corpus: dict[str, Any]) -> dict[str, Any]:
    """Domain train/test rows as parquet."""
    return cached(steps.TOKENIZE_DOMAIN, cfg, model, corpus) or steps.tokenize_domain(cfg, model, corpus)


@task(name="tokenize-stream", task_run_name="tokenize-{role}", **UNCACHED)
@quiet_input_errors
def tokenize_stream(cfg: StudyConfig, role: str, model: ModelRef, corpus: dict[str, Any]) -> dict[str, Any]:
    """General benchmark or replay corpus as language-modelling chunks."""
    return cached(steps.TOKENIZE_STREAM, cfg, role, model, corpus) or steps.tokenize_stream(cfg, role, model, corpus)


@task(name="evaluate", task_run_name="eval-{label}-{which}", **UNCACHED)
def evaluate(cfg: StudyConfig, model: ModelRef, data: dict[str, Any], which: str,
             arm: dict[str, Any] | None = None, base: dict[str, Any] | None = None,
             label: str = "base") -> dict[str, Any]:
    """Perplexity and bits per byte of the base model or an arm, on one set (with the KL from the base's
    evaluation `base` on the general set); holds a device slot."""
    if done := cached(steps.EVALUATE, cfg, model, data, which, arm, base):
        return done
    logger = get_run_logger()
    with device_slot(label=f"eval-{label}-{which}", log=logger.info) as slot:
        device = f"cuda:{slot}" if device_count() > 1 else None
        return steps.evaluate(cfg, model, data, which, arm, base, device=device)


@task(name="benchmark", task_run_name="bench-{label}-{task.name}", **UNCACHED)
def benchmark(cfg: StudyConfig, model: ModelRef, task: TaskRef, arm: dict[str, Any] | None = None,
              label: str = "base") -> dict[str, Any]:
    """One lm-eval benchmark task on the base model or an arm; holds a device slot."""
    if done := cached(steps.BENCHMARK, cfg, model, task, arm):
        return done
    logger = get_run_logger()
    with device_slot(label=f"bench-{label}-{task.name}", log=logger.info) as slot:
        device = f"cuda:{slot}" if device_count() > 1 else None
        return steps.benchmark(cfg, model, task, arm, device=device)


@task(name="train-arm", task_run_name="train-{plan.label}", **UNCACHED)
def train_arm(plan: ArmPlan, root: str, executor: str = "subprocess",
              deployment: str = "ftstudy-train-arm/train-arm") -> dict[str, Any]:
    """One arm at one seed: in its own process on a free device slot here, or as a run of the train-arm
    deployment on a work pool."""
    if done := cached(steps.TRAIN, plan, root):
        return done
    if executor == "work-pool":
        return train_on_work_pool(plan, root, deployment)
    return train_here(plan, root)


def train_here(plan: ArmPlan, root: str) -> dict[str, Any]:
    """Train one arm in a child process on a free device slot of this machine, its progress in the UI."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, description=f"train-{plan.label}: optimizer steps done (%)")

    def on_progress(p: dict[str, Any]) -> None:
        if p.get("max_steps"):
            update_progress_artifact(progress, 100.0 * p["step"] / p["max_steps"])

    # An arm on N GPUs holds N slots; on a CPU its processes share the one.
    count = plan.train.devices_per_arm if _has_cuda() else 1
    with device_slots(count, label=f"train-{plan.label}", log=logger.info) as slots:
        gpu = ",".join(visible_gpu(slot) for slot in slots) if _has_cuda() else None
        logger.info("train-%s on device slot%s %s%s", plan.label, "s" * (count > 1), ", ".join(map(str, slots)),
                    f" (CUDA_VISIBLE_DEVICES={gpu})" if gpu is not None else "")
        result = train_in_subprocess(plan, root, logger.log, gpu, on_progress)
    update_progress_artifact(progress, 100.0)
    if result["summary"]["resumed_from_step"]:
        logger.info("train-%s resumed from checkpoint step %d", plan.label, result["summary"]["resumed_from_step"])
    publish_curve(plan, root, result)
    return result


def publish_curve(plan: ArmPlan, root: str, result: dict[str, Any]) -> None:
    """The arm's learning and forgetting curve as a table artifact of its run (the points are also in
    TensorBoard, under the arm's checkpoints/runs, and in the study report's plots)."""
    import re

    import pandas as pd
    from prefect.artifacts import create_table_artifact

    if not result.get("curves"):
        return
    df = pd.read_parquet(Path(root) / result["curves"])
    rows = []
    for (step, seen), g in df.groupby(["step", "tokens_seen"], sort=True):
        by = g.set_index("set")
        rows.append({"step": int(step), "tokens seen": int(seen),
                     **{f"{s} ppl": f"{by.loc[s, 'ppl']:.3f}" for s in by.index},
                     **{f"Δ {s}": f"{by.loc[s, 'change_pct']:+.1f}%" for s in by.index}})
    key = "curve-" + re.sub(r"[^a-z0-9-]+", "-", plan.label.lower()).strip("-")
    create_table_artifact(rows, key=key, description=f"train-{plan.label}: domain and general perplexity on the curve "
                                                      "subsample while training, % change against step 0")


def train_on_work_pool(plan: ArmPlan, root: str, deployment: str) -> dict[str, Any]:
    """Run the train-arm deployment and read the arm's result from the shared artifacts root.

    The arm's run is a subflow of this task, so the UI shows it under the study run; the worker
    that picks it up writes to the same artifacts root (a path every worker mounts).
    """
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"plan": plan.model_dump(mode="json"), "root": root}, timeout=None)
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"train-{plan.label}: deployment run {run.name} ({deployment}) ended {state}: "
                           f"{(run.state.message or '') if run.state else ''}"[:400])
    done = steps.recorded(steps.train_dir(plan, root))
    if done is None:
        raise RuntimeError(f"train-{plan.label}: run {run.name} completed but {steps.train_dir(plan, root)} holds no "
                           "finished arm; is artifacts_dir a path every worker mounts (FTSTUDY_ARTIFACTS_DIR)?")
    return done


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@task(name="write-results", task_run_name="write-results", **UNCACHED)
def write_results(cfg: StudyConfig, evals: list[dict[str, Any]], arms: list[dict[str, Any]],
                  failed: dict[str, str], data: dict[str, Any] | None = None,
                  model: ModelRef | None = None, bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """The arms x (domain, general) table (parquet, markdown), the report, the plots and the model cards."""
    args = (cfg, evals, arms, failed, data, model, bench)
    return cached(steps.REPORT, *args) or steps.write_results(*args)


# --- the runner ----------------------------------------------------------------------------------

TASKS = {steps.FINGERPRINT.name: fingerprint_corpus, steps.FETCH_MODEL.name: fetch_model,
         steps.TOKENIZE_DOMAIN.name: tokenize_domain, steps.TOKENIZE_STREAM.name: tokenize_stream,
         steps.EVALUATE.name: evaluate, steps.TRAIN.name: train_arm, steps.REPORT.name: write_results}


class PrefectRunner:
    """ftcore.study's Runner on Prefect: each step a task run; arms and evaluations submitted concurrently."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.labels: dict[int, str] = {}  # train future -> its arm's label, to name the evaluations

    def run(self, step: steps.Step, *args: Any) -> Any:
        return self.submit(step, *args).result()

    def submit(self, step: steps.Step, *args: Any) -> Any:
        if step is steps.TRAIN:
            plan, root = args
            future = train_arm.submit(plan, str(root), self.cfg.executor, self.cfg.train_deployment)
            self.labels[id(future)] = plan.label
            return future
        if step is steps.EVALUATE:
            arm = args[4] if len(args) > 4 else None
            base = args[5] if len(args) > 5 else None
            label = self.labels.get(id(arm)) or (arm["label"] if isinstance(arm, dict) else "base")
            return evaluate.submit(*args[:4], arm=arm, base=base, label=label)
        if step is steps.BENCHMARK:
            arm = args[3] if len(args) > 3 else None
            label = self.labels.get(id(arm)) or (arm["label"] if isinstance(arm, dict) else "base")
            return benchmark.submit(*args[:3], arm=arm, label=label)
        return TASKS[step.name].submit(*args)

    def outcome(self, future: Any) -> tuple[Any, str | None]:
        future.wait()
        if future.state.is_completed():
            return future.result(), None
        return None, (future.state.message or future.state.name).splitlines()[0][:300]


def artifacts_root(root: str) -> str:
    """Where this worker sees the shared artifacts root: FTSTUDY_ARTIFACTS_DIR when the root is mounted
    at another path here (a container, another machine), else the path the study resolved."""
    return str(Path(os.environ.get("FTSTUDY_ARTIFACTS_DIR") or root))


logging.getLogger("ftcore").setLevel(logging.INFO)
