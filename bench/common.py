"""Shared setup of the benchmarks: the demo's model and data, built once under bench-artifacts/."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from ftcore import study
from ftcore.config_files import load_config
from ftcore.inputs import resolve_precisions

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("FTSTUDY_BENCH_ARTIFACTS", ROOT / "bench-artifacts"))


def demo_config(**fields):
    """The demo preset (SmolLM2-135M, offline corpora) with artifacts under bench-artifacts/, its precision 'auto'
    decided for this machine as a study would (bf16 where the CPU computes it natively, else fp32)."""
    return resolve_precisions(load_config("demo", artifacts_dir=str(ARTIFACTS), **fields))


def prepared(cfg) -> study.Prepared:
    """The model and tokenized data of `cfg`, by the study's own first steps (cached across benchmark runs)."""
    return study.prepare(cfg)


def timed(fn, repeats: int = 3):
    """(median seconds, last result) of `fn()` run `repeats` times."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run_child(module: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `python -m module *args` in a fresh process (so no allocator or thread state carries over) and return
    the JSON object its last output line holds. Exits naming the command, with its output, when it fails."""
    out = subprocess.run([sys.executable, "-m", module, *args], env={**os.environ, **(env or {})},
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record(name: str, data: dict) -> None:
    """Print the results and keep them as bench/results/NAME.json (what BENCHMARKS.md quotes)."""
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    data = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), **data}
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))


class Clock(TrainerCallback):
    """Wall time of the training loop, of each optimizer step (`step_seconds`), and the non-padding tokens it saw."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = time.perf_counter()
        self.step_seconds: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self.last)
        self.last = now

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start
        self.tokens = state.num_input_tokens_seen
