"""Entry point of an arm's own process: `python -m tasks.arm_worker REQUEST.json`.

Training runs in a child process so that a crash or an out-of-memory kill takes down that arm
alone, and so the arm sees only its own device (CUDA_VISIBLE_DEVICES set by the parent).
"""

from __future__ import annotations

import json
import logging
import sys

from ftcore import study
from ftcore.config import StudyConfig


def main(request_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    request = json.loads(open(request_path).read())
    cfg = StudyConfig.model_validate(request["config"])
    result = study.train_arm(cfg, request["arm"], request["model"], request["domain"], request["replay"],
                             key=request["key"])
    with open(request["result_path"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
