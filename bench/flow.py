"""Orchestration overhead and cached rerun, with the smoke preset (or --preset demo).

    .venv/bin/python bench/flow.py [--preset smoke] [--repeats 3]

In one script, each on a fresh artifacts root:
  plain     `ftcore.study.run_study`: the same steps in one process, no Prefect (the baseline)
  flow      `ftstudy run`: a new process, embedded Prefect server, cached tasks, arms in child processes
  rerun     `ftstudy run` again on the same root: every task a cache hit
  imports   `python -c "import flows.study"`: what every new process pays before any work
The flow's own span (first to last Prefect log line of the flow run) is read from its log, so the
difference to the process's wall time is interpreter start, imports and the embedded server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench.common import ROOT, record
from ftcore import study
from ftcore.config_files import load_config


def cli_run(preset: str, artifacts: Path) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", preset, "--artifacts", str(artifacts)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PREFECT_HOME": str(artifacts / ".prefect")})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"ftstudy run failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds, result.stdout + result.stderr


def flow_span(log: str) -> float | None:
    """Seconds from 'Beginning flow run' to 'Finished in state' of the flow, from Prefect's log lines."""
    stamps = re.findall(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO\s+\| (?:prefect\.engine|Flow run) .*?(Beginning flow run|Finished in state)",
                        log, flags=re.M)
    begin = next((t for t, what in stamps if what == "Beginning flow run"), None)
    end = next((t for t, what in reversed(stamps) if what == "Finished in state"), None)
    if not begin or not end:
        return None
    fmt = "%H:%M:%S.%f"
    return (datetime.strptime(end, fmt) - datetime.strptime(begin, fmt)).total_seconds()


def step_seconds(root: Path) -> float:
    """Sum of the steps' own compute time (timing.json of every step directory a run computed)."""
    return sum(json.loads(p.read_text())["seconds"] for p in root.glob("*/*/timing.json"))


def import_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import flows.study"], cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-plain", action="store_true", help="skip the run_study baseline (the demo: 2x the time)")
    parser.add_argument("--model-from", help="copy fetch-model/ from this artifacts root first (skips the model build)")
    args = parser.parse_args()
    plain, flow, rerun, span, span_rerun, steps = [], [], [], [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            if args.model_from:
                for root in (a, b):
                    shutil.copytree(Path(args.model_from) / "fetch-model", Path(root) / "fetch-model")
            if not args.no_plain:
                start = time.perf_counter()
                study.run_study(load_config(args.preset, artifacts_dir=a))
                plain.append(time.perf_counter() - start)
            seconds, log = cli_run(args.preset, Path(b))
            flow.append(seconds)
            span.append(flow_span(log))
            steps.append(step_seconds(Path(b)))
            seconds, log = cli_run(args.preset, Path(b))
            rerun.append(seconds)
            span_rerun.append(flow_span(log))
    imports = statistics.median(import_seconds() for _ in range(3))
    med = statistics.median
    record(f"flow-{args.preset}", {
        "preset": args.preset, "repeats": args.repeats,
        "plain_run_study_s": round(med(plain), 1) if plain else None,
        "ftstudy_run_s": round(med(flow), 1),
        "ftstudy_run_flow_span_s": round(med(span), 1) if all(span) else None,
        "sum_of_step_compute_s": round(med(steps), 1),
        "overhead_vs_plain": round(med(flow) / med(plain) - 1, 3) if plain else None,
        "overhead_vs_step_compute": round(med(flow) / med(steps) - 1, 3),
        "cached_rerun_s": round(med(rerun), 1),
        "cached_rerun_flow_span_s": round(med(span_rerun), 1) if all(span_rerun) else None,
        "cached_rerun_vs_first": round(med(rerun) / med(flow), 3),
        "process_imports_s": round(imports, 1),
        "runs": {"plain": [round(x, 1) for x in plain], "flow": [round(x, 1) for x in flow],
                 "steps": [round(x, 1) for x in steps],
                 "rerun": [round(x, 1) for x in rerun]},
    })


if __name__ == "__main__":
    main()
