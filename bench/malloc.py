"""Training and evaluation speed under glibc's default allocator settings against settings that keep freed memory.

    .venv/bin/python -m bench.malloc [--preset demo-base] [--steps 4] [--repeats 2] [--variants default keep thp]
                                     [--out malloc]

glibc serves allocations above its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with fresh
mmap'd pages and returns them to the kernel on free, and trims the heap top above 128 KiB: a training step's
activations and gradients (tens of MB each) are then page-faulted in again on every step. `make demo-base`
ran with about 1e9 minor page faults and as much system time as user time (`/usr/bin/time -v`). Each variant
runs in its own process (glibc reads its MALLOC_* variables at start, torch its THP_MEM_ALLOC_ENABLE at its
first allocation): `default`; `keep`, MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 1 GiB (mallopt(3):
freed memory stays in the process for reuse); `thp`, torch's own allocations of 2 MiB and more aligned to 2 MiB
and advised as transparent huge pages (THP_MEM_ALLOC_ENABLE=1, c10's CPU allocator: one page fault per 2 MiB
instead of per 4 KiB, where /sys/kernel/mm/transparent_hugepage/enabled is `madvise` or `always`); `no-mmap`,
MALLOC_MMAP_MAX_=0 (glibc caps the mmap threshold at 32 MiB, so `keep` still maps every larger tensor afresh:
with no mmap at all every allocation comes from the heap, and freed memory is reused); `keep-freed`, the same
set by the running process (`tasks.heap.keep_freed_memory`, what ftstudy's processes call), after its imports.
`default` is what the process gets without tasks.heap. Each variant trains the
preset's full arm for `--steps` steps (curves off) into a temporary directory and score its general set's
first 4096 tokens; reported: tokens/s of each, user and system CPU seconds and minor page faults. The loss
and the perplexity are printed for both: the allocator changes no number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

from bench.common import record, run_child

KEEP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
VARIANTS = {"default": {}, "keep": KEEP, "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
            "no-mmap": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
            "keep-freed": {"BENCH_KEEP_FREED": "1"}}


def child(preset: str, steps: int) -> None:
    import tempfile

    import pandas as pd

    from bench.common import Clock
    from ftcore import models, perplexity, study, training
    from ftcore.config_files import load_config
    from ftcore.inputs import check_inputs
    from tasks.heap import keep_freed_memory

    if os.environ.get("BENCH_KEEP_FREED") == "1" and not keep_freed_memory("cpu"):
        raise SystemExit("keep-freed: glibc's mallopt refused")

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
                      "user_s": usage.ru_utime, "system_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
                      "peak_rss_mb": usage.ru_maxrss / 1024}))


def run(preset: str, steps: int, env: dict[str, str]) -> dict:
    return run_child("bench.malloc", ["--child", "--preset", preset, "--steps", str(steps)], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo-base")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="the first is the baseline of the ratios")
    parser.add_argument("--out", default="malloc", help="bench/results/OUT.json")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child(args.preset, args.steps)
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    for _ in range(args.repeats):  # interleaved, so drift of the machine hits all alike
        for name in args.variants:
            runs[name].append(run(args.preset, args.steps, VARIANTS[name]))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    first = args.variants[0]
    ratios = {name: {"train_ratio": round(med[name]["train_tokens_per_s"] / med[first]["train_tokens_per_s"], 3),
                     "eval_ratio": round(med[name]["eval_tokens_per_s"] / med[first]["eval_tokens_per_s"], 3)}
              for name in args.variants[1:]}
    record(args.out, {"preset": args.preset, "steps": args.steps, "variants": {n: VARIANTS[n] for n in args.variants},
                      "thp_enabled": _thp_mode(), "median": med, "runs": runs, f"against {first}": ratios})


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode (the bracketed word of its setting), or 'unknown'."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


if __name__ == "__main__":
    main()
