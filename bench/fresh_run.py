"""A whole uncached run: `ftstudy run --preset smoke` from an empty artifacts root, this code against another's.

    .venv/bin/python -m bench.fresh_run --vs DIR [--repeats 5]

DIR is another checkout (a git worktree of an earlier commit, say), run from there. Each code gets a Prefect home
of its own, migrated by one warm-up run, so no run pays the database's creation; then, alternating, each runs the
smoke study (its own arms, every step computed) into an artifacts root emptied before every run. Medians, and
this code's as a ratio to the other's. What it measures is the fixed cost around a small study: imports, the
embedded server, the arm fork server's start, the steps' bookkeeping.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.cached_run import timed
from bench.common import ROOT, record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vs", required=True, help="another checkout whose code runs the same study")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    codes = {"this": ROOT, "vs": Path(args.vs).resolve()}
    times: dict[str, list[float]] = {name: [] for name in codes}
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str) -> float:
            root = Path(tmp) / "artifacts"
            shutil.rmtree(root, ignore_errors=True)
            env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / f"prefect-{name}")}
            env.pop("PREFECT_API_URL", None)
            return timed([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--artifacts", str(root)],
                         env, codes[name])

        for name in codes:
            run(name)  # warm-up: creates and migrates this code's Prefect home
        for _ in range(args.repeats):
            for name in codes:
                times[name].append(run(name))
    med = {name: statistics.median(t) for name, t in times.items()}
    record("fresh-run", {
        "repeats": args.repeats, "vs": args.vs, "this_s": round(med["this"], 2), "vs_s": round(med["vs"], 2),
        "this_vs_other_code": round(med["this"] / med["vs"], 3),
        "runs": {name: [round(x, 2) for x in t] for name, t in times.items()},
    })


if __name__ == "__main__":
    main()
