"""An arm's start: forked from the arm fork server (its libraries imported once) against a fresh process.

    .venv/bin/python -m bench.arm_start [--repeats 3]

The demo's full arm (SmolLM2-135M, its data under bench-artifacts/), started as a study starts it
(`tasks.arm_process.start_arm`) and stopped after its first optimizer step; timed from the start to its first log line from ftcore and to that
step's progress event (the same moment where, as in the demo, the arm's first line from ftcore is its first step), alternating: afresh (`python -m tasks.arm_worker`, FTSTUDY_FORK_ARMS=0) and forked. The
first forked start, which starts the fork server (its imports), is reported apart. Medians.
"""

from __future__ import annotations

import argparse
import multiprocessing.forkserver
import os
import shutil
import statistics
import time
from pathlib import Path

from bench.common import demo_config, prepared, record
from ftcore import study
from tasks import arm_process


def first_step_seconds(plan, root) -> tuple[float, float, str]:
    """Seconds from starting the arm's process to its first log line from ftcore (its libraries imported, the
    model about to load) and to its first optimizer step, and the process's kind."""
    shutil.rmtree(root / plan.dir, ignore_errors=True)
    start, first_log = time.perf_counter(), None
    proc = arm_process.start_arm(plan, root, None)
    try:
        for line in proc.stdout:
            if first_log is None and '"name": "ftcore' in line:
                first_log = time.perf_counter() - start
            if '"progress"' in line:
                assert first_log is not None, "no ftcore log line before the first step"
                return first_log, time.perf_counter() - start, type(proc).__name__
        raise SystemExit(f"the arm ended before its first step (exit {proc.wait()})")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(root / plan.dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    p = prepared(demo_config(arms=["full"], train={"max_steps": 1000}, eval={"every_steps": 0}))
    plan = study.plan_arms(p)[0]
    _, server_start, kind = first_step_seconds(plan, p.root)
    assert kind == "ForkedArm", kind
    times: dict[str, list[float]] = {f"{name}_{to}": [] for name in ("fresh", "forked") for to in ("log", "step")}
    for _ in range(args.repeats):
        for name, fork in (("fresh", "0"), ("forked", "1")):
            os.environ["FTSTUDY_FORK_ARMS"] = fork
            log, step, kind = first_step_seconds(plan, p.root)
            assert kind == ("ForkedArm" if fork == "1" else "Popen"), kind
            times[f"{name}_log"].append(log)
            times[f"{name}_step"].append(step)
    med = {name: statistics.median(t) for name, t in times.items()}
    server = multiprocessing.forkserver._forkserver._forkserver_pid  # what the server holds while a study runs
    rss = next(line.split()[1] for line in Path(f"/proc/{server}/status").read_text().splitlines() if line.startswith("VmRSS"))
    record("arm-start", {
        "model": p.cfg.model.name, "precision": plan.precision, "batch": [plan.train.batch_size, p.cfg.chunk_len],
        "repeats": args.repeats, "first_forked_s (starts the server)": round(server_start, 2),
        **{f"{name}_s": round(m, 2) for name, m in med.items()},
        "fork_server_rss_mb": round(int(rss) / 1024),
        **{f"forked_vs_fresh_to_first_{to}": round(med[f"forked_{to}"] / med[f"fresh_{to}"], 3) for to in ("log", "step")},
        **{f"saved_to_first_{to}_s": round(med[f"fresh_{to}"] - med[f"forked_{to}"], 2) for to in ("log", "step")},
        "runs": {name: [round(x, 2) for x in t] for name, t in times.items()},
    })


if __name__ == "__main__":
    main()
