"""An arm's evaluation with the exact KL: this checkout's scoring against another checkout's (`--vs`).

    .venv/bin/python -m bench.scoring --vs DIR [--preset demo-base] [--tokens 8192] [--repeats 3] [--artifacts ROOT]
                                      [--thread] [--name NAME]

Scored as a study scores an arm: the general set's first `--tokens` tokens in windows of chunk_len, batches
of eval.batch_size, the preset's evaluation precision decided for this machine, the exact KL against the base
loaded beside the model (here the model is the base itself: its KL is 0, computed as for any arm). Each
variant runs in its own process with its code on PYTHONPATH, alternating: this checkout, and DIR (e.g. a git
worktree of an earlier commit). Reported per variant (medians): seconds, tokens/s, user and system CPU
seconds and minor page faults of the scoring alone; and the largest difference between the two variants'
nll_sum and kl_sum (0: the same numbers). `--artifacts` reuses a root that already holds the preset's model
and tokenized data (default bench-artifacts/). `--thread` scores in a thread of its own, as a study's evaluation
runs (a Prefect task's thread): glibc's malloc behaves differently there (tasks.heap). `--name`: the results'
name under bench/results/ (default scoring-PRESET).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def child(preset: str, tokens: int, artifacts: str, out: str, thread: bool) -> None:
    import threading

    import pandas as pd

    from ftcore import models, perplexity, study
    from ftcore.config_files import load_config
    from ftcore.inputs import check_inputs

    cfg = load_config(preset, artifacts_dir=artifacts)
    p = study.prepare(check_inputs(cfg, arms_in_process=True))
    model = models.load_model(p.model_dir).eval()
    beside = models.reference_logits("full", model, p.model_dir)
    rows = perplexity.general_set(pd.read_parquet(p.root / p.general.path), p.cfg.chunk_len, p.cfg.eval.stride, tokens).rows
    pad = models.load_tokenizer(p.model_dir).pad_token_id
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    done = []

    def score():
        done.append(perplexity.score_rows(model, rows, p.cfg.eval.batch_size, pad, p.cfg.eval.precision,
                                          keep_tokens=True, reference_logits=beside))
    if thread:
        worker = threading.Thread(target=score)
        worker.start()
        worker.join()
    else:
        score()
    (scores,) = done
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    Path(out).write_text(json.dumps({
        "seconds": seconds, "tokens": int(scores.n_tokens.sum()), "precision": p.cfg.eval.precision,
        "user_s": after.ru_utime - before.ru_utime, "system_s": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt, "peak_rss_mb": after.ru_maxrss / 1024,
        "nll_sum": scores.nll_sum.tolist(), "kl_sum": scores.kl_sum.tolist()}))


def run(code: Path, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "PYTHONPATH": str(code)}  # -P: bench/ (its tokenize.py) is not put before the stdlib
        subprocess.run([sys.executable, "-P", str(HERE), "--child", "--preset", args.preset, "--tokens", str(args.tokens),
                        "--artifacts", args.artifacts, "--out", out.name, *(["--thread"] if args.thread else [])],
                       env=env, check=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vs", help="another checkout whose scoring is the baseline")
    parser.add_argument("--preset", default="demo-base")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--artifacts", default=str(HERE.parent.parent / "bench-artifacts"))
    parser.add_argument("--thread", action="store_true", help="score in a thread of its own, as a study's task does")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--out", help="(the child's) where to write its scores")
    parser.add_argument("--name", help="the results' name under bench/results/ (default scoring-PRESET)")
    args = parser.parse_args()
    if args.child:
        return child(args.preset, args.tokens, args.artifacts, args.out, args.thread)
    variants = {"chunked (this checkout)": HERE.parent.parent, **({f"baseline ({args.vs})": Path(args.vs)} if args.vs else {})}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, code in variants.items():
            runs[name].append(run(code.resolve(), args))
    summary = {}
    for name, results in runs.items():
        med = {key: statistics.median(r[key] for r in results) for key in ("seconds", "user_s", "system_s", "minor_faults")}
        summary[name] = {**{k: round(v, 2) for k, v in med.items()}, "tokens_per_s": round(results[0]["tokens"] / med["seconds"], 1),
                         "peak_rss_mb": round(max(r["peak_rss_mb"] for r in results)), "precision": results[0]["precision"],
                         "seconds_each": [round(r["seconds"], 1) for r in results]}
    if args.vs:
        (a, *_), (b, *_) = runs.values()
        summary["max_abs_diff"] = {key: max(abs(x - y) for x, y in zip(a[key], b[key])) for key in ("nll_sum", "kl_sum")}
        names = list(variants)
        summary["seconds_ratio"] = round(summary[names[0]]["seconds"] / summary[names[1]]["seconds"], 3)
    from bench.common import record

    record(args.name or f"scoring-{args.preset}", {"preset": args.preset, "tokens": args.tokens, "repeats": args.repeats,
                                                  "thread": args.thread, **summary})


if __name__ == "__main__":
    main()
