"""Evaluation throughput: ftcore.perplexity.score_rows against a bare inference loop on the same windows.

    .venv/bin/python bench/eval.py [--windows 24] [--repeats 3]

Same model (SmolLM2-135M, fp32), same token windows (the demo's general-benchmark windows of 256
tokens), same batch size. Baselines: (a) a bare `torch.inference_mode()` loop calling the model with
`labels=` (its own mean loss), (b) the same bare forward at each batch size, to find the best one.
Also: how much each speed trick changes perplexity (bf16 autocast, eager vs SDPA attention,
length-sorted batching on the domain rows).
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import torch

from bench.common import demo_config, peak_rss_mb, prepared, record, timed
from ftcore import models, perplexity


def batches(rows, batch_size):
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        yield torch.tensor([r[0] for r in chunk]), torch.tensor([r[1] for r in chunk])


def bare_loop(model, rows, batch_size):
    """The simplest loop that scores the same windows: the model's own loss, summed per batch."""
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for ids, labels in batches(rows, batch_size):
            out = model(input_ids=ids, labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            nll += float(out.loss) * n
            tokens += n
    return math.exp(nll / tokens)


def forward_only(model, rows, batch_size):
    with torch.inference_mode():
        for ids, _ in batches(rows, batch_size):
            model(input_ids=ids)


def ppl(model, rows, batch_size, precision="fp32"):
    return perplexity.summarize(perplexity.score_rows(model, rows, batch_size, precision=precision))["ppl"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = demo_config()
    data = prepared(cfg)
    model = models.load_model(data.model_dir)
    windows = perplexity.stream_windows(pd.read_parquet(data.root / data.general.path), cfg.chunk_len)[: args.windows]
    windows = [w for w in windows if len(w[0]) == cfg.chunk_len]  # equal lengths: the bare loop needs no padding
    tokens = sum(len(w[0]) for w in windows)
    bs = cfg.eval.batch_size

    t_ftcore, p_ftcore = timed(lambda: ppl(model, windows, bs), args.repeats)
    t_bare, p_bare = timed(lambda: bare_loop(model, windows, bs), args.repeats)
    sweep = {}
    for b in (1, 2, 4, 8, 16):
        t, _ = timed(lambda: forward_only(model, windows, b), args.repeats)
        sweep[b] = tokens / t
    best = max(sweep, key=sweep.get)

    # Speed tricks and what they do to perplexity (relative change against the fp32 reference).
    t_bf16, p_bf16 = timed(lambda: ppl(model, windows, bs, "bf16"), args.repeats)
    eager = models.load_model(data.model_dir)
    eager.config._attn_implementation = "eager"
    t_eager, p_eager = timed(lambda: ppl(eager, windows, bs), 1)
    del eager
    rows = perplexity.domain_rows(pd.read_parquet(data.root / data.domain.test))[:32]
    p_sorted = ppl(model, rows, bs)
    p_unbatched = ppl(model, rows, 1)  # batch 1: no padding at all, the order-free reference

    record("eval", {
        "model": "SmolLM2-135M fp32", "windows": len(windows), "tokens": tokens, "batch_size": bs,
        "ftcore_tokens_per_s": round(tokens / t_ftcore, 1),
        "bare_loop_tokens_per_s": round(tokens / t_bare, 1),
        "ratio_ftcore_vs_bare": round(t_bare / t_ftcore, 3),
        "forward_only_tokens_per_s_by_batch": {b: round(v, 1) for b, v in sweep.items()},
        "best_batch": best,
        "ratio_ftcore_vs_best_forward": round(tokens / t_ftcore / sweep[best], 3),
        "ppl_ftcore": p_ftcore, "ppl_bare_loop": p_bare,
        "ppl_rel_diff_ftcore_vs_bare": abs(p_ftcore - p_bare) / p_bare,
        "bf16_autocast": {"tokens_per_s": round(tokens / t_bf16, 1), "ppl": p_bf16,
                          "ppl_rel_change": (p_bf16 - p_ftcore) / p_ftcore},
        "eager_attention": {"tokens_per_s": round(tokens / t_eager, 1), "ppl": p_eager,
                            "ppl_rel_change": (p_eager - p_ftcore) / p_ftcore},
        "length_sorted_padded_batches_vs_batch_1_on_domain_rows": {
            "rows": len(rows), "ppl_sorted_batched": p_sorted, "ppl_batch_1": p_unbatched,
            "ppl_rel_change": (p_sorted - p_unbatched) / p_unbatched},
        "peak_rss_mb": round(peak_rss_mb()),
    })


if __name__ == "__main__":
    main()
