"""Training and evaluation speed under glibc's default allocator settings against settings that keep freed memory.

    .venv/bin/python -m bench.malloc [--preset demo-base] [--steps 4] [--repeats 2]

glibc serves allocations above its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with fresh
mmap'd pages and returns them to the kernel on free, and trims the heap top above 128 KiB: a training step's
activations and gradients (tens of MB each) are then page-faulted in again on every step. `make demo-base`
ran with about 1e9 minor page faults and as much system time as user time (`/usr/bin/time -v`). Each variant
runs in its own process (glibc reads its MALLOC_* variables at start): the default, and MALLOC_MMAP_THRESHOLD_
and MALLOC_TRIM_THRESHOLD_ at 1 GiB (mallopt(3): freed memory stays in the process for reuse). Both train the
preset's full arm for `--steps` steps (curves off) into a temporary directory and score its general set's
first 4096 tokens; reported: tokens/s of each, user and system CPU seconds and minor page faults. The loss
and the perplexity are printed for both: the allocator changes no number.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

from bench.common import record, run_child

KEEP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def child(preset: str, steps: int) -> None:
    import tempfile

    import pandas as pd

    from bench.common import Clock
    from ftcore import models, perplexity, study, training
    from ftcore.config_files import load_config
    from ftcore.inputs import check_inputs

    base = load_config(preset)
    cfg = load_config(preset, artifacts_dir=str(Path("artifacts").resolve()), train={**base.train.model_dump(), "max_steps": steps, "logging_steps": 1},
                      eval={**base.eval.model_dump(), "every_steps": 0})
    p = study.prepare(check_inputs(cfg, arms_in_process=True))
    plan = next(x for x in study.plan_arms(p) if x.name == "full")
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        summary = training.train_arm(plan.model_copy(update={"dir": out}), p.root, callbacks=[clock])
    trained = summary["tokens_per_epoch"] / summary["rows"] * cfg.train.batch_size * cfg.train.grad_accum * steps
    model = models.load_model(p.model_dir)
    frame = pd.read_parquet(p.root / p.general.path)
    rows = perplexity.general_set(frame, cfg.chunk_len, cfg.eval.stride, 4096).rows
    start = time.perf_counter()
    scores = perplexity.score_rows(model, rows, cfg.eval.batch_size, models.load_tokenizer(p.model_dir).pad_token_id,
                                   p.cfg.eval.precision)
    eval_s = time.perf_counter() - start
    result = perplexity.summarize(scores)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"train_tokens_per_s": trained / clock.seconds, "train_loss": summary["train_loss"],
                      "eval_tokens_per_s": result["tokens"] / eval_s, "ppl": result["ppl"],
                      "user_s": usage.ru_utime, "system_s": usage.ru_stime, "minor_faults": usage.ru_minflt}))


def run(preset: str, steps: int, env: dict[str, str]) -> dict:
    return run_child("bench.malloc", ["--child", "--preset", preset, "--steps", str(steps)], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo-base")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child(args.preset, args.steps)
    runs: dict[str, list[dict]] = {"default": [], "keep": []}
    for _ in range(args.repeats):  # interleaved, so drift of the machine hits both alike
        runs["default"].append(run(args.preset, args.steps, {}))
        runs["keep"].append(run(args.preset, args.steps, KEEP))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    record("malloc", {"preset": args.preset, "steps": args.steps, "keep_env": KEEP, "median": med, "runs": runs,
                      "train_ratio": round(med["keep"]["train_tokens_per_s"] / med["default"]["train_tokens_per_s"], 3),
                      "eval_ratio": round(med["keep"]["eval_tokens_per_s"] / med["default"]["eval_tokens_per_s"], 3)})


if __name__ == "__main__":
    main()
