"""How much of the general set the arms also train on: runs of tokens shared with the training text.

A general token is contaminated when it lies inside a run of RUN consecutive tokens that also occurs,
token for token, in text an arm trains on (the replay stream, a domain training row). The general
set is the benchmark of forgetting, so text the arms trained on makes forgetting look smaller than it
is (lm-eval #1056: a replay arm given WikiText-2's test file improved the general perplexity it was
scored on). Tokens are compared, not characters: the same tokenizer made both sides, so a copy of a
document is the same tokens except within a few tokens of where it starts (a moved space).

Natural text shares no run of RUN tokens by chance: with the tiny test tokenizer (about 1.5 bytes per
token, so 32 tokens is about 8 words) WikiText-2 test shared 0.004% of its tokens with the State of
the Union speeches and none with the arXiv abstracts (measured here over the offline corpora); a copy
of the benchmark shares 100%. A tokenizer with longer tokens makes a run longer text, so rarer by chance.
"""

from __future__ import annotations

import numpy as np

RUN = 32  # tokens: a shared run this long is copied text, not chance
TOLERANCE = 0.01  # the share of the general set's scored tokens that may lie in shared runs
FLOOR = 2 * RUN  # ... and never fewer tokens than two runs' worth: one run shared by chance refuses no small set
COPY = 0.5  # a held-out row is a copy of training text when more than this share of its scored tokens is shared
_MIX = np.uint64(0x9E3779B97F4A7C15)  # spreads token ids over 64 bits before they are combined
_BASE = np.uint64(0x100000001B3)


def run_hashes(ids: np.ndarray, n: int = RUN) -> np.ndarray:
    """A 64-bit hash of every run of `n` consecutive tokens of `ids`, in order (len(ids) - n + 1 of them;
    none when `ids` is shorter). Arithmetic wraps modulo 2**64; a chance collision is about 1 in 10**19."""
    ids = np.asarray(ids)
    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    mixed = ids.astype(np.uint64) * _MIX
    out = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        out = out * _BASE + mixed[k : k + count]
    return out


def hashes_of(others: list[np.ndarray], n: int = RUN) -> np.ndarray:
    """Every run of `n` tokens of `others` (token sequences; a run does not continue from one into the next),
    hashed, sorted and unique: what shared_mask looks runs up in."""
    return np.unique(np.concatenate([run_hashes(o, n) for o in others] + [np.zeros(0, np.uint64)]))


def shared_mask(ids: np.ndarray, theirs: np.ndarray, n: int = RUN) -> np.ndarray:
    """Per token of `ids`, whether it lies inside a run of `n` tokens whose hash is in `theirs` (hashes_of)."""
    ids = np.asarray(ids)
    hits = np.flatnonzero(_in_sorted(run_hashes(ids, n), theirs))
    # Each hit covers tokens [hit, hit + n): mark run starts and ends, and count the tokens inside any run.
    edges = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(edges, hits, 1)
    np.add.at(edges, hits + n, -1)
    return np.cumsum(edges)[:-1] > 0


def _in_sorted(values: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """Per value, whether it is in `sorted_unique` (sorted ascending): a binary search each, O(len(values) x
    log len(sorted_unique)). (np.isin sorts both arrays together on every call: with a replay corpus's millions
    of run hashes and a hundred held-out rows looked up one by one, minutes instead of milliseconds.)"""
    if len(sorted_unique) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_unique, values), len(sorted_unique) - 1)
    return sorted_unique[at] == values


def shared_share(general: np.ndarray, others: list[np.ndarray], n: int = RUN) -> float:
    """The share (0..1) of the tokens of `general` that lie inside a run of `n` tokens also found in one of
    `others` (token sequences; a run does not continue from one of them into the next)."""
    general = np.asarray(general)
    if len(general) == 0:
        return 0.0
    return float(shared_mask(general, hashes_of(others, n), n).mean())


def too_much(share: float, tokens: int) -> bool:
    """Whether a shared share of a set of `tokens` tokens is over the tolerance: more than TOLERANCE of them, and
    more than FLOOR tokens (in a small set one run shared by chance is already over 1%)."""
    return share > TOLERANCE and share * tokens > FLOOR


def scored_shared(rows: list[tuple[list[int], list[int]]], theirs: np.ndarray, n: int = RUN) -> list[tuple[int, int]]:
    """Per row (input_ids, labels): (its scored tokens — labels other than -100 after position 0 — that lie in a
    shared run, its scored tokens)."""
    out = []
    for ids, labels in rows:
        mask = shared_mask(np.asarray(ids), theirs, n)[1:]
        scored = np.asarray(labels)[1:] != -100
        out.append((int((mask & scored).sum()), int(scored.sum())))
    return out
