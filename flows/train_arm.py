"""One arm as its own flow: what the `train-arm` deployment runs on a (GPU) work pool.

The study's work-pool executor starts one run of this deployment per arm and seed, with the arm's
resolved plan (ftcore.plan.ArmPlan) and the artifacts root; the arms fan out across the pool's
workers and join back in the study's results task. The worker trains the plan in a child process
on a free device slot of its machine, in the plan's directory of the shared artifacts root; a
finished arm directory is reused, a killed one resumes from its newest checkpoint. A worker that
mounts the root at another path sets FTSTUDY_ARTIFACTS_DIR.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger

from ftcore import study
from ftcore.plan import ArmPlan
from ftcore.steps import recorded
from tasks.runner import artifacts_root, train_here

logging.getLogger("ftcore").setLevel(logging.INFO)


@flow(name="ftstudy-train-arm", flow_run_name="train-{plan.label}-{plan.key}", log_prints=True)
def train_arm_flow(plan: ArmPlan, root: str) -> dict[str, Any]:
    """Train one planned arm under the artifacts root and return its recorded result."""
    step = study.train(plan, artifacts_root(root))
    if (done := recorded(step)) is None:
        done = train_here(step)
    else:
        get_run_logger().info("%s: already trained in %s", step.label, plan.dir)
    return done.model_dump(mode="json")
