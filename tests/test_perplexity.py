"""Perplexity equals a hand computation; windows predict every token once; bits per byte."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ftcore.perplexity import document_scores, score_rows, stream_token_docs, stream_windows, summarize
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


def test_exact_kl_overwriting_its_reference_gives_the_same_numbers():
    """kl_exact(overwrite=True), what score_rows uses, reuses the reference's log-probabilities for the differences:
    the same KL bit for bit, and the hand formula Σ p (log p − log q)."""
    from ftcore.perplexity import kl_exact

    torch.manual_seed(0)
    logq, logp = torch.log_softmax(torch.randn(5, 300), -1), torch.log_softmax(torch.randn(5, 300), -1)
    kept = kl_exact(logq, logp)
    assert torch.equal(kl_exact(logq, logp.clone(), overwrite=True), kept)
    hand = (logp.double().exp() * (logp.double() - logq.double())).sum(-1)
    torch.testing.assert_close(kept, hand, rtol=1e-5, atol=1e-7)


def test_scores_in_chunks_of_positions_equal_whole_rows(tiny_model, monkeypatch):
    """score_rows computes log-probabilities CHUNK_BYTES at a time (whole-batch vocabulary tensors were mapped and
    page-faulted afresh each batch): chunks of 3 positions give exactly the numbers of whole rows — NLL, top-k,
    exact KL against a reference's logits, and top-k KL against a stored reference."""
    from ftcore import perplexity

    model, other = load_model(tiny_model), load_model(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for w in other.parameters():
            w.add_(0.05 * torch.randn_like(w))
    rng = np.random.default_rng(1)
    rows = []
    for n in (23, 8, 17, 2):
        ids = rng.integers(1, 500, n).tolist()
        rows.append((ids, [-100 if rng.random() < 0.3 else t for t in ids], 2 * n))
    ids = rng.integers(1, 500, 14).tolist()
    rows.append((ids, [-100] * 8 + ids[8:], 28))  # a prompt: whole chunks without a predicted position

    def score():
        beside = lambda input_ids, attention_mask: other(input_ids=input_ids, attention_mask=attention_mask).logits
        exact = score_rows(model, rows, 3, 0, keep_tokens=True, top_k=4, reference_logits=beside)
        top_k = score_rows(other, rows, 3, 0, keep_tokens=True, reference=perplexity.top_k_reference(exact))
        return exact, top_k

    whole = score()
    monkeypatch.setattr(perplexity, "CHUNK_BYTES", 4 * model.config.vocab_size * 3)
    chunked = score()
    for a, b in zip(whole, chunked):
        assert a.nll_sum.tolist() == b.nll_sum.tolist() and a.kl_sum.tolist() == b.kl_sum.tolist()
        for column in ("token_nll", "token_kl"):
            for x, y in zip(a[column], b[column]):
                np.testing.assert_array_equal(x, y)
    for column in ("topk_ids", "topk_logp"):
        for x, y in zip(whole[0][column], chunked[0][column]):
            np.testing.assert_array_equal(x, y)
    assert whole[0].kl_sum.min() > 0 and whole[1].kl_sum.min() >= 0  # a KL was measured (the model differs)
    short = perplexity.top_k_reference(whole[0])
    short[0] = (short[0][0][:-1], short[0][1][:-1])
    with pytest.raises(ValueError, match="row 0: the reference has .* they were not scored on the same rows"):
        score_rows(other, rows, 3, 0, reference=short)


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


@pytest.mark.parametrize("stride", [None, 8])
def test_document_scores_split_windows_at_document_boundaries(tiny_model, stride):
    df = _stream(70, 32)
    docs = np.repeat([0, 1, 2], [30, 25, 15])  # three documents of a stream; windows cross their borders
    df["token_docs"] = [docs[i:i + 32].tolist() for i in range(0, 70, 32)]
    rows = stream_windows(df, 32, stride)
    scores = score_rows(load_model(tiny_model), rows, 4, keep_tokens=True)
    per_doc = document_scores(scores, token_docs=stream_token_docs(df, 32, stride))
    assert per_doc["doc"].tolist() == [0, 1, 2]
    assert per_doc["nll_sum"].sum() == pytest.approx(scores["nll_sum"].sum(), rel=1e-6)
    assert per_doc["n_tokens"].sum() == scores["n_tokens"].sum() and per_doc["n_bytes"].sum() == scores["n_bytes"].sum()
    # Every token after the stream's first is predicted once with stride; doc 0 loses the first token.
    if stride:
        assert per_doc["n_tokens"].tolist() == [29, 25, 15]
    # A token's NLL goes to the document the token is in: doc 1's share is the NLL of positions 30..54.
    token = np.concatenate([np.asarray(t)[~np.isnan(t)] for t in scores["token_nll"]])
    if stride:
        assert per_doc.loc[1, "nll_sum"] == pytest.approx(token[29:54].sum(), rel=1e-6)


def test_document_scores_of_one_row_per_document():
    scores = pd.DataFrame({"n_tokens": [3, 4, 5], "nll_sum": [1.0, 2.0, 3.0], "n_bytes": [9, 9, 9]})
    per_doc = document_scores(scores, row_docs=pd.Series([7, 2, 7]))
    assert per_doc.to_dict("list") == {"doc": [2, 7], "n_tokens": [4, 8], "nll_sum": [2.0, 4.0], "n_bytes": [9, 18]}


def test_a_reused_reference_buffer_is_released_when_the_pass_ends(tiny_model):
    """score_rows releases the reference's reused logits buffer (ftcore.models.ReusedLogits) when its pass ends: a
    reference kept beside an arm for its curve points would otherwise hold it (1.3 GB for gemma-3-270m) while the arm
    trains. Through the curve points' cache too."""
    from ftcore import curves
    from ftcore.models import ReusedLogits

    model = load_model(tiny_model)
    rows = [([5, 6, 7, 8, 9], [5, 6, 7, 8, 9], 10), ([11, 12, 13], [11, 12, 13], 6)]
    for wrap in (lambda r: r, curves.ReferenceCache):
        inner = ReusedLogits(load_model(tiny_model).eval())
        scores = score_rows(model, rows, 2, 0, reference_logits=wrap(inner))
        assert inner.buffer is None and inner.weight is None
        assert scores.kl_sum.abs().max() < 1e-6  # the same weights: KL 0, computed through the buffer
