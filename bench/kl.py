"""The error of the top-k KL approximation (eval.kl_top_k) against the exact full-vocabulary KL.

    .venv/bin/python -m bench.kl [--artifacts artifacts] [--tokens 4096] [--arm full]

On a finished study's artifacts (e.g. `make demo`'s): the base model and one trained arm score the
first `--tokens` tokens of the general stream in the study's windows; per predicted token the exact
KL(base ‖ arm) over the whole vocabulary (float64) and the top-k approximation the study uses (the
base's k most likely tokens plus the rest as one bucket, ftcore.perplexity.kl_top_k) for several k.
Reported: the mean KL per token, the relative error of the mean, and the 99th percentile of the
per-token relative error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import record
from ftcore import models, perplexity
from ftcore.plan import ModelRef

KS = (1, 8, 32, 64, 256, 1024)


def newest(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"{root}: nothing matches {pattern}; run a study (make demo) first")
    return found[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--arm", default="full")
    args = parser.parse_args()
    root = Path(args.artifacts).resolve()
    fetched = json.loads((newest(root, "fetch-model/*/result.json")).read_text())
    base_dir = ModelRef.model_validate(fetched).locate(root)
    arm_dir = newest(root, f"train-{args.arm}/*/result.json").parent
    config = json.loads(newest(root, "report/*/result.json").read_text())
    chunk_len = int(pd.read_parquet(newest(root, "tokenize-general/*/chunks.parquet"))["input_ids"].map(len).max())
    rows = perplexity.stream_windows(pd.read_parquet(newest(root, "tokenize-general/*/chunks.parquet")), chunk_len,
                                     None, args.tokens)
    result = {"artifacts": str(root), "arm": args.arm, "arm_dir": str(arm_dir.relative_to(root)),
              "report": config.get("report"), **top_k_errors(base_dir, arm_dir, rows)}
    record("kl", result)


def top_k_errors(base_dir: Path, arm_dir: Path, rows) -> dict:
    """Exact KL(base ‖ arm) per predicted token of `rows` against the top-k approximation, for each k in KS."""
    base = models.load_model(base_dir)
    tuned = models.load_trained(arm_dir, base_dir, "cpu")
    exact, approx = [], {k: [] for k in KS}
    with torch.inference_mode():
        for ids, labels, _ in rows:
            x = torch.tensor([ids])
            keep = torch.tensor(labels[1:]) != perplexity.IGNORE
            p = torch.log_softmax(base(input_ids=x).logits[0, :-1].float(), -1)[keep]
            q = torch.log_softmax(tuned(input_ids=x).logits[0, :-1].float(), -1)[keep]
            exact.append(((p.double().exp()) * (p.double() - q.double())).sum(-1).numpy())
            for k in KS:
                values, top = p.topk(k, -1)
                approx[k].append(perplexity.kl_top_k(q, top, values).numpy())
    exact_all = np.concatenate(exact)
    result = {"tokens": int(exact_all.size), "vocab": int(p.shape[-1]), "exact_kl_mean": float(exact_all.mean()),
              "top_k": {}}
    for k in KS:
        a = np.concatenate(approx[k])
        per_token = np.abs(a - exact_all) / np.maximum(exact_all, 1e-12)
        result["top_k"][str(k)] = {"kl_mean": float(a.mean()),
                                   "mean_relative_error": float((exact_all.mean() - a.mean()) / exact_all.mean()),
                                   "per_token_relative_error_p99": float(np.quantile(per_token, 0.99))}
    return result


if __name__ == "__main__":
    main()
