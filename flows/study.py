"""The study as a Prefect flow: ftcore.study's one DAG, run through Prefect tasks.

The step order lives in `ftcore.study.run_study`; this flow only validates the input first, hands
the DAG a PrefectRunner (cached tasks, arms in their own processes or on a work pool, each on a
device slot) and publishes the results to the UI. Bad input fails the run with the message alone;
an arm that fails does not stop the others: the report lists it and the run ends Failed after the
results are written, so schedules and alerts notice while the finished arms are kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from ftcore import study
from ftcore.config import InputError, StudyConfig
from tasks.steps import PrefectRunner

# ftcore reports progress (tokens scored, steps trained, ETA) at INFO; Prefect forwards the
# "ftcore" logger to the run's logs when PREFECT_LOGGING_EXTRA_LOGGERS names it.
logging.getLogger("ftcore").setLevel(logging.INFO)


@flow(name="ftstudy", flow_run_name="study-{config.name}", log_prints=True)
def study_flow(config: StudyConfig) -> dict[str, Any]:
    """Measure what fine-tuning costs: domain gain vs general forgetting for each arm."""
    log = get_run_logger()
    try:
        cfg = study.check_inputs(config)
        check_executor(cfg)
        results = study.run_study(cfg, PrefectRunner(cfg))
    except InputError as exc:
        log.error(str(exc))
        return Failed(message=str(exc), data=exc)
    publish(Path(cfg.artifacts_dir), results)
    if results["failed"]:
        raise RuntimeError(f"arm(s) failed: {', '.join(results['failed'])}; finished arms and the report are kept: "
                           f"{Path(cfg.artifacts_dir) / results['report']}")
    return results


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
            raise study.StudyError(
                f"train_deployment: no deployment {cfg.train_deployment!r} on the Prefect server at "
                f"{client.api_url}; run `ftstudy serve` (or `ftstudy deploy` and start a worker on its "
                "ftstudy-gpu pool) and point PREFECT_API_URL at it, or use executor=subprocess") from None


def publish(root: Path, results: dict[str, Any]) -> None:
    """The table and the report as artifacts of the run, for the Prefect UI."""
    import pandas as pd

    table = pd.read_parquet(root / results["table"]).round(4)
    table = table.astype(object).where(table.notna(), None)  # JSON has no NaN (std of a single seed)
    create_table_artifact(table.to_dict("records"), key="ftstudy-table",
                          description="Per arm: perplexity (domain / general), % change against base with std over "
                                      "seeds and 95% bootstrap interval over documents, within-noise marks, Pareto front")
    text = (root / results["report"]).read_text()
    files = "\n".join(f"- {name}: `{path}`" for name, path in study.report_files(root, results).items())
    failures = "\n".join(f"- **{arm} failed**: {why}" for arm, why in results["failed"].items())
    create_markdown_artifact(text + "\n## Files\n\n" + files + ("\n\n## Failed arms\n\n" + failures if failures else ""),
                             key="ftstudy-report", description="Fine-tuning cost study report")
