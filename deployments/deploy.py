"""`ftstudy deploy`: the three deployments (and a study form per preset), their work pools, schedule and trigger, defined in code.

  ftstudy/study                      the whole study; its parameter is the study config (the UI form),
                                     filled from a preset (`--preset`, default demo) with the arms on the
                                     work pool: the preset is referred to, never copied here
  ftstudy-train-arm/train-arm        one arm, on the GPU pool; the study's work-pool executor runs it
  ftstudy-corpus-check/corpus-check  scheduled; emits ftstudy.corpus.changed only when a corpus changed,
                                     which triggers ftstudy/study with the same config
  ftstudy/<preset>                   the study with another preset's values in the form (smoke, demo,
                                     demo-base, ...): pick a preset in the UI by picking its deployment

Code location: the deployments run the flows from this source tree (Prefect's local storage), so a
worker on this machine, or one that mounts the same path, runs them. Workers elsewhere need the
project installed and the same path, or a git source (see docs). Every artifact, and the cache,
live under the config's `artifacts_dir`; with workers on several machines make it a path every
worker mounts (or set FTSTUDY_ARTIFACTS_DIR on a worker that mounts it elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STUDY_POOL, ARM_POOL = "ftstudy", "ftstudy-gpu"
# ftcore's progress lines (tokens scored, steps, ETA) in the run logs.
ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "ftcore", "TOKENIZERS_PARALLELISM": "false"}
# Each arm takes one free GPU of its machine (a lock per GPU); restrict a worker to some GPUs with
# CUDA_VISIBLE_DEVICES in its environment or in these job variables.
ARM_ENV = {**ENV, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
CHECK_CRON = "0 * * * *"


def default_artifacts() -> Path:
    """Where deployed studies write by default: $FTSTUDY_ARTIFACTS_DIR, else ./artifacts of the deploying shell."""
    import os

    return Path(os.environ.get("FTSTUDY_ARTIFACTS_DIR") or "artifacts").expanduser().resolve()


def default_config(preset: str = "demo", artifacts: str | Path | None = None) -> dict[str, Any]:
    """The run form's defaults: the preset, with its arms sent to the GPU work pool, every path absolute
    (the corpora under FTSTUDY_DATA, the artifacts root), so a worker in any directory reads and
    writes the same places (JSON)."""
    from ftcore.config_files import load_config
    from ftcore.inputs import resolve_paths

    cfg = load_config(preset, executor="work-pool", artifacts_dir=str(artifacts or default_artifacts()))
    return resolve_paths(cfg).model_dump(mode="json")


def deploy(preset: str = "demo", study_pool: str = STUDY_POOL, arm_pool: str = ARM_POOL,
           check_cron: str | None = CHECK_CRON, artifacts: str | Path | None = None) -> list[str]:
    """Register the three deployments with the Prefect server at PREFECT_API_URL; return their names."""
    from prefect import flow
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    from flows.corpus_check import EVENT, resource_id_prefix

    params = {"config": default_config(preset, artifacts)}
    study = flow.from_source(str(ROOT), "flows/study.py:study_flow")
    study.deploy(
        name="study", work_pool_name=study_pool, build=False, push=False, print_next_steps=False,
        description="What does fine-tuning cost you? Base vs each arm on domain and general perplexity.",
        tags=["ftstudy"], parameters=params, job_variables={"env": ENV},
        # Fired by the corpus check; the run gets the check's config, so both always mean the same study.
        triggers=[DeploymentEventTrigger(expect={EVENT}, match={"prefect.resource.id": f"{resource_id_prefix()}*"},
                                         parameters={"config": "{{ event.payload.config }}"})],
    )
    arm = flow.from_source(str(ROOT), "flows/train_arm.py:train_arm_flow")
    arm.deploy(name="train-arm", work_pool_name=arm_pool, build=False, push=False, print_next_steps=False,
               description="One arm of a study at one seed; started by the study's work-pool executor.",
               tags=["ftstudy"], job_variables={"env": ARM_ENV})
    presets = []
    for name, about in preset_forms(preset, artifacts).items():  # a form per preset: no ten fields to edit
        study.deploy(name=name, work_pool_name=study_pool, build=False, push=False, print_next_steps=False,
                     description=f"The study, its form filled from the {name} preset: {about}.", tags=["ftstudy"],
                     parameters={"config": default_config(name, artifacts)}, job_variables={"env": ENV})
        presets.append(f"ftstudy/{name}")
    check = flow.from_source(str(ROOT), "flows/corpus_check.py:corpus_check_flow")
    check.deploy(name="corpus-check", work_pool_name=study_pool, build=False, push=False, print_next_steps=False,
                 description="Emit ftstudy.corpus.changed (which starts the study) only when a corpus source changed.",
                 tags=["ftstudy"], parameters=params, job_variables={"env": ENV},
                 schedules=[Cron(check_cron, timezone="UTC")] if check_cron else None)
    return ["ftstudy/study", "ftstudy-train-arm/train-arm", "ftstudy-corpus-check/corpus-check", *presets]


def preset_forms(preset: str, artifacts: str | Path | None = None) -> dict[str, str]:
    """The presets that get a deployment of their own ({name: what it is for}): every preset but `preset` (the
    study deployment's own), those whose data is here (or on the Hub) and whose config loads."""
    from ftcore.config import ConfigError
    from ftcore.presets import ABOUT, MissingDataError

    forms = {}
    for name, about in ABOUT.items():
        if name == preset:
            continue
        try:
            default_config(name, artifacts)
        except (ConfigError, MissingDataError):
            continue
        forms[name] = about
    return forms
