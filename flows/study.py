"""The study DAG: fetch -> tokenize -> baseline eval -> arms fan out -> final evals -> results.

Arms are submitted together; each holds a device slot while it trains, so they run side by side
on a multi-GPU machine and one after another on a CPU. An arm that fails does not stop the
others: its evaluations are skipped, the report lists it, and the flow ends Failed after the
results are written, so schedules and alerts notice while the finished arms are kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ftcore import study
from ftcore.config import StudyConfig
from tasks import steps

# ftcore reports progress (tokens scored, steps trained, ETA) at INFO; Prefect forwards the
# "ftcore" logger to the run's logs when PREFECT_LOGGING_EXTRA_LOGGERS names it.
logging.getLogger("ftcore").setLevel(logging.INFO)


def _tasks(cfg: StudyConfig) -> SimpleNamespace:
    """The steps with result storage under this study's artifacts root (shared by every worker)."""
    storage = steps.result_storage(cfg)
    names = ("fingerprint_corpus", "fetch_model", "tokenize_domain", "tokenize_stream", "evaluate", "train_arm",
             "write_results")
    return SimpleNamespace(**{n: getattr(steps, n).with_options(result_storage=storage) for n in names})


@flow(name="ftstudy", flow_run_name="study-{config.name}", log_prints=True)
def study_flow(config: StudyConfig) -> dict[str, Any]:
    """Measure what fine-tuning costs: domain gain vs general forgetting for each arm."""
    cfg = config
    log = get_run_logger()
    t = _tasks(cfg)
    study.check_artifacts_dir(cfg)
    _check_executor(cfg)
    roles = study.corpus_roles(cfg)
    versions = study.corpus_versions(cfg)  # what the corpus check compares against after success
    # Fingerprints first: a bad corpus fails here, before any model is loaded.
    fps = {role: t.fingerprint_corpus(cfg, role) for role in roles}
    model = t.fetch_model(cfg)
    domain = t.tokenize_domain(cfg, model, fps["domain"])
    general = t.tokenize_stream(cfg, "general", model, fps["general"])
    replay = t.tokenize_stream(cfg, "replay", model, fps["replay"]) if "replay" in roles else None
    study.check_replay_budget(cfg, domain, replay)  # before any model is loaded for eval or training
    data = {"domain": domain, "general": general}

    base = [t.evaluate.submit(cfg, model, data[w], w) for w in data]
    # One branch per arm and seed; each seed's run is the config with train.seed set to it.
    runs = {cfg.run_label(arm, seed): (cfg.with_seed(seed), arm) for seed in cfg.run_seeds for arm in cfg.arm_names}
    trained = {label: t.train_arm.submit(scfg, arm, model, domain, replay, label=label)
               for label, (scfg, arm) in runs.items()}
    arm_evals = {label: [t.evaluate.submit(cfg, model, data[w], w, arm=fut, label=label) for w in data]
                 for label, fut in trained.items()}

    evals = [f.result() for f in base]
    arms, failed = [], {}
    for label, fut in trained.items():
        fut.wait()
        if not fut.state.is_completed():
            failed[label] = _reason(fut.state)
            log.error("train-%s failed: %s", label, failed[label])
            continue
        arms.append(fut.result())
        evals += [f.result() for f in arm_evals[label]]

    results = t.write_results(cfg, evals, arms, failed)
    study.mark_latest(cfg, results)
    _publish(results, failed)
    if failed:
        raise RuntimeError(f"arm(s) failed: {', '.join(failed)}; finished arms and the report are kept: {results['report']}")
    study.record_corpus_versions(cfg, versions)
    return results


def _check_executor(cfg: StudyConfig) -> None:
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
                f"{client.api_url}; run `ftstudy serve` (or deploy deployments/prefect.yaml and start a worker on "
                "its ftstudy-gpu pool) and point PREFECT_API_URL at it, or use executor=subprocess") from None


def _reason(state) -> str:
    message = state.message or state.name
    return message.splitlines()[0][:300]


def _publish(results: dict[str, Any], failed: dict[str, str]) -> None:
    """The table and the report as artifacts of the run, for the Prefect UI."""
    import pandas as pd

    table = pd.read_parquet(results["table"]).round(4)
    table = table.astype(object).where(table.notna(), None)  # JSON has no NaN (std of a single seed)
    create_table_artifact(table.to_dict("records"), key="ftstudy-table",
                          description="Per arm: perplexity (domain / general), % change against base with std over "
                                      "seeds and 95% bootstrap interval over documents, within-noise marks, Pareto front")
    text = Path(results["report"]).read_text()
    files = "\n".join(f"- {name}: `{path}`" for name, path in results.items() if name != "key")
    failures = "\n".join(f"- **{arm} failed**: {why}" for arm, why in failed.items())
    create_markdown_artifact(text + "\n## Files\n\n" + files + ("\n\n## Failed arms\n\n" + failures if failures else ""),
                             key="ftstudy-report", description="Fine-tuning cost study report")
