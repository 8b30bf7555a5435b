"""The study as a Prefect flow: ftcore.study's one DAG, run through Prefect tasks.

The step order lives in `ftcore.study.run_study`; this flow only validates the input first, hands
the DAG a PrefectRunner (cached tasks, arms in their own processes or on a work pool, each on a
device slot) and publishes the results to the UI. Bad input fails the run with the message alone;
an arm that fails does not stop the others: the report lists it and the run ends Failed after the
results are written, so schedules and alerts notice while the finished arms are kept.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from ftcore import gate, inputs, study
from ftcore.config import ConfigError, InputError, StudyConfig
from ftcore.config_files import describe_error
from tasks.arm_process import STOPPING, fork_arms_enabled, prestart_for_study, stop_arms
from tasks.arm_worker import hide_unused_libraries
from tasks.runner import PrefectRunner, cancel_pool_arms

# ftcore reports progress (tokens scored, steps trained, ETA) at INFO; Prefect forwards the
# "ftcore" logger to the run's logs when PREFECT_LOGGING_EXTRA_LOGGERS names it.
logging.getLogger("ftcore").setLevel(logging.INFO)


def run_name() -> str:
    """study-<name>-<UTC time>-<run id prefix>: two runs of the same config are told apart in the UI."""
    from datetime import datetime, timezone

    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    name = config.name if isinstance(config, StudyConfig) else (config or {}).get("name", "study")
    return f"study-{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{str(flow_run.id)[:4]}"


# Prefect's own parameter validation would fail a bad form with its tracebacks before the flow runs;
# the flow validates the config itself, first, and fails with the message alone. The form is still
# rendered from the StudyConfig annotation, and the server still refuses a wrong type.
@flow(name="ftstudy", flow_run_name=run_name, log_prints=True, validate_parameters=False)
def study_flow(config: StudyConfig) -> dict[str, Any]:
    """Measure what fine-tuning costs: domain gain vs general forgetting for each arm."""
    STOPPING.clear()  # an earlier study stopped in this process does not stop this one
    try:
        fork_arms_enabled()  # this process's environment (a work-pool arm's worker checks its own when the arm starts)
        cfg = validated(config)
        hide_unused_libraries_in_own_process(cfg)
        checked = inputs.check_inputs(cfg)
        check_executor(checked.cfg)
        prestart_for_study(checked.cfg)
        results = study.run_study(checked, PrefectRunner(checked.cfg))
    except InputError as exc:  # the run's state carries the message; no traceback, no second copy in the log
        return Failed(message=str(exc), data=exc)
    except BaseException:
        # Ctrl-C, or SIGTERM (Prefect's own handler raises it here: a scheduler's stop, a cancellation):
        # stop the arms' processes now. Prefect waits for its task threads before the run ends, and
        # those wait for their arm, which would otherwise train on. Checkpoints stay for the rerun.
        if stop_arms() + cancel_pool_arms():
            print("ftstudy: stopping the running arms; their checkpoints are kept", file=sys.stderr)
        raise
    verdict = gate.study_verdict(checked.cfg, study.report_files(checked.root, results))
    publish(checked.root, results, verdict)
    if results.get("failed_tasks") and not results["failed"]:
        raise RuntimeError(f"benchmark step(s) failed: {', '.join(results['failed_tasks'])}; the arms, the other "
                           f"steps and the report are kept: {checked.root / results['report']}")
    if results["failed"]:
        raise RuntimeError(f"arm(s) failed: {', '.join(results['failed'])}; finished arms and the report are kept: "
                           f"{checked.root / results['report']}")
    if verdict and not verdict.passed:  # results kept; a CI pipeline and the UI both see the verdict
        return Failed(message=verdict.line, name="Over budget", data=gate.OverBudget(verdict))
    return results


def hide_unused_libraries_in_own_process(cfg: StudyConfig) -> None:
    """In a process a worker started for this flow run alone (Prefect's workers set PREFECT__FLOW_RUN_ID in it): the
    libraries none of its arms needs hidden before they are imported (tasks.arm_worker.hide_unused_libraries). A
    process that runs flows in-process (a test's, a script's) may run a QLoRA study later and keeps them."""
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        hide_unused_libraries(arm.method for arm in cfg.arms)


def validated(config: StudyConfig | dict[str, Any]) -> StudyConfig:
    """The config as a StudyConfig; ConfigError with one line per invalid field (as `ftstudy run` prints them)."""
    from pydantic import ValidationError

    if isinstance(config, StudyConfig):
        return config
    try:
        return StudyConfig.model_validate(config)
    except ValidationError as exc:
        raise ConfigError("invalid config:\n" + describe_error(exc)) from None


def check_executor(cfg: StudyConfig) -> None:
    """With executor=work-pool, the train-arm deployment must exist on this server before anything runs."""
    if cfg.executor != "work-pool":
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(cfg.train_deployment)
        except ObjectNotFound:
            raise inputs.StudyError(
                f"train_deployment: no deployment {cfg.train_deployment!r} on the Prefect server at "
                f"{client.api_url}; run `ftstudy serve` (or `ftstudy deploy` and start a worker on its "
                "ftstudy-gpu pool) and point PREFECT_API_URL at it, or use executor=subprocess") from None


def publish(root: Path, results: dict[str, Any], verdict: gate.Verdict | None = None) -> None:
    """The table and the report as artifacts of the run, for the Prefect UI: the table as the report shows
    it (the raw numbers stay in table.parquet), the report with its plots embedded (the UI cannot
    fetch files from the artifacts root)."""
    import pandas as pd

    from ftcore import report

    files = study.report_files(root, results)
    table = pd.read_parquet(files["table"])
    headline = files["headline"].read_text() + "\n" if "headline" in files else ""  # the arms at equal domain gain
    headline = (f"Gate: {verdict.line}\n\n" if verdict else "") + headline
    create_table_artifact(report.compact_rows(table), key="ftstudy-table",
                          description=headline + "At the end of training, per arm: % change of perplexity against "
                                      "base ± std over seeds [95% bootstrap interval over documents], ≈ within noise, "
                                      "KL(base‖arm) in nats per token, ● on the Pareto front. "
                                      f"{report.base_perplexity_line(table)}. Perplexities, bits per byte and the KL's "
                                      "intervals: the report's table.md")
    if "tasks" in files:  # benchmark tasks: score and change per task and model
        tasks = pd.read_parquet(files["tasks"])
        create_table_artifact(json.loads(tasks.to_json(orient="records")), key="ftstudy-tasks",
                              description="Benchmark tasks (lm-evaluation-harness): score per model and task, change "
                                          "against base (points; % for a perplexity task) [95% paired bootstrap "
                                          "interval over examples]")
    text = report.embed_images(files["report"].read_text(), files["report"].parent)
    text = (f"**Gate: {verdict.line}**\n\n" if verdict else "") + text
    listing = "\n".join(f"- {name}: `{path}`" for name, path in files.items())
    failures = "\n".join(f"- **{arm} failed**: {why}" for arm, why in
                          (results["failed"] | results.get("failed_tasks", {})).items())
    create_markdown_artifact(text + "\n## Files\n\n" + listing + ("\n\n## Failed arms\n\n" + failures if failures else ""),
                             key="ftstudy-report", description="Fine-tuning cost study report")
