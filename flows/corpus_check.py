"""The scheduled corpus check: start a study only when a corpus it reads has changed.

It computes the cheap identity of every configured corpus source (a file's sha256, a Hub
dataset's commit) and compares it with what the last successful study of the same sources
measured (recorded under the artifacts root). When one differs it emits `ftstudy.corpus.changed`,
which the `study` deployment's trigger turns into a run with the same config; in that run only
the tasks that depend on the changed corpus recompute. Unchanged sources: no event, no run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event

from ftcore import study
from ftcore.config import StudyConfig

EVENT = "ftstudy.corpus.changed"


def resource_id(cfg: StudyConfig) -> str:
    """The event's resource: one per study name, what the study deployment's trigger matches."""
    return f"ftstudy.study.{cfg.name}"


@flow(name="ftstudy-corpus-check", flow_run_name="corpus-check-{config.name}")
def corpus_check_flow(config: StudyConfig) -> dict[str, Any]:
    """Compare the corpus sources with the last successful study; emit an event if one changed."""
    log = get_run_logger()
    versions = study.corpus_versions(config)
    changed = study.changed_corpora(config, versions)
    if not changed:
        log.info("corpora unchanged since the last successful study: %s", ", ".join(versions))
        return {"changed": {}, "versions": versions}
    log.info("corpus changed: %s; emitting %s", "; ".join(f"{r} {why}" for r, why in changed.items()), EVENT)
    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": resource_id(config), "prefect.resource.name": config.name},
        payload={"changed": changed, "versions": versions, "config": config.model_dump(mode="json")},
    )
    return {"changed": changed, "versions": versions, "event_id": str(event.id) if event else None}
