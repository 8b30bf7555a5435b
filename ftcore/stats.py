"""Uncertainty of the study's numbers: bootstrap over documents, spread over seeds, the Pareto front.

Two sources of noise are kept apart:
- which documents happen to be in the test sets: a paired bootstrap resamples documents (the same
  resample for every model, since all are scored on the same documents) and recomputes each
  token-weighted perplexity, giving a percentile interval for a perplexity, a change against the
  base, or a difference between two arms' changes;
- which seed an arm trained with: the standard deviation of the change over the arm's seeds.

A difference is marked "within noise" when its bootstrap interval contains 0, or when it is
smaller than twice the seed-to-seed standard deviation (a rule of thumb, stated in the report,
not a significance test: with two or three seeds no test has power).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

RESAMPLES = 2000
LEVEL = 0.95


def doc_matrix(docs: Sequence[pd.DataFrame]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Align per-document scores of several models on one set: (doc ids, nll [models x docs], tokens [docs]).

    Every model scores the same tokens, so the token counts must agree; a mismatch means the
    evaluations were not made on the same data and cannot be paired.
    """
    ids = np.asarray(docs[0]["doc"])
    tokens = np.asarray(docs[0]["n_tokens"], dtype=np.float64)
    nll = np.zeros((len(docs), len(ids)))
    for i, d in enumerate(docs):
        if not np.array_equal(np.asarray(d["doc"]), ids) or not np.array_equal(np.asarray(d["n_tokens"]), tokens):
            raise ValueError("per-document scores differ in documents or token counts: not evaluated on the same data")
        nll[i] = np.asarray(d["nll_sum"], dtype=np.float64)
    return ids, nll, tokens


def resample_weights(n_docs: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples x docs] counts: how often each document is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_docs, size=(resamples, n_docs))
    return np.stack([np.bincount(row, minlength=n_docs) for row in draws]).astype(np.float64)


def resampled_ppl(nll: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Token-weighted perplexity of each model under each resample: [resamples x models]."""
    return np.exp((weights @ nll.T) / (weights @ tokens)[:, None])


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap samples."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def within_noise(diff: float, ci: tuple[float, float], seed_std: float) -> bool:
    """The stated rule: the interval holds 0, or the difference is under twice the seed spread."""
    covers_zero = ci[0] <= 0 <= ci[1]
    return bool(covers_zero or (np.isfinite(seed_std) and abs(diff) < 2 * seed_std))


def pareto_front(gain: Sequence[float], forgetting: Sequence[float]) -> list[bool]:
    """Whether each point is on the front: no other point gains at least as much and forgets at most as
    much, and is strictly better in one of the two."""
    g, f = np.asarray(gain, dtype=float), np.asarray(forgetting, dtype=float)
    front = []
    for i in range(len(g)):
        dominated = np.any((g >= g[i]) & (f <= f[i]) & ((g > g[i]) | (f < f[i])))
        front.append(not bool(dominated))
    return front


def seed_std(values: Sequence[float]) -> float:
    """Sample standard deviation over seeds (NaN for a single seed: no spread is measured)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
