"""The Prefect runner: ftcore.study's DAG with each step a Prefect task run.

One task runs any step: it builds the step from its (resolved) inputs, returns the recorded result
in a `Cached` state when its directory verifies, and otherwise runs it through ftcore.steps.run_step
— on a free device slot when the step runs a model, and for an arm in its own process (or as a run
of the train-arm deployment on a work pool). Prefect persists no results of its own, so nothing in
Prefect's storage can disagree with the artifacts, go stale, or point at an old artifacts root.

Bad input (ftcore's InputError) fails a task without a traceback or a retry; only the model fetch
retries, and only on network errors.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Completed, Failed

from ftcore import sources, study
from ftcore.config import InputError, StudyConfig
from ftcore.results import TrainedArm
from ftcore.steps import Define, Step, recorded, run_step
from tasks.arm_process import STOPPING, ArmStopped, prestart_fork_server, train_in_subprocess
from tasks.devices import TRAINING, StoppedError, device_count, device_slots, has_cuda, visible_gpu


def _network_only(task_, task_run, state) -> bool:
    """Retry condition: a network failure is retried, anything else (bad input, a bug) fails at once."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the state's own exception, inspected
        return sources.is_transient(exc)
    return False


# Prefect's own result cache stays off: the Cached state comes from ftcore's step directories.
@task(name="step", task_run_name="{label}", cache_policy=NO_CACHE, persist_result=False)
def step_task(define: Define, args: tuple, label: str, executor: str = "subprocess",
              deployment: str = "ftstudy-train-arm/train-arm") -> Any:
    """One step of the study, named for what it computes (train-full, eval-lora-general, ...)."""
    try:
        step = define(*args)
        if (done := recorded(step)) is not None:
            return Completed(name="Cached", data=done)
        if STOPPING.is_set():  # stopped while this task waited for its inputs: compute nothing new
            raise StoppedError(f"{label}: not started: the study is stopping")
        if step.arm is not None:
            return train_on_work_pool(step, deployment) if executor == "work-pool" else train_here(step)
        if not step.devices:
            return run_step(step)
        with device_slots(step.devices, label=step.label, log=get_run_logger().info, stop=STOPPING) as slots:
            return run_step(step, device=f"cuda:{slots[0]}" if device_count() > 1 else None)
    except InputError as exc:  # the message alone: no traceback, no retry; the caller gets the error
        get_run_logger().error(str(exc))
        return Failed(message=str(exc), data=exc)
    except (ArmStopped, StoppedError) as exc:  # stopped with the study: one line, not a traceback per task
        get_run_logger().info(str(exc))
        return Cancelled(message=str(exc))


class PrefectRunner:
    """ftcore.study's Runner on Prefect: each step a task run; arms and evaluations submitted concurrently."""

    arms_in_process = False

    def __init__(self, cfg: StudyConfig):
        self.executor, self.deployment = cfg.executor, cfg.train_deployment

    def run(self, define: Define, *args: Any, label: str) -> Any:
        return self.submit(define, *args, label=label).result()

    def submit(self, define: Define, *args: Any, label: str) -> Any:
        options = {"retries": 2, "retry_delay_seconds": 10, "retry_condition_fn": _network_only} \
            if define is study.fetch_model else {}
        # Named for its label: a task run waiting to start reads "eval-full-general-0" in the UI, not "evaluate-7ab"
        # (Prefect names a run <task name>-<key> until task_run_name is rendered when it starts).
        return step_task.with_options(name=label, **options).submit(define, args, label, self.executor, self.deployment)

    def outcome(self, future: Any) -> tuple[Any, str | None]:
        future.wait()
        if future.state.is_completed():
            return future.result(), None
        return None, (future.state.message or future.state.name).splitlines()[0][:300]


# --- an arm in its own process, or on a work pool ------------------------------------------------------

def train_here(step: Step) -> TrainedArm:
    """Train one arm in a child process on free device slots of this machine, its progress in the UI."""
    plan, root = step.arm, str(step.root)
    cuda = has_cuda()
    # A root the arm cannot write to fails now, not after its libraries' imports (seconds of a core) have started.
    step.dir.parent.mkdir(parents=True, exist_ok=True)
    if not cuda:
        prestart_fork_server(plan, None)  # first: its imports overlap what follows, the wait for a slot included
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, description=f"{step.label}: optimizer steps done (%)")

    def on_progress(p: dict[str, Any]) -> None:
        if p.get("max_steps"):
            update_progress_artifact(progress, 100.0 * p["step"] / p["max_steps"])

    # An arm on N GPUs holds N slots; on a CPU its processes share the one.
    count = plan.train.devices_per_arm if cuda else 1
    with device_slots(count, label=step.label, log=logger.info, stop=STOPPING, priority=TRAINING) as slots:
        gpu = ",".join(visible_gpu(slot) for slot in slots) if cuda else None
        logger.info("%s on device slot%s %s%s", step.label, "s" * (count > 1), ", ".join(map(str, slots)),
                    f" (CUDA_VISIBLE_DEVICES={gpu})" if gpu is not None else "")
        arm = train_in_own_process(step, logger.log, gpu, on_progress)
    update_progress_artifact(progress, 100.0)
    if arm.summary["resumed_from_step"]:
        logger.info("%s resumed from checkpoint step %d", step.label, arm.summary["resumed_from_step"])
    publish_curve(step.label, root, arm)
    return arm


def train_in_own_process(step: Step, log: Callable[[int, str], None], gpu: str | None = None,
                         on_progress: Callable[[dict[str, Any]], None] | None = None) -> TrainedArm:
    """Run a training step with the arm in a child process (tasks.arm_process; under torchrun on the GPUs `gpu`
    lists for an arm on several devices); this process holds the step's lock and records its result."""
    plan = step.arm
    return run_step(step, compute=lambda out, device: study.trained(
        plan, train_in_subprocess(plan, step.root, log, gpu, on_progress)))


def publish_curve(label: str, root: str, arm: TrainedArm) -> None:
    """The arm's learning and forgetting curve as a table artifact of its run (the points are also in
    TensorBoard, under the arm's checkpoints/runs, and in the study report's plots)."""
    import pandas as pd

    if not arm.curves:
        return
    df = pd.read_parquet(Path(root) / arm.curves)
    rows = []
    for (step, seen), g in df.groupby(["step", "tokens_seen"], sort=True):
        by = g.set_index("set")
        rows.append({"step": int(step), "tokens seen": int(seen),
                     **{f"{s} ppl": f"{by.loc[s, 'ppl']:.3f}" for s in by.index},
                     **{f"Δ {s}": f"{by.loc[s, 'change_pct']:+.1f}%" for s in by.index}})
    key = "curve-" + re.sub(r"[^a-z0-9-]+", "-", arm.label.lower()).strip("-")
    create_table_artifact(rows, key=key, description=f"{label}: domain and general perplexity on the curve "
                                                      "subsample while training, % change against step 0")


def train_on_work_pool(step: Step, deployment: str) -> TrainedArm:
    """Run the train-arm deployment and read the arm's result from the shared artifacts root.

    The arm's run is a subflow of this task, so the UI shows it under the study run; the worker
    that picks it up records the step in the same artifacts root (a path every worker mounts).
    """
    from prefect.deployments import run_deployment

    root = str(step.root)
    # Created without waiting (timeout 0), so a stopped study can cancel it (cancel_pool_arms) while it runs.
    run = run_deployment(deployment, parameters={"plan": step.arm.model_dump(mode="json"), "root": root}, timeout=0)
    POOL_RUNS.add(run.id)
    if STOPPING.is_set():  # the study stopped while this run was being created: cancel_pool_arms may have missed it
        cancel_pool_arms()
    try:
        run = wait_for_run(run.id)
    finally:
        POOL_RUNS.discard(run.id)
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"{step.label}: deployment run {run.name} ({deployment}) ended {state}: "
                           f"{(run.state.message or '') if run.state else ''}"[:400])
    done = recorded(step)
    if done is None:
        raise RuntimeError(f"{step.label}: run {run.name} completed but {step.dir} holds no finished arm; is "
                           "artifacts_dir a path every worker mounts (FTSTUDY_ARTIFACTS_DIR)?")
    return done


# The train-arm runs this process started on a work pool and waits for: a stopped study cancels them.
POOL_RUNS: set[Any] = set()
CANCELLED_WITH_STUDY = "cancelled with its study (the study was cancelled or stopped)"
STOP_WAIT_S = 120.0  # after a stop, how long a task waits for its cancelled arm run to end before it gives up


def wait_for_run(run_id: Any) -> Any:
    """The flow run `run_id` once it is final, read every second (Prefect polls every 5: the study's next steps
    wait on it; one light API read a second per arm). After a stop, at most STOP_WAIT_S: a cancelled run whose
    worker is gone would never end, and the study's process waits for this thread before it exits."""
    import time

    from prefect.client.orchestration import get_client

    stopped_at = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            if STOPPING.is_set():
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > STOP_WAIT_S:
                    return run
            time.sleep(1)


def cancel_pool_arms() -> int:
    """Ask the server to cancel every train-arm run this process waits for (Prefect's Cancelling state, as the UI's
    Cancel sets it, with the message CANCELLED_WITH_STUDY: the arm's worker stops its process, its checkpoints stay
    for the retry); return how many. Called when a study is cancelled or stopped. Prefect's server cancels a
    cancelled run's subflows only in its next cancellation sweep (every 20 s by default): until then the arms
    trained on, and the study's process, waiting for them, was killed by its worker after 30 s (seen: an arm
    trained 37 s past the study's end)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    if not POOL_RUNS:
        return 0
    asked = 0
    with get_client(sync_client=True) as client:
        for run_id in list(POOL_RUNS):
            try:
                client.set_flow_run_state(run_id, State(type=StateType.CANCELLING, message=CANCELLED_WITH_STUDY))
                asked += 1
            except Exception as exc:  # noqa: BLE001 - one refusal must not keep the others running
                logging.getLogger(__name__).warning("could not cancel arm run %s: %s", run_id, exc)
    return asked


def artifacts_root(root: str) -> str:
    """Where this worker sees the shared artifacts root: FTSTUDY_ARTIFACTS_DIR when the root is mounted
    at another path here (a container, another machine), else the path the study resolved."""
    return str(Path(os.environ.get("FTSTUDY_ARTIFACTS_DIR") or root))


logging.getLogger("ftcore").setLevel(logging.INFO)
