"""Token-weighted perplexity and bits per byte, with per-row NLL written to parquet.

perplexity = exp(sum of NLL over predicted tokens / number of predicted tokens)
bits/byte  = sum of NLL (nats) / ln 2 / UTF-8 bytes of the predicted tokens

A predicted token is a position whose label is not -100, excluding position 0 (nothing precedes
it). Domain rows carry their own labels (completion tokens in instruction format, all tokens in lm
format). The general text is one token stream scored in windows of chunk_len tokens that
advance by `stride` (the transformers perplexity guide): each window predicts only the tokens the
previous window did not, with up to chunk_len - stride tokens of context before them. For a
tokenizer that adds BOS every window is BOS then up to chunk_len - 1 stream tokens, so every stream
token is predicted exactly once and BOS never is (lm-eval's rolling log-likelihood starts with it too).
Bytes a token predicts can be unknown (UNKNOWN_BYTES, ftcore.chunking.token_bytes): a sum that
reaches one is unknown, and so is bits per byte (NaN).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ftcore.io import atomic_path
from ftcore.progress import Progress

log = logging.getLogger("ftcore.perplexity")
IGNORE = -100
UNKNOWN_BYTES = -1  # a token whose original bytes cannot be attributed


def bytes_sum(values) -> int:
    """The sum of per-token UTF-8 byte counts, or UNKNOWN_BYTES when any of them is unknown."""
    values = np.asarray(values, dtype=np.int64)
    return UNKNOWN_BYTES if np.any(values < 0) else int(values.sum())


def domain_rows(df: pd.DataFrame) -> list[tuple[list[int], list[int], int]]:
    """(input_ids, labels, n_bytes) per row of a tokenized domain parquet."""
    return [(list(i), list(l), int(b)) for i, l, b in zip(df["input_ids"], df["labels"], df["n_bytes"])]


@dataclass(frozen=True)
class StreamTokens:
    """A token stream as stored in lm rows: the prefix every row starts with ([BOS] or []), and the stream's
    tokens, their UTF-8 bytes and (when stored) documents, in order, without the prefixes."""

    prefix: list[int]
    ids: np.ndarray
    nbytes: np.ndarray
    docs: np.ndarray | None


def read_stream(df: pd.DataFrame, max_tokens: int | None = None) -> StreamTokens:
    """The stream of lm rows (chunking.chunk_stream), cut to its first `max_tokens` stream tokens.

    A row's first token is a prefix, not stream, when its label is IGNORE (the BOS chunk_stream puts
    before each row for a BOS-adding tokenizer); then every row has it. Raises ValueError otherwise.
    """
    marked = [len(row) > 0 and row[0] == IGNORE for row in df["labels"]] if "labels" in df else [False] * len(df)
    if any(marked) and not all(marked):
        raise ValueError("stream rows disagree on their prefix: some start with a context-only token, some do not")
    skip = 1 if marked and marked[0] else 0
    prefix = [int(df["input_ids"].iloc[0][0])] if skip else []
    cut = slice(0, max_tokens)

    def column(name: str) -> np.ndarray:
        return np.concatenate([np.asarray(r, dtype=np.int64)[skip:] for r in df[name]])[cut]

    return StreamTokens(prefix, column("input_ids"), column("token_bytes"),
                        column("token_docs") if "token_docs" in df else None)


def window_spans(n_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, target) per window: tokens [begin, end) of the stream, the last `target` of them predicted.

    A stride above the window is the window (windows never leave tokens out)."""
    stride = min(stride or window, window)
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
    """Sliding windows over the stream stored as consecutive lm chunks: (input_ids, labels, n_bytes) each.

    `window` tokens per window, the stored prefix (BOS) included: each window is the prefix then a
    slice of the stream (read_stream), never a prefix inside it; `stride` and `max_tokens` count stream
    tokens. n_bytes: the UTF-8 bytes of the tokens the window predicts (-1 when unknown).
    """
    s = read_stream(df, max_tokens)
    head = len(s.prefix)
    rows = []
    for begin, end, target in window_spans(len(s.ids), window - head, stride):
        piece = s.prefix + s.ids[begin:end].tolist()
        context = len(piece) - target
        labels = [IGNORE] * context + piece[context:]
        first = max(1, context)  # position 0 is never predicted
        rows.append((piece, labels, bytes_sum(s.nbytes[begin + first - head : end])))
    return rows


def stream_token_docs(
    df: pd.DataFrame, window: int, stride: int | None = None, max_tokens: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per window of stream_windows: the document index and UTF-8 bytes of each of its tokens (the prefix: the
    document of the token after it, 0 bytes)."""
    s = read_stream(df, max_tokens)
    head = len(s.prefix)
    out = []
    for b, e, _ in window_spans(len(s.docs), window - head, stride):
        out.append((np.concatenate([s.docs[b:b + 1].repeat(head), s.docs[b:e]]),
                    np.concatenate([np.zeros(head, np.int64), s.nbytes[b:e]])))
    return out


class ScoredSet(NamedTuple):
    """What an evaluation scores on one set: its rows, and how their tokens map to documents — `token_docs` (per
    row, each token's document and bytes: stream windows, lm chunks) or `row_docs` (one document per row:
    instruction examples)."""

    rows: list[tuple[list[int], list[int], int]]
    token_docs: list[tuple[np.ndarray, np.ndarray]] | None
    row_docs: np.ndarray | None

    def take(self, index: Sequence[int]) -> ScoredSet:
        """The rows at `index` (a subsample), with their documents."""
        return ScoredSet([self.rows[i] for i in index],
                         [self.token_docs[i] for i in index] if self.token_docs is not None else None,
                         self.row_docs[list(index)] if self.row_docs is not None else None)

    def per_document(self, scores: pd.DataFrame) -> pd.DataFrame:
        """Per document: summed NLL, predicted tokens, bytes (and KL) of `score_rows` on these rows."""
        return document_scores(scores, token_docs=self.token_docs, row_docs=self.row_docs)


def domain_set(frame: pd.DataFrame) -> ScoredSet:
    """The held-out domain rows (test.parquet): instruction rows are one document each; lm rows are chunks of a
    stream, split by token."""
    if "token_docs" in frame:
        return ScoredSet(domain_rows(frame), list(zip(map(np.asarray, frame["token_docs"]),
                                                      map(np.asarray, frame["token_bytes"]))), None)
    return ScoredSet(domain_rows(frame), None, np.asarray(frame["doc"]))


def general_set(frame: pd.DataFrame, window: int, stride: int | None = None, max_tokens: int | None = None) -> ScoredSet:
    """The general stream's windows (stream_windows), split by token into documents."""
    return ScoredSet(stream_windows(frame, window, stride, max_tokens),
                     stream_token_docs(frame, window, stride, max_tokens), None)


def document_scores(scores: pd.DataFrame, token_docs: list[tuple[np.ndarray, np.ndarray]] | None = None,
                    row_docs: pd.Series | None = None) -> pd.DataFrame:
    """Summed NLL, predicted tokens and bytes per document, from per-row scores.

    Either each row is one document (`row_docs`, e.g. an instruction example's source record), or
    rows span documents and `token_docs` gives each token's document and bytes (stream windows):
    then the per-token NLL of the scores (score_rows(keep_tokens=True)) is split at the boundaries.
    A document whose bytes are unknown anywhere has n_bytes UNKNOWN_BYTES.
    """
    if row_docs is not None:
        df = pd.DataFrame({"doc": np.asarray(row_docs), "n_tokens": scores["n_tokens"], "nll_sum": scores["nll_sum"],
                           "n_bytes": scores["n_bytes"], **({"kl_sum": scores["kl_sum"]} if "kl_sum" in scores else {})})
        return _unknown_bytes_stay_unknown(df.groupby("doc", sort=True).sum().reset_index(), df)
    if token_docs is None:
        raise ValueError("document_scores needs row_docs or token_docs")
    with_kl = "token_kl" in scores
    docs, nll, nbytes, kl = [], [], [], []
    for r, (token_nll, (d, b)) in enumerate(zip(scores["token_nll"], token_docs)):
        token_nll = np.asarray(token_nll, dtype=np.float64)
        predicted = ~np.isnan(token_nll)  # position j scores token j + 1
        docs.append(d[1:][predicted])
        nll.append(token_nll[predicted])
        nbytes.append(b[1:][predicted])
        if with_kl:
            kl.append(np.asarray(scores["token_kl"].iloc[r], dtype=np.float64)[predicted])
    df = pd.DataFrame({"doc": np.concatenate(docs), "nll_sum": np.concatenate(nll), "n_bytes": np.concatenate(nbytes)})
    columns = ["doc", "n_tokens", "nll_sum", "n_bytes"]
    sums = {"n_tokens": ("nll_sum", "size"), "nll_sum": ("nll_sum", "sum"), "n_bytes": ("n_bytes", "sum")}
    if with_kl:
        df["kl_sum"] = np.concatenate(kl)
        sums["kl_sum"] = ("kl_sum", "sum")
        columns.append("kl_sum")
    return _unknown_bytes_stay_unknown(df.groupby("doc", sort=True).agg(**sums).reset_index()[columns], df)


def _unknown_bytes_stay_unknown(per_doc: pd.DataFrame, parts: pd.DataFrame) -> pd.DataFrame:
    """per_doc (sorted by doc) with n_bytes UNKNOWN_BYTES where any of the doc's parts had unknown bytes."""
    unknown = (parts["n_bytes"] < 0).groupby(parts["doc"], sort=True).any().to_numpy()
    if unknown.any():
        per_doc.loc[unknown, "n_bytes"] = UNKNOWN_BYTES
    return per_doc


def autocast(precision: str, device: str):
    """bf16 autocast on the model's device for precision bf16, nothing for fp32. Raises ValueError for any other
    value ('auto' is decided once per study, by ftcore.inputs.resolve_precisions, before scoring)."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision {precision!r}: score in 'fp32' or 'bf16' (resolve 'auto' first)")
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
    top_k: int = 0,
    reference: TopK | None = None,
    reference_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> pd.DataFrame:
    """Summed NLL and predicted-token count per row; rows are batched longest-first to limit padding.

    keep_tokens adds `token_nll`: per row, the NLL at each position 1..n-1 (NaN where not predicted),
    so results can be split by document. top_k > 0 adds `topk_ids` / `topk_logp`: per row, for each
    predicted token, the model's k most likely tokens and their log-probabilities (the reference a
    later model's KL is measured against, `top_k_reference`). `reference` (of the same rows) adds
    `kl_sum`, the summed KL(reference ‖ model) in nats over the row's predicted tokens (`kl_top_k`),
    and with keep_tokens `token_kl` per position. `reference_logits(input_ids, attention_mask)`, the
    logits of a reference model on the same batch, adds the same columns with the exact KL over the
    whole vocabulary; they are read before its next call (`ftcore.models.ReusedLogits` reuses one buffer), and its
    `release()`, where it has one, is called when the pass ends.
    """
    from ftcore.models import ReusedLogits  # transformers: not imported by the light input checks that import this

    device = str(next(model.parameters()).device)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    nll = np.zeros(len(rows))
    count = np.zeros(len(rows), dtype=np.int64)
    per_token: list[np.ndarray | None] = [None] * len(rows)
    extra: dict[str, list] = {name: [None] * len(rows) for name in ("topk_ids", "topk_logp", "kl")}
    model.eval()
    progress = Progress(label, total=sum(len(r[0]) for r in rows), unit="tokens")
    with torch.inference_mode(), autocast(precision, device):
        own = ReusedLogits(model)  # one buffer for every batch's logits (ftcore.models)
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
            logits = own(input_ids.to(device), attention.to(device))
            target = labels[:, 1:].to(device)
            ref = reference_logits(input_ids.to(device), attention.to(device)) if reference_logits else None
            compare = top_k or reference is not None or reference_logits is not None
            losses = _score_batch(logits, target, [len(rows[i][0]) - 1 for i in idx],
                                  _Compare(idx, top_k, reference, extra, ref) if compare else None)
            nll[idx] = losses.sum(dim=1).double().cpu().numpy()
            count[idx] = (target != IGNORE).sum(dim=1).cpu().numpy()
            if keep_tokens:
                token = losses.masked_fill(target == IGNORE, float("nan")).float().cpu().numpy()
                for j, i in enumerate(idx):
                    per_token[i] = token[j, : len(rows[i][0]) - 1]
            progress.advance(int(attention.sum()))
    if hasattr(reference_logits, "release"):  # its buffer is not held past the pass (ftcore.models.ReusedLogits)
        reference_logits.release()
    out = pd.DataFrame({"row": np.arange(len(rows)), "n_tokens": count, "nll_sum": nll, "n_bytes": [r[2] for r in rows]})
    if keep_tokens:
        out["token_nll"] = per_token
    if top_k:
        out["topk_ids"], out["topk_logp"] = extra["topk_ids"], extra["topk_logp"]
    if reference is not None or reference_logits is not None:
        out["kl_sum"] = [float(np.nansum(k)) for k in extra["kl"]]
        if keep_tokens:
            out["token_kl"] = extra["kl"]
    return out


# --- KL divergence to a reference model ----------------------------------------------------------

TopK = list[tuple[np.ndarray, np.ndarray]]  # per row: (ids [predicted x k], log-probs [predicted x k])


def top_k_reference(scores: pd.DataFrame) -> TopK:
    """The per-row top-k token ids and log-probabilities of score_rows(top_k=k), as a reference."""
    return [(np.asarray(i), np.asarray(p)) for i, p in zip(scores["topk_ids"], scores["topk_logp"])]


def kl_top_k(logq: torch.Tensor, ref_ids: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per position, KL(p ‖ q) in nats from p's top-k tokens and the rest of the vocabulary as one bucket.

    logq: [positions x vocab] log-probabilities of the model; ref_ids, ref_logp: [positions x k] the
    reference's k most likely tokens and their log-probabilities. With k >= vocab this is the exact
    KL. Otherwise it is the KL of the two distributions coarsened to k + 1 outcomes (the k tokens and
    "any other"), which by the data-processing inequality is a lower bound of the full KL; its error
    on real models is measured by bench/kl.py.
    """
    q_head = logq.gather(-1, ref_ids).double()
    p_head = ref_logp.double()
    kl = (p_head.exp() * (p_head - q_head)).sum(-1)
    if ref_ids.shape[-1] >= logq.shape[-1]:
        return kl
    p_tail = (1 - p_head.exp().sum(-1)).clamp(min=0)
    q_tail = (1 - q_head.exp().sum(-1)).clamp(min=1e-30)
    tail = p_tail * (torch.log(p_tail.clamp(min=1e-30)) - torch.log(q_tail))
    return kl + torch.where(p_tail > 0, tail, torch.zeros_like(tail))


def kl_exact(logq: torch.Tensor, logp: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Per position, KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)) in nats over the whole vocabulary, from
    log-probabilities [positions x vocab] of the reference (p) and the model (q); float64 [positions]. With
    `overwrite`, logp (the caller's temporary) is overwritten by the differences: one vocabulary-wide tensor
    fewer, the same numbers bit for bit (the same products, summed alike)."""
    p = logp.exp()
    diff = logp.sub_(logq) if overwrite else logp - logq
    return p.mul_(diff).sum(-1).double()


# Positions whose vocabulary-wide values (log-probabilities, KL) are computed at once: CHUNK_BYTES of fp32
# (2 positions of a 262k vocabulary, 10 of a 49k one). Whole-batch tensors (8 x 256 x 262k x 4 B = 2 GiB, several
# per batch) were mapped and page-faulted afresh each time; 16-MiB chunks (under glibc's 32-MiB mmap threshold,
# so reused from the heap) ended that, but each of their six or so passes still went to memory: in chunks that stay
# in a core's cache the same arithmetic ran 2.7x faster (BENCHMARKS.md §12).
CHUNK_BYTES = 2 * 2**20


@dataclass
class _Compare:
    """What score_rows compares each predicted position with, and where it keeps the results (per row)."""

    idx: list[int]  # the batch's rows, in the order of its tensors
    top_k: int
    reference: TopK | None  # per row: the reference's top-k over the predicted positions
    extra: dict[str, list]
    ref_logits: torch.Tensor | None  # [batch x width x vocab] of a reference model: the exact KL


def _score_batch(logits: torch.Tensor, target: torch.Tensor, lengths: list[int], compare: _Compare | None) -> torch.Tensor:
    """Per position of a batch, the NLL (nats, fp32) of the target token: [batch x width-1], 0 where the target is
    IGNORE; the same values as F.cross_entropy over the whole batch (which computes log_softmax, then picks),
    computed CHUNK_BYTES at a time along each row's `lengths` predicted positions. With `compare`, the top-k and
    KL of each predicted position go into compare.extra from the same chunks."""
    losses = torch.zeros(target.shape, device=logits.device)
    step = max(1, CHUNK_BYTES // (4 * logits.shape[-1]))
    for j, n in enumerate(lengths):
        if compare is not None and compare.reference is not None:
            _check_reference(compare.reference[compare.idx[j]], int((target[j, :n] != IGNORE).sum()), compare.idx[j])
        row: dict[str, list] = {"kl": [], "ids": [], "logp": []}
        seen = 0  # predicted positions of this row before the chunk (the reference's top-k is indexed by them)
        for start in range(0, n, step):
            end = min(start + step, n)
            t = target[j, start:end]
            predicted = t != IGNORE
            count = int(predicted.sum())
            if count == 0:  # a prompt's positions: nothing to score (their loss stays 0, their KL NaN)
                if compare is not None and (compare.ref_logits is not None or compare.reference is not None):
                    row["kl"].append(np.full(end - start, np.nan))
                continue
            logp = torch.log_softmax(logits[j, start:end].float(), dim=-1)
            losses[j, start:end] = -logp.gather(-1, t.clamp(min=0)[:, None])[:, 0].masked_fill(~predicted, 0.0)
            if compare is not None:
                every = count == end - start  # then no copy of the predicted positions is needed
                _compare_chunk(logp if every else logp[predicted], predicted, count, j, start, end, seen, compare, row)
                seen += count
        if compare is not None:
            _keep_row(compare, j, n, row)
    return losses


def _compare_chunk(logp: torch.Tensor, predicted: torch.Tensor, m: int, j: int, start: int, end: int,  # noqa: PLR0913
                   seen: int, compare: _Compare, row: dict[str, list]) -> None:
    """One chunk's top-k and KL (logp: [the m predicted positions x vocab]) into `row`."""
    kl = None
    if compare.ref_logits is not None:
        ref = torch.log_softmax(compare.ref_logits[j, start:end].float(), dim=-1)
        kl = kl_exact(logp, ref if m == end - start else ref[predicted], overwrite=True)
    if compare.top_k:
        values, ids = logp.topk(min(compare.top_k, logp.shape[-1]), dim=-1)
        row["ids"].append(ids.to(torch.int32).cpu().numpy())
        row["logp"].append(values.cpu().numpy())
    if compare.reference is not None:
        ref_ids, ref_logp = compare.reference[compare.idx[j]]
        kl = kl_top_k(logp, torch.as_tensor(ref_ids[seen:seen + m], dtype=torch.long, device=logp.device),
                      torch.as_tensor(ref_logp[seen:seen + m], device=logp.device))
    if kl is not None:
        per_position = np.full(end - start, np.nan)
        per_position[predicted.cpu().numpy()] = kl.cpu().numpy()
        row["kl"].append(per_position)


def _check_reference(reference: tuple[np.ndarray, np.ndarray], predicted: int, i: int) -> None:
    """ValueError when a reference's top-k covers another number of predicted positions than row i has."""
    if len(reference[0]) != predicted:
        raise ValueError(f"row {i}: the reference has {len(reference[0])} predicted tokens, this model "
                         f"{predicted}: they were not scored on the same rows")


def _keep_row(compare: _Compare, j: int, n: int, row: dict[str, list]) -> None:
    """A row's chunks joined into compare.extra."""
    i = compare.idx[j]
    if row["kl"]:
        compare.extra["kl"][i] = np.concatenate(row["kl"])
    elif compare.ref_logits is not None or compare.reference is not None:
        compare.extra["kl"][i] = np.full(n, np.nan)
    if compare.top_k:
        compare.extra["topk_ids"][i] = np.concatenate(row["ids"]) if row["ids"] else np.zeros((0, compare.top_k), np.int32)
        compare.extra["topk_logp"][i] = np.concatenate(row["logp"]) if row["logp"] else np.zeros((0, compare.top_k), np.float32)


def write_reference(reference: TopK, path: Path) -> Path:
    """Per-row top-k ids and log-probabilities as one npz: rows concatenated, `offsets` where each starts."""
    lengths = [len(ids) for ids, _ in reference]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=np.concatenate([ids for ids, _ in reference]),
                     logp=np.concatenate([lp for _, lp in reference]), offsets=np.cumsum([0, *lengths]))
    return path


def read_reference(path: Path) -> TopK:
    """The top-k reference written by write_reference."""
    with np.load(path) as z:
        ids, logp, offsets = z["ids"], z["logp"], z["offsets"]
    return [(ids[a:b], logp[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def summarize(scores: pd.DataFrame) -> dict[str, float]:
    """Token-weighted perplexity, mean NLL (nats) and bits per byte of a per-row score table; with `kl_sum`
    also `kl`, the mean KL(reference ‖ model) per predicted token in nats. Bits per byte is NaN (and bytes
    UNKNOWN_BYTES) where a row's bytes are unknown: a normalizing tokenizer whose offsets cannot say which
    original bytes a token predicts (chunking.token_bytes). Raises ValueError with no predicted token."""
    tokens = int(scores["n_tokens"].sum())
    nll = float(scores["nll_sum"].sum())
    nbytes = bytes_sum(scores["n_bytes"])
    if tokens == 0:
        raise ValueError("no predicted tokens to score")
    if nbytes == UNKNOWN_BYTES:
        log.warning("bits per byte not computed: the original bytes of %d of %d rows are unknown (the tokenizer's "
                    "offsets cannot attribute them)", int((scores["n_bytes"] < 0).sum()), len(scores))
    kl = {"kl": float(scores["kl_sum"].sum()) / tokens} if "kl_sum" in scores else {}
    return {
        **kl,
        "ppl": math.exp(nll / tokens),
        "nll": nll / tokens,
        "bpb": nll / math.log(2) / nbytes if nbytes > 0 else float("nan"),
        "tokens": tokens,
        "bytes": nbytes,
        "rows": len(scores),
    }
