"""Tokenize and chunk corpora with the model's own tokenizer into parquet.

Two layouts, both with `input_ids` and `labels` (-100 = not in the loss) so training and
evaluation read the same tokens:
- instruction: one row per prompt -> completion example; the completion mask is TRL's
  (tokenize prompt and prompt+completion, the completion starts where they diverge;
  `trl.data_utils.common_prefix_length`), then the EOS token (plain-text styles; a conversation
  ends as its chat template ends it, as in TRL), truncated at chunk_len from the start. Trailing
  spaces of the prompt move to the start of the completion, so a BPE tokenizer cannot merge the
  prompt's last space into the completion's first token (TRL warns of that mismatch; here it does
  not happen). Rows cut at chunk_len, and the completion tokens they lose
  (their EOS included), are counted per split.
- lm: the documents joined by a separator into one token stream, cut into chunk_len rows;
  every token is in the loss (a BOS that starts each row for a BOS-adding tokenizer is context).
  `token_bytes` keeps the UTF-8 bytes of the original text each token predicts, so bits per byte
  can be computed for any window of the stream, whatever the tokenizer's normalizer does.

Corpus text reaches the tokenizer as text: a special token's string inside a document (say
"<|endoftext|>") is tokenized as the characters it is, never as the special token, and the EOS
that ends an example is added by its id. (Chat templates are the exception: their markup is
special tokens by design, so rendered conversations are tokenized with special tokens parsed.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase
from trl.data_utils import common_prefix_length

from ftcore.config import FormatSpec, InputError
from ftcore.perplexity import IGNORE, UNKNOWN_BYTES, bytes_sum

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
# Used to render conversations when the tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
BATCH = 512
log = logging.getLogger("ftcore.chunking")


class FormatError(InputError):
    """A record that does not fit the configured training format."""


@dataclass(frozen=True)
class ChunkStats:
    """What tokenizing a split did: documents in, rows out, tokens, and what chunk_len cut.

    skipped: examples with no completion token within chunk_len (dropped); truncated: rows cut at
    chunk_len; truncated_tokens: tokens those rows lost (completion text and EOS); merged_boundary:
    examples whose prompt tokens are not a prefix of prompt+completion's (the completion then starts
    where they diverge, as in TRL).
    """

    docs: int
    rows: int
    tokens: int
    loss_tokens: int
    skipped: int
    truncated: int = 0
    truncated_tokens: int = 0
    merged_boundary: int = 0

    def as_dict(self) -> dict[str, int]:
        return self.__dict__.copy()


# --- records -> (prompt, completion) -----------------------------------------------------------

def _messages(record: dict, style: str) -> list[dict]:
    if style == "sharegpt":
        turns = record["conversations"]
        try:
            return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
        except KeyError as exc:
            raise FormatError(f"sharegpt turn has unknown or missing key {exc}; expected from/value") from None
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]


def _render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=tokenizer.chat_template or CHATML_TEMPLATE,
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def prompt_completion(record: dict, fmt: FormatSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """One record as a prompt/completion pair (text), for every supported input style; trailing spaces
    of the prompt are moved to the completion (see the module docstring)."""
    return move_trailing_spaces(*_prompt_completion(record, fmt, tokenizer))


def move_trailing_spaces(prompt: str, completion: str) -> tuple[str, str]:
    """`("Abstract: ", "We ...")` -> `("Abstract:", " We ...")`: the same text, split where BPE cannot merge."""
    kept = prompt.rstrip(" \t")
    return kept, prompt[len(kept):] + completion


def _prompt_completion(record: dict, fmt: FormatSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    if fmt.style == "fields":
        return fmt.prompt_template.format(prompt=record[fmt.prompt_field]), str(record[fmt.completion_field])
    if fmt.style == "alpaca":
        extra = record.get("input") or ""
        prompt = ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if extra else "",
            instruction=record["instruction"],
            input=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return prompt, str(record["output"])
    messages = list(_messages(record, fmt.style))
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise FormatError(f"{fmt.style} conversation has no assistant turn after a prompt")
    prompt = _render_chat(tokenizer, messages[:last], generation_prompt=True)
    full = _render_chat(tokenizer, messages[: last + 1], generation_prompt=False)
    if not full.startswith(prompt):
        raise FormatError("the chat template renders the prompt differently alone; cannot split the completion")
    return prompt, full[len(prompt):]


# --- token byte lengths ------------------------------------------------------------------------

def token_bytes(text: str, offsets: list[tuple[int, int]], limit: int | None = None) -> list[int]:
    """UTF-8 bytes of the original text each token predicts, for bits per byte: the characters from where
    the token starts to where the next one does (the first token's from the text's start, the last one's
    up to `limit` characters, default the whole text). Tokens with an empty span (special tokens the
    tokenizer adds), tokens sharing their start with the token before (one character in several byte
    tokens) and tokens starting at or after `limit` add 0.

    So every character up to `limit` is counted exactly once whatever the tokenizer did to the text.
    Characters between one token's end and the next one's start belong to the token before — after
    Unicode composition (NFC/NFKC) an end offset can cover only part of the original character
    (tokenizers #1201: "e" + U+0301 ends at the "e") — except whitespace just before the next token,
    which is that token's leading space when offsets are trimmed (GPT-2's ByteLevel trim_offsets).
    Where start offsets go backwards no such split exists: every token gets UNKNOWN_BYTES (-1), and
    bits per byte of what they reach is NaN instead of a wrong number.
    """
    limit = len(text) if limit is None else min(limit, len(text))
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    real = np.flatnonzero((spans[:, 1] > spans[:, 0]) & (spans[:, 0] < limit))
    starts, ends = spans[real, 0], np.minimum(spans[real, 1], limit)
    out = np.zeros(len(spans), dtype=np.int64)
    if not len(real):
        return out.tolist()
    if np.any(np.diff(starts) < 0):
        return [UNKNOWN_BYTES] * len(spans)
    first = np.flatnonzero(np.concatenate([[True], np.diff(starts) > 0]))  # first token of each start
    covered = np.maximum.accumulate(np.maximum.reduceat(ends, first))  # characters the tokens so far span
    before = np.concatenate([[0], covered[:-1]])
    bounds = np.maximum(starts[first] - _spaces_before(text)[starts[first]], before)
    bounds[0] = 0
    cum = _byte_positions(text)
    out[real[first]] = cum[np.concatenate([bounds[1:], [limit]])] - cum[bounds]
    return out.tolist()


def _byte_positions(text: str) -> np.ndarray:
    """UTF-8 bytes of text[:i] for i = 0..len(text) (a code point takes 1-4 bytes)."""
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)])


def _spaces_before(text: str) -> np.ndarray:
    """For i = 0..len(text): how many whitespace characters end right before position i."""
    space = np.fromiter((c.isspace() for c in text), dtype=bool, count=len(text))
    last_other = np.maximum.accumulate(np.where(space, -1, np.arange(len(text))))  # last non-space at or before j
    return np.arange(len(text) + 1) - 1 - np.concatenate([[-1], last_other])


# --- instruction rows --------------------------------------------------------------------------

def example_texts(records: pd.DataFrame, fmt: FormatSpec, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text each instruction record is tokenized as (prompt + completion), one per record. Raises
    FormatError for a record that does not fit the format."""
    return [p + c for p, c in (_located(prompt_completion, rec, i, fmt, tokenizer)
                               for i, rec in enumerate(records.to_dict("records")))]


def _located(fn, record: dict, index: int, fmt: FormatSpec, tokenizer) -> tuple[str, str]:
    """fn(record, ...), its FormatError naming the record (its place among the used records, from 1)."""
    try:
        return fn(record, fmt, tokenizer)
    except FormatError as exc:
        raise FormatError(f"domain record #{index + 1}: {exc}") from None


def tokenize_instruction(
    records: pd.DataFrame, fmt: FormatSpec, tokenizer: PreTrainedTokenizerBase, chunk_len: int
) -> tuple[pd.DataFrame, ChunkStats]:
    """Prompt/completion rows with TRL's completion mask; labels are -100 outside the completion.

    Returns the rows (doc, input_ids, labels, completion_mask, n_bytes: UTF-8 bytes of the
    completion tokens scored) and the split's ChunkStats.
    """
    pairs = [_located(prompt_completion, rec, i, fmt, tokenizer) for i, rec in enumerate(records.to_dict("records"))]
    # Conversations are rendered by a chat template whose markup is special tokens, and tokenized as TRL does
    # (apply_chat_template: no special tokens added, the template writes them); fields are plain text.
    plain_text = fmt.style in ("fields", "alpaca")
    # A conversation ends as its template ends it: TRL adds no EOS to one, and a template whose assistant turn
    # ends "<|im_end|>\n" (SmolLM2's) would otherwise get a second end marker in every row's loss.
    eos = tokenizer.eos_token_id if plain_text else None
    rows: dict[str, list] = {"doc": [], "input_ids": [], "labels": [], "completion_mask": [], "n_bytes": []}
    skipped = truncated = truncated_tokens = merged = 0
    for start in range(0, len(pairs), BATCH):
        batch = pairs[start : start + BATCH]
        prompt_ids = tokenizer([p for p, _ in batch], split_special_tokens=plain_text,
                               add_special_tokens=plain_text)["input_ids"]
        texts = [p + c for p, c in batch]
        enc = tokenizer(texts, return_offsets_mapping=True, split_special_tokens=plain_text,
                        add_special_tokens=plain_text)
        for i, (p_ids, ids, offsets) in enumerate(zip(prompt_ids, enc["input_ids"], enc["offset_mapping"])):
            plen = common_prefix_length(p_ids, ids)
            merged += plen < len(p_ids)
            if eos is not None and (not ids or ids[-1] != eos):
                ids, offsets = [*ids, eos], [*offsets, (0, 0)]
            nbytes = token_bytes(texts[i], offsets)  # before the cut: a cut row's last token ends where the next began
            if len(ids) > chunk_len:
                truncated += 1
                truncated_tokens += len(ids) - chunk_len
            ids = ids[:chunk_len]
            mask = [0] * min(plen, len(ids)) + [1] * max(len(ids) - plen, 0)
            # Position 0 is never predicted (the shift), so a row needs a completion token after it.
            if sum(mask[1:]) == 0:
                skipped += 1
                continue
            rows["doc"].append(start + i)
            rows["input_ids"].append(ids)
            rows["completion_mask"].append(mask)
            rows["labels"].append([t if m else -100 for t, m in zip(ids, mask)])
            rows["n_bytes"].append(bytes_sum([b for b, m in zip(nbytes[1:], mask[1:]) if m]))
    df = pd.DataFrame(rows)
    stats = ChunkStats(
        docs=len(pairs),
        rows=len(df),
        tokens=int(df["input_ids"].map(len).sum()) if len(df) else 0,
        loss_tokens=int(df["completion_mask"].map(lambda m: sum(m[1:])).sum()) if len(df) else 0,
        skipped=skipped,
        truncated=truncated,
        truncated_tokens=truncated_tokens,
        merged_boundary=merged,
    )
    return df, stats


# --- language-modelling stream -----------------------------------------------------------------

def tokenize_documents(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, separator: str = "\n\n"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Token ids, per-token UTF-8 bytes and document index (into `texts`) of the documents joined by `separator`,
    and how many were skipped (under 2 tokens).

    Documents are tokenized one by one (batched) with the separator appended, which matches
    tokenizing the joined text except possibly at document boundaries and scales to large corpora.
    """
    ids: list[np.ndarray] = []
    nbytes: list[np.ndarray] = []
    docs: list[np.ndarray] = []
    skipped = 0
    for start in range(0, len(texts), BATCH):
        batch = [t + separator for t in texts[start : start + BATCH]]
        enc = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
        for i, (text, doc_ids, offsets) in enumerate(zip(batch, enc["input_ids"], enc["offset_mapping"])):
            if len(doc_ids) < 2:
                skipped += 1
                continue
            ids.append(np.asarray(doc_ids, dtype=np.int32))
            nbytes.append(np.asarray(token_bytes(text, offsets), dtype=np.int32))
            docs.append(np.full(len(doc_ids), start + i, dtype=np.int32))
    unknown = sum(int(b[0] < 0) for b in nbytes if len(b))
    if unknown:
        log.warning("%d of %d documents: the tokenizer's offsets cannot say which original bytes each token "
                    "predicts; bits per byte of what they reach is not computed", unknown, len(nbytes))
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32), skipped
    return np.concatenate(ids), np.concatenate(nbytes), np.concatenate(docs), skipped


def stream_prefix(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS token id when the tokenizer starts every text with it (Llama, Gemma), else None (GPT-2).

    A model trained with BOS first conditions everything on it: Gemma-3-270m scored a WikiText window
    at perplexity 67 without it and 18 with it (measured here). A window of a stream then starts with
    BOS as lm-eval's rolling log-likelihood does (its prefix token), so a base is not measured
    crippled and fine-tuning is not credited with teaching it to do without BOS.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def chunk_stream(ids: np.ndarray, nbytes: np.ndarray, chunk_len: int, docs: np.ndarray | None = None,
                 prefix: int | None = None) -> pd.DataFrame:
    """Cut a stream into rows of chunk_len tokens (the last one shorter; dropped under 2 tokens).

    With `prefix` (a BOS id), each row is that token then chunk_len - 1 tokens of the stream, so every
    stream token is predicted; the prefix is context, not stream: its label is IGNORE and its completion
    mask 0, which is how perplexity.read_stream tells it from the stream. Without it a row's first token is
    context only. With `docs` (document index per token), rows keep `token_docs`, so per-document scores
    can be recovered from windows that cross document boundaries. n_bytes: the UTF-8 bytes of the tokens
    a row predicts (-1 when unknown, see token_bytes).
    """
    rows: dict[str, list] = {"input_ids": [], "labels": [], "completion_mask": [], "token_bytes": [], "n_bytes": []}
    if docs is not None:
        rows["token_docs"] = []
    head = [] if prefix is None else [prefix]
    step = chunk_len - len(head)
    for start in range(0, len(ids), step):
        tokens = ids[start : start + step].tolist()
        piece = head + tokens
        if len(piece) < 2:
            break
        piece_bytes = [0] * len(head) + nbytes[start : start + step].tolist()
        rows["input_ids"].append(piece)
        rows["labels"].append([IGNORE] * len(head) + tokens)
        rows["completion_mask"].append([0] * len(head) + [1] * len(tokens))
        rows["token_bytes"].append(piece_bytes)
        rows["n_bytes"].append(bytes_sum(piece_bytes[1:]))
        if docs is not None:
            window_docs = docs[start : start + step].tolist()
            rows["token_docs"].append(window_docs[:1] * len(head) + window_docs)
    return pd.DataFrame(rows)


def tokenize_lm(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, chunk_len: int, separator: str = "\n\n"
) -> tuple[pd.DataFrame, ChunkStats]:
    """Raw language-modelling chunks: every token of the joined documents is in the loss (behind BOS for a
    tokenizer that adds one; see stream_prefix)."""
    ids, nbytes, docs, skipped = tokenize_documents(texts, tokenizer, separator)
    df = chunk_stream(ids, nbytes, chunk_len, docs, prefix=stream_prefix(tokenizer))
    stats = ChunkStats(
        docs=len(texts),
        rows=len(df),
        tokens=int(len(ids)),
        loss_tokens=int(sum(len(r) - 1 for r in df["input_ids"])) if len(df) else 0,
        skipped=skipped,
    )
    return df, stats
