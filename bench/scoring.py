"""An arm's evaluation with the exact KL: this checkout's scoring against another checkout's (`--vs`), or the base's
reference logits from its stored decoder output against the base run beside the arm (`--stored`).

    .venv/bin/python -m bench.scoring --vs DIR [--preset demo-base] [--tokens 8192] [--repeats 3] [--artifacts ROOT]
                                      [--thread] [--name NAME]
    .venv/bin/python -m bench.scoring --stored [...]

Scored as a study scores an arm: the general set's first `--tokens` tokens in windows of chunk_len, batches
of eval.batch_size, the preset's evaluation precision decided for this machine, the exact KL against the base
loaded beside the model (here the model is the base itself: its KL is 0, computed as for any arm). Each
variant runs in its own process with its code on PYTHONPATH, alternating: this checkout, and DIR (e.g. a git
worktree of an earlier commit). Reported per variant (medians): seconds, tokens/s, user and system CPU
seconds and minor page faults of the scoring alone; and the largest difference between the two variants'
nll_sum and kl_sum (0: the same numbers). `--artifacts` reuses a root that already holds the preset's model
and tokenized data (default bench-artifacts/). `--thread` scores in a thread of its own, as a study's evaluation
runs (a Prefect task's thread): glibc's malloc behaves differently there (tasks.heap). `--name`: the results'
name under bench/results/ (default scoring-PRESET). With `--stored`, both variants are this checkout and each
first scores the base as the base's evaluation does (`base_seconds`; the stored variant keeps its decoder's
output, `ftcore.models.StoredHidden`), then the arm with the base's logits from that output, or from the base
run beside it.
"""

from __future__ import annotations

import argparse
import contextlib
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


def child(preset: str, tokens: int, artifacts: str, out: str, thread: bool, reference: str) -> None:  # noqa: PLR0913
    import threading

    import pandas as pd

    from ftcore import models, perplexity, study
    from ftcore.config_files import load_config
    from ftcore.inputs import check_inputs

    cfg = load_config(preset, artifacts_dir=artifacts)
    p = study.prepare(check_inputs(cfg, arms_in_process=True))
    model = models.load_model(p.model_dir).eval()
    rows = perplexity.general_set(pd.read_parquet(p.root / p.general.path), p.cfg.chunk_len, p.cfg.eval.stride, tokens).rows
    pad = models.load_tokenizer(p.model_dir).pad_token_id
    done, base_seconds, kept = [], None, None

    def in_thread(fn):
        if thread:
            worker = threading.Thread(target=fn)
            worker.start()
            worker.join()
        else:
            fn()
    if reference != "beside (no base pass)":  # the base's own evaluation first, as a study runs it
        kept = models.StoredHidden(p.cfg.eval.precision) if reference == "stored" else None

        def base_pass():
            with models.keep_hidden(model, kept) if kept is not None else contextlib.nullcontext():
                perplexity.score_rows(model, rows, p.cfg.eval.batch_size, pad, p.cfg.eval.precision, keep_tokens=True)
        start = time.perf_counter()
        in_thread(base_pass)
        base_seconds = time.perf_counter() - start
    beside = (models.stored_reference_logits("full", model, p.model_dir, "cpu", kept) if kept is not None
              else models.reference_logits("full", model, p.model_dir))
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    in_thread(lambda: done.append(perplexity.score_rows(model, rows, p.cfg.eval.batch_size, pad, p.cfg.eval.precision,
                                                        keep_tokens=True, reference_logits=beside)))
    (scores,) = done
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    Path(out).write_text(json.dumps({
        "seconds": seconds, "base_seconds": base_seconds, "tokens": int(scores.n_tokens.sum()),
        "precision": p.cfg.eval.precision,
        "user_s": after.ru_utime - before.ru_utime, "system_s": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt, "peak_rss_mb": after.ru_maxrss / 1024,
        "nll_sum": scores.nll_sum.tolist(), "kl_sum": scores.kl_sum.tolist()}))


def run(code: Path, reference: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "PYTHONPATH": str(code)}  # -P: bench/ (its tokenize.py) is not put before the stdlib
        subprocess.run([sys.executable, "-P", str(HERE), "--child", "--preset", args.preset, "--tokens", str(args.tokens),
                        "--artifacts", args.artifacts, "--out", out.name, "--reference", reference,
                        *(["--thread"] if args.thread else [])], env=env, check=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vs", help="another checkout whose scoring is the baseline")
    parser.add_argument("--preset", default="demo-base")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--artifacts", default=str(HERE.parent.parent / "bench-artifacts"))
    parser.add_argument("--thread", action="store_true", help="score in a thread of its own, as a study's task does")
    parser.add_argument("--stored", action="store_true",
                        help="the base's stored decoder output against the base beside the arm (this checkout)")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--reference", default="beside (no base pass)", help="(the child's) stored, beside")
    parser.add_argument("--out", help="(the child's) where to write its scores")
    parser.add_argument("--name", help="the results' name under bench/results/ (default scoring-PRESET)")
    args = parser.parse_args()
    if args.child:
        return child(args.preset, args.tokens, args.artifacts, args.out, args.thread, args.reference)
    here = HERE.parent.parent
    if args.stored:
        variants = {"stored (this checkout)": (here, "stored"), "beside (this checkout)": (here, "beside")}
    else:
        variants = {"chunked (this checkout)": (here, "beside (no base pass)"),
                    **({f"baseline ({args.vs})": (Path(args.vs), "beside (no base pass)")} if args.vs else {})}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (code, reference) in variants.items():
            runs[name].append(run(code.resolve(), reference, args))
    summary = {}
    for name, results in runs.items():
        timed = ("seconds", "user_s", "system_s", "minor_faults", *(("base_seconds",) if args.stored else ()))
        med = {key: statistics.median(r[key] for r in results) for key in timed}
        summary[name] = {**{k: round(v, 2) for k, v in med.items()}, "tokens_per_s": round(results[0]["tokens"] / med["seconds"], 1),
                         "peak_rss_mb": round(max(r["peak_rss_mb"] for r in results)), "precision": results[0]["precision"],
                         "seconds_each": [round(r["seconds"], 1) for r in results]}
    if args.vs or args.stored:
        (a, *_), (b, *_) = runs.values()
        summary["max_abs_diff"] = {key: max(abs(x - y) for x, y in zip(a[key], b[key])) for key in ("nll_sum", "kl_sum")}
        names = list(variants)
        summary["seconds_ratio"] = round(summary[names[0]]["seconds"] / summary[names[1]]["seconds"], 3)
    from bench.common import record

    record(args.name or f"scoring-{args.preset}", {"preset": args.preset, "tokens": args.tokens, "repeats": args.repeats,
                                                  "thread": args.thread, **summary})


if __name__ == "__main__":
    main()
