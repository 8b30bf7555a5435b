"""The fixed cost of a run: a fully cached `ftstudy run --preset smoke`, against `python -c "import torch"`.

    .venv/bin/python -m bench.cached_run [--repeats 5] [--vs DIR]

One first run fills a fresh artifacts root; then, alternating, the cached rerun and the torch import (and,
with --vs, the cached rerun with the code of another checkout DIR, run from there, e.g. a git worktree of an
earlier commit; both read the same root, so the ratio is the code's alone, where both code versions give the
same step keys). Medians, and each as a
ratio to the torch import timed in the same loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, record


def timed(command: list[str], env: dict[str, str], cwd: Path = ROOT) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vs", help="another checkout whose code also runs the study, then reruns it cached")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "PREFECT_HOME": str(Path(root) / ".prefect")}
        env.pop("PREFECT_API_URL", None)
        run = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--artifacts", root]
        first = timed(run, env)
        commands = {"cached_run": (run, env, ROOT), "import_torch": ([sys.executable, "-c", "import torch"], env, ROOT)}
        if args.vs:  # `python -m` puts the working directory first on sys.path: the other checkout's code runs
            commands["cached_run_vs"] = (run, env, Path(args.vs).resolve())
            timed(run, env, Path(args.vs).resolve())  # its own first run: its step keys may differ
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, (command, command_env, cwd) in commands.items():
                times[name].append(timed(command, command_env, cwd))
    med = {name: statistics.median(t) for name, t in times.items()}
    record("cached-run", {
        "repeats": args.repeats, "first_run_s": round(first, 1),
        **{f"{name}_s": round(m, 2) for name, m in med.items()},
        **{f"{name}_vs_import_torch": round(m / med["import_torch"], 2) for name, m in med.items() if name != "import_torch"},
        **({"cached_run_vs_other_code": round(med["cached_run"] / med["cached_run_vs"], 3), "vs": args.vs} if args.vs else {}),
        "runs": {name: [round(x, 2) for x in t] for name, t in times.items()},
    })


if __name__ == "__main__":
    main()
