"""Perplexity equals a hand computation; windows predict every token once; bits per byte."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ftcore.perplexity import stream_windows, score_rows, summarize
from ftcore.models import load_model


def _hand_nll(model, ids, labels):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    total, count = 0.0, 0
    for pos in range(1, len(ids)):
        if labels[pos] != -100:
            total -= logp[pos - 1, labels[pos]].item()
            count += 1
    return total, count


def test_batched_scores_equal_hand_computation(tiny_model):
    model = load_model(tiny_model)
    rng = np.random.default_rng(0)
    rows = []
    for n in (5, 17, 9, 30):  # different lengths: padding must not change any row's score
        ids = rng.integers(1, 500, n).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]
        rows.append((ids, labels, 2 * n))
    scores = score_rows(model, rows, batch_size=3, pad_id=0)
    for row, (ids, labels, _) in zip(scores.itertuples(), rows):
        nll, count = _hand_nll(model, ids, labels)
        assert row.n_tokens == count
        assert row.nll_sum == pytest.approx(nll, rel=1e-5)
    total_nll = sum(_hand_nll(model, i, l)[0] for i, l, _ in rows)
    total_count = sum(_hand_nll(model, i, l)[1] for i, l, _ in rows)
    s = summarize(scores)
    assert s["ppl"] == pytest.approx(math.exp(total_nll / total_count), rel=1e-5)
    assert s["bpb"] == pytest.approx(total_nll / math.log(2) / sum(r[2] for r in rows), rel=1e-5)


def _stream(n, chunk):
    ids = np.arange(n) % 400 + 1
    chunks = [ids[i:i + chunk] for i in range(0, n, chunk)]
    return pd.DataFrame({"input_ids": [c.tolist() for c in chunks], "token_bytes": [[3] * len(c) for c in chunks]})


@pytest.mark.parametrize("stride", [None, 8, 5])
def test_stream_windows_predict_each_token_once(stride):
    df = _stream(50, 16)
    windows = stream_windows(df, window=16, stride=stride)
    predicted = sum(sum(1 for lab in labels[1:] if lab != -100) for _, labels, _ in windows)
    if stride is None:  # non-overlapping: the first token of each window has no context
        assert predicted == 50 - len(windows)
    else:
        assert predicted == 49
        assert all(len(ids) <= 16 for ids, _, _ in windows)
    assert sum(b for _, _, b in windows) == 3 * predicted


def test_stride_gives_more_context_and_max_tokens_cuts(tiny_model):
    df = _stream(64, 32)
    assert sum(len(i) for i, _, _ in stream_windows(df, 32, max_tokens=40)) == 40
    model = load_model(tiny_model)
    full = summarize(score_rows(model, stream_windows(df, 32, 8), 4))
    assert full["tokens"] == 63
