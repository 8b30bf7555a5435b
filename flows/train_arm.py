"""One arm as its own flow: what the `train-arm` deployment runs on a (GPU) work pool.

The study flow's work-pool executor starts one run of this deployment per arm, so the arms fan
out across the pool's workers and join back in the study's results task. The arm trains in a
child process on a free device slot of the worker's machine, in the same keyed directory of the
shared artifacts root that the study computed; a finished arm directory is reused, a killed one
resumes from its newest checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow

from ftcore.config import StudyConfig
from tasks.steps import train_in_subprocess

logging.getLogger("ftcore").setLevel(logging.INFO)


@flow(name="ftstudy-train-arm", flow_run_name="train-{arm}-s{config.train.seed}-{config.name}", log_prints=True)
def train_arm_flow(config: StudyConfig, arm: str, model: dict[str, Any], domain: dict[str, Any],
                   replay: dict[str, Any] | None = None, key: str | None = None) -> dict[str, Any]:
    """Train one arm of a study (a name from config.arms) at config.train.seed and return where it is."""
    config.arm(arm)  # an unknown arm fails here, naming the arms there are
    return train_in_subprocess(config, arm, model, domain, replay, key)
