"""The scheduled corpus check: start a study only when a corpus it reads has changed.

It computes the cheap identity of every configured corpus source (a file's sha256, a Hub
dataset's commit) and compares it with what the last successful study of the same sources
measured (recorded under the artifacts root). When one differs it emits `ftstudy.corpus.changed`,
which the `study` deployment's trigger turns into a run with the same config; in that run only
the tasks that depend on the changed corpus recompute. Unchanged sources, or no successful study
of them recorded yet (a fresh server): no event, no run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event

from ftcore import inputs
from ftcore.config import StudyConfig

EVENT = "ftstudy.corpus.changed"


def resource_id_prefix() -> str:
    return "ftstudy.study."


def resource_id(cfg: StudyConfig) -> str:
    """The event's resource: one per study name, what the study deployment's trigger matches."""
    return f"{resource_id_prefix()}{cfg.name}"


def _same_corpora(a: StudyConfig, b: StudyConfig) -> bool:
    a, b = inputs.resolve_paths(a), inputs.resolve_paths(b)
    roles = inputs.corpus_roles(a)
    return roles == inputs.corpus_roles(b) and all(a.corpus(r) == b.corpus(r) for r in roles)


def _study_in_progress(config: StudyConfig):
    """A scheduled, pending or running study flow run over the same corpora, if any."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    active = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["ftstudy"])),
                                     flow_run_filter=FlowRunFilter(state=active))
    for run in runs:
        try:
            other = StudyConfig.model_validate(run.parameters.get("config") or {})
        except ValueError:
            continue
        if _same_corpora(config, other):
            return run
    return None


@flow(name="ftstudy-corpus-check", flow_run_name="corpus-check-{config.name}")
def corpus_check_flow(config: StudyConfig) -> dict[str, Any]:
    """Compare the corpus sources with the last successful study; emit an event if one changed."""
    log = get_run_logger()
    config = inputs.resolve_paths(config)  # as the study resolves them, so both read the same record
    versions = inputs.corpus_versions(config)
    if not inputs.has_recorded_versions(config):
        # Nothing to re-run: a fresh server must not start a long study that nobody asked for.
        log.info("no successful study of these corpora is recorded under %s yet: nothing to re-run (start the "
                 "first one from the ftstudy/study deployment)", config.artifacts_dir)
        return {"changed": {}, "versions": versions, "recorded": False}
    changed = inputs.changed_corpora(config, versions)
    if not changed:
        log.info("corpora unchanged since the last successful study: %s", ", ".join(versions))
        return {"changed": {}, "versions": versions}
    if busy := _study_in_progress(config):
        # Its success will record these versions; another run now would only wait on its locks.
        log.info("corpus changed (%s), but study run %s of the same corpora is %s; not emitting",
                 ", ".join(changed), busy.name, busy.state.name)
        return {"changed": changed, "versions": versions, "in_progress": str(busy.id)}
    log.info("corpus changed: %s; emitting %s", "; ".join(f"{r} {why}" for r, why in changed.items()), EVENT)
    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": resource_id(config), "prefect.resource.name": config.name},
        payload={"changed": changed, "versions": versions, "config": config.model_dump(mode="json")},
    )
    return {"changed": changed, "versions": versions, "event_id": str(event.id) if event else None}
