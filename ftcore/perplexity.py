"""Token-weighted perplexity and bits per byte, with per-row NLL written to parquet.

perplexity = exp(sum of NLL over predicted tokens / number of predicted tokens)
bits/byte  = sum of NLL (nats) / ln 2 / UTF-8 bytes of the predicted tokens

A predicted token is a position whose label is not -100, excluding position 0 (nothing precedes
it). Domain rows carry their own labels (completion tokens in instruction format, all tokens in lm
format). The general benchmark is one token stream scored in windows of chunk_len tokens that
advance by `stride` (the transformers perplexity guide): each window predicts only the tokens the
previous window did not, with up to chunk_len - stride tokens of context before them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time


import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

log = logging.getLogger("ftcore.perplexity")
IGNORE = -100


def domain_rows(df: pd.DataFrame) -> list[tuple[list[int], list[int], int]]:
    """(input_ids, labels, n_bytes) per row of a tokenized domain parquet."""
    return [(list(i), list(l), int(b)) for i, l, b in zip(df["input_ids"], df["labels"], df["n_bytes"])]


def _stream_arrays(df: pd.DataFrame, column: str, max_tokens: int | None) -> np.ndarray:
    out = np.concatenate([np.asarray(r, dtype=np.int64) for r in df[column]])
    return out[:max_tokens] if max_tokens is not None else out


def window_spans(n_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, target) per window: tokens [begin, end) of the stream, the last `target` of them predicted."""
    stride = stride or window
    spans = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        spans.append((begin, end, end - prev_end))  # tokens not yet predicted by an earlier window
        prev_end = end
        if end == n_tokens:
            break
    return spans


def stream_windows(
    df: pd.DataFrame, window: int, stride: int | None = None, max_tokens: int | None = None
) -> list[tuple[list[int], list[int], int]]:
    """Sliding windows over the stream stored as consecutive lm chunks (input_ids, token_bytes)."""
    ids = _stream_arrays(df, "input_ids", max_tokens)
    nbytes = _stream_arrays(df, "token_bytes", max_tokens)
    rows = []
    for begin, end, target in window_spans(len(ids), window, stride):
        piece = ids[begin:end].tolist()
        labels = [IGNORE] * (len(piece) - target) + piece[len(piece) - target :]
        first = max(1, len(piece) - target)
        rows.append((piece, labels, int(nbytes[begin + first : end].sum())))
    return rows


def stream_token_docs(
    df: pd.DataFrame, window: int, stride: int | None = None, max_tokens: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per window of stream_windows: the document index and UTF-8 bytes of each of its tokens."""
    docs = _stream_arrays(df, "token_docs", max_tokens)
    nbytes = _stream_arrays(df, "token_bytes", max_tokens)
    return [(docs[b:e], nbytes[b:e]) for b, e, _ in window_spans(len(docs), window, stride)]


def document_scores(scores: pd.DataFrame, token_docs: list[tuple[np.ndarray, np.ndarray]] | None = None,
                    row_docs: pd.Series | None = None) -> pd.DataFrame:
    """Summed NLL, predicted tokens and bytes per document, from per-row scores.

    Either each row is one document (`row_docs`, e.g. an instruction example's source record), or
    rows span documents and `token_docs` gives each token's document and bytes (stream windows):
    then the per-token NLL of the scores (score_rows(keep_tokens=True)) is split at the boundaries.
    """
    if row_docs is not None:
        df = pd.DataFrame({"doc": np.asarray(row_docs), "n_tokens": scores["n_tokens"], "nll_sum": scores["nll_sum"],
                           "n_bytes": scores["n_bytes"]})
        return df.groupby("doc", sort=True).sum().reset_index()
    if token_docs is None:
        raise ValueError("document_scores needs row_docs or token_docs")
    docs, nll, nbytes = [], [], []
    for token_nll, (d, b) in zip(scores["token_nll"], token_docs):
        token_nll = np.asarray(token_nll, dtype=np.float64)
        predicted = ~np.isnan(token_nll)  # position j scores token j + 1
        docs.append(d[1:][predicted])
        nll.append(token_nll[predicted])
        nbytes.append(b[1:][predicted])
    df = pd.DataFrame({"doc": np.concatenate(docs), "nll_sum": np.concatenate(nll), "n_bytes": np.concatenate(nbytes)})
    out = df.groupby("doc", sort=True).agg(n_tokens=("nll_sum", "size"), nll_sum=("nll_sum", "sum"),
                                           n_bytes=("n_bytes", "sum"))
    return out.reset_index()[["doc", "n_tokens", "nll_sum", "n_bytes"]]


def _autocast(precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def score_rows(
    model: torch.nn.Module,
    rows: list[tuple[list[int], list[int], int]],
    batch_size: int = 4,
    pad_id: int = 0,
    precision: str = "fp32",
    label: str = "eval",
    keep_tokens: bool = False,
) -> pd.DataFrame:
    """Summed NLL and predicted-token count per row; rows are batched longest-first to limit padding.

    keep_tokens adds `token_nll`: per row, the NLL at each position 1..n-1 (NaN where not predicted),
    so results can be split by document.
    """
    device = str(next(model.parameters()).device)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    nll = np.zeros(len(rows))
    count = np.zeros(len(rows), dtype=np.int64)
    per_token: list[np.ndarray | None] = [None] * len(rows)
    model.eval()
    progress = Progress(label, total=sum(len(r[0]) for r in rows), unit="tokens")
    with torch.inference_mode(), _autocast(precision, device):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = len(rows[idx[0]][0])
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                ids, labs, _ = rows[i]
                input_ids[j, : len(ids)] = torch.tensor(ids)
                labels[j, : len(labs)] = torch.tensor(labs)
                attention[j, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            target = labels[:, 1:].to(device)
            losses = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="none"
            ).view(target.shape)
            nll[idx] = losses.sum(dim=1).double().cpu().numpy()
            count[idx] = (target != IGNORE).sum(dim=1).cpu().numpy()
            if keep_tokens:
                token = losses.masked_fill(target == IGNORE, float("nan")).float().cpu().numpy()
                for j, i in enumerate(idx):
                    per_token[i] = token[j, : len(rows[i][0]) - 1]
            progress.advance(int(attention.sum()))
    out = pd.DataFrame({"row": np.arange(len(rows)), "n_tokens": count, "nll_sum": nll, "n_bytes": [r[2] for r in rows]})
    if keep_tokens:
        out["token_nll"] = per_token
    return out


def summarize(scores: pd.DataFrame) -> dict[str, float]:
    """Token-weighted perplexity, mean NLL and bits per byte of a per-row score table."""
    tokens = int(scores["n_tokens"].sum())
    nll = float(scores["nll_sum"].sum())
    nbytes = int(scores["n_bytes"].sum())
    if tokens == 0:
        raise ValueError("no predicted tokens to score")
    return {
        "ppl": math.exp(nll / tokens),
        "nll": nll / tokens,
        "bpb": nll / math.log(2) / nbytes if nbytes else float("nan"),
        "tokens": tokens,
        "bytes": nbytes,
        "rows": len(scores),
    }


class Progress:
    """Log `label: done/total unit, rate, ETA` at most every `every` seconds (and at the end)."""

    def __init__(self, label: str, total: int, unit: str = "steps", every: float = 15.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("%s: %d/%d %s, %.0f %s/s, ETA %.0fs", self.label, self.done, self.total, self.unit, rate, self.unit, eta)


