"""Corpus sources (Hub datasets and local files), their content fingerprints and the held-out split.

A corpus is a DataFrame of records restricted to the fields the study uses, plus a fingerprint: the
sha256 of exactly those fields' values in order. The fingerprint, not the path, keys every cache.

A file corpus is one file, every file of a directory, or the files a glob matches (sorted by name,
read in that order), each csv, jsonl, parquet or text, optionally compressed (.gz, .bz2, .xz, .zst).

What the study reads is the text as stored, byte for byte, in every format and with any pandas:
- a UTF-8 byte-order mark at the start of a file is not text (every format drops it);
- a text file has one document per line, lines split at "\n" (a "\r" before it is dropped) and
  nowhere else: form feeds, U+2028 and the like stay inside their line;
- field values are never stripped or otherwise normalised; a record is dropped only when none of its
  used fields holds text (empty or whitespace only; in instruction format also when its completion is
  empty: it has nothing to train on) and the drops are counted (`Corpus.empty`); a used field that
  holds something other than text (a number, a list) is refused, naming the field and the record.
- the domain corpus is deduplicated on the text each record is tokenized as, before the held-out
  split (`drop_duplicates`), so no held-out document equals a training one.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ftcore.config import CorpusSpec, FormatSpec, InputError
from ftcore.io import hash_file, hash_texts

FILE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".raw": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
STYLE_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "sharegpt": ("conversations",),
    "chatml": ("messages",),
}
OPTIONAL_FIELDS = {"input"}
log = logging.getLogger("ftcore.corpora")


class CorpusError(InputError):
    """A corpus that cannot be used; the message names the config field and the file."""


@dataclass(frozen=True)
class Corpus:
    """Records restricted to the used fields, their content fingerprint, and what reading dropped: `empty`
    records without text to use (load_corpus), `duplicates` copies of another record's text (drop_duplicates)."""

    records: pd.DataFrame
    fingerprint: str
    empty: int = 0
    duplicates: int = 0
    capped: bool = False  # max_docs cut documents off: raising it gives more

    def __len__(self) -> int:
        return len(self.records)


def used_fields(spec: CorpusSpec, fmt: FormatSpec | None) -> tuple[str, ...]:
    """The record fields a corpus contributes: format fields for instruction data, text_fields otherwise."""
    if fmt is None or fmt.kind == "lm":
        return tuple(spec.text_fields)
    if fmt.style == "fields":
        return (fmt.prompt_field, fmt.completion_field)
    return STYLE_FIELDS[fmt.style]


def completion_fields(fmt: FormatSpec | None) -> tuple[str, ...]:
    """The used fields an instruction record trains on (its completion, or its conversation); none for lm text."""
    if fmt is None or fmt.kind == "lm":
        return ()
    if fmt.style == "fields":
        return (fmt.completion_field,)
    return ("output",) if fmt.style == "alpaca" else STYLE_FIELDS[fmt.style]


def text_fields(spec: CorpusSpec, fmt: FormatSpec | None) -> tuple[str, ...]:
    """The used fields that hold text (conversations hold lists of turns)."""
    if fmt is not None and fmt.kind == "instruction" and fmt.style in ("sharegpt", "chatml"):
        return ()
    return used_fields(spec, fmt)


def _check_text(records: pd.DataFrame, fields: tuple[str, ...], role: str, path: str) -> None:
    for field in fields:
        if field not in records.columns:
            continue
        for index, value in enumerate(records[field]):
            if not isinstance(value, str) and not _is_empty(value):
                raise CorpusError(f"{role}: field {field!r} of record #{index + 1} in {path} holds a value of type "
                                  f"{type(value).__name__} ({str(value)[:40]!r}), not text; make it a string or choose "
                                  "another field")


def _file_format(spec: CorpusSpec, path: Path) -> str:
    if spec.file_format != "auto":
        return spec.file_format
    name = path.name[: -len(path.suffix)] if path.suffix.lower() in COMPRESSIONS else path.name
    try:
        return FILE_FORMATS[Path(name).suffix.lower()]
    except KeyError:
        raise CorpusError(
            f"cannot tell the format of {path} from its extension; set file_format to one of csv, jsonl, parquet, text"
        ) from None


def corpus_files(spec: CorpusSpec, role: str) -> list[Path]:
    """The files a file corpus reads, in order: the file, a directory's files, or a glob's matches (sorted).

    Raises CorpusError naming `<role>.path` when nothing is there.
    """
    import glob

    path = Path(spec.path).expanduser()
    if any(c in spec.path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
        if not files:
            raise CorpusError(f"{role}.path: the pattern {spec.path} matches no file")
        return files
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise CorpusError(f"{role}.path: directory {path} holds no file")
        return files
    if not path.is_file():
        raise CorpusError(f"{role}.path: file {path} does not exist; point {role}.path at a csv/jsonl/parquet/txt file "
                          "(optionally compressed), a directory of them or a glob")
    return [path]


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed by its suffix (.gz, .bz2, .xz, .zst)."""
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".gz":
        import gzip

        return gzip.decompress(data)
    if suffix == ".bz2":
        import bz2

        return bz2.decompress(data)
    if suffix == ".xz":
        import lzma

        return lzma.decompress(data)
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise CorpusError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def read_lines(path: Path) -> list[str]:
    r"""The file's lines, split at "\n" only (one "\r" before it dropped), without a leading BOM.

    str.splitlines would also split at form feeds, \x1c-\x1e, \x85 and U+2028/U+2029 — characters
    that are part of a line's text here. Raises UnicodeDecodeError for a file that is not UTF-8.
    """
    text = read_bytes(path).decode("utf-8-sig")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no new one
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_jsonl(path: Path, role: str) -> pd.DataFrame:
    rows = []
    for lineno, line in enumerate(read_lines(path), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{role}.path: {path} line {lineno} is not valid JSON ({exc.msg})") from None
    return pd.DataFrame(rows)


def _read_file(spec: CorpusSpec, role: str) -> pd.DataFrame:
    """Every file of the corpus, read by its format and concatenated in order."""
    frames = [_read_one(spec, role, path) for path in corpus_files(spec, role)]
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _read_one(spec: CorpusSpec, role: str, path: Path) -> pd.DataFrame:
    import io

    fmt = _file_format(spec, path)
    try:
        if fmt == "csv":
            return pd.read_csv(io.BytesIO(read_bytes(path)), dtype=str, keep_default_na=False, encoding="utf-8-sig")
        if fmt == "jsonl":
            return _read_jsonl(path, role)
        if fmt == "parquet":
            return pd.read_parquet(io.BytesIO(read_bytes(path)))
        return pd.DataFrame({"text": read_lines(path)}, dtype=object)
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{role}.path: {path} is not UTF-8 (bad byte at offset {exc.start}); re-encode it, e.g. iconv -t UTF-8"
        ) from None
    except (pd.errors.ParserError, OSError, ValueError, EOFError) as exc:
        if isinstance(exc, CorpusError):
            raise
        raise CorpusError(f"{role}.path: cannot read {path} as {fmt}: {exc}") from None


def _read_hub(spec: CorpusSpec) -> pd.DataFrame:
    import datasets  # heavy import, only for Hub sources

    ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split, revision=spec.revision)
    return ds.to_pandas()


def source_version(spec: CorpusSpec, role: str) -> str:
    """Cheap identity of the source's current content: its files' names and bytes, or the Hub dataset's commit; for
    the model's own text (source self), its prompts file's (generation.prompts), or 'self' without one (the model and the sampling
    settings are in the generation step's key)."""
    if spec.source == "self":
        prompts = spec.sampling.prompts
        if not prompts:
            return "self"
        try:
            return "self:" + source_version(spec.model_copy(update={"source": "file", "path": prompts,
                                                                    "generation": None}), role)
        except CorpusError as exc:  # the prompts file is read as a corpus: name the field the user set
            raise CorpusError(str(exc).replace(f"{role}.path", f"{role}.generation.prompts")) from None
    if spec.source == "file":
        files = corpus_files(spec, role)
        if len(files) == 1:
            return hash_file(files[0])
        return hash_texts(f"{f.name}:{hash_file(f)}" for f in files)
    from ftcore.sources import hub_commit  # offline mode resolves the commit from the local cache

    return hub_commit(spec.path, spec.revision, "dataset", field=f"{role}.path")


def _is_empty(value: object) -> bool:
    """None, NaN, pd.NA, a whitespace-only string or an empty list: no text."""
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, np.ndarray)):
        return len(value) == 0
    if isinstance(value, dict):
        return not value
    return bool(pd.isna(value))


def _read_as(spec: CorpusSpec) -> str:
    """How a corpus was read, for messages: a Hub dataset, or a file in its format (and why that format)."""
    if spec.source == "hub":
        return "a Hub dataset"
    return f"{spec.file_format} (its file_format)" if spec.file_format != "auto" else "the format its extension names"


def load_corpus(spec: CorpusSpec, role: str, fmt: FormatSpec | None = None) -> Corpus:
    """Read a corpus, keep the used fields, drop empty documents, cut to max_docs, fingerprint it."""
    raw = _read_hub(spec) if spec.source == "hub" else _read_file(spec, role)
    if raw.empty and len(raw.columns) == 0:
        raise CorpusError(f"{role}.path: {spec.path} holds no records (an empty file?); point {role}.path at the corpus")
    fields = used_fields(spec, fmt)
    missing = [f for f in fields if f not in raw.columns and f not in OPTIONAL_FIELDS]
    if missing:
        raise CorpusError(
            f"{role}: field(s) {missing} not in {spec.path}, read as {_read_as(spec)}; its fields are "
            f"{list(map(str, raw.columns))}. Set {role}.text_fields (or format.prompt_field/completion_field) to existing "
            f"fields{f', or {role}.file_format' if spec.source == 'file' and spec.file_format != 'auto' else ''}."
        )
    present = [f for f in fields if f in raw.columns]
    # Plain Python objects: the values as read, whatever dtype this pandas version would infer.
    records = raw[present].astype(object).copy()
    _check_text(records, text_fields(spec, fmt), role, spec.path)
    required = [f for f in present if f not in OPTIONAL_FIELDS]
    needed = completion_fields(fmt)
    keep = has_text(records, present, needed)
    empty = int((~keep).sum())
    records = records[keep].reset_index(drop=True)
    if empty:
        log.info("%s: %d of %d records dropped: no text in any of %s%s", role, empty, len(keep), present,
                 f", or none in {', '.join(needed)}" if needed else "")
    if spec.doc_start is not None:
        if fmt is not None and fmt.kind == "instruction":
            raise CorpusError(f"{role}.doc_start: applies to text corpora; an instruction-format corpus has one "
                              "document per record. Unset it.")
        records = group_documents(records, spec.doc_start, present)
    capped = spec.max_docs is not None and len(records) > spec.max_docs
    if spec.max_docs is not None:
        records = records.head(spec.max_docs)
    if records.empty:
        raise CorpusError(f"{role}: {spec.path} has no non-empty documents in fields {required}")
    return Corpus(records=records, fingerprint=fingerprint_records(records), empty=empty, capped=capped)


def has_text(records: pd.DataFrame, fields: list[str], needed: tuple[str, ...] = ()) -> pd.Series:
    """Per record, whether it is kept: any of `fields` holds text, and every field of `needed` does.

    A record is a document when any used field holds text (document_texts skips the empty ones): a
    title-less article is still an article, which dropping rows with any empty field would lose. An
    instruction record also needs its completion: without one it has nothing to train on.
    """
    empty = pd.DataFrame({f: records[f].map(_is_empty).astype(bool) for f in fields}, index=records.index)
    keep = ~empty.all(axis=1)
    for field in needed:
        if field in empty:
            keep &= ~empty[field]
    return keep


def drop_duplicates(corpus: Corpus, texts: list[str]) -> Corpus:
    """The corpus without records whose text (`texts`, one per record: what it is tokenized as) equals an
    earlier record's; the first copy is kept, in order, and `duplicates` counts the dropped ones.

    Run before the held-out split: a document stored twice would otherwise be on both sides of it.
    """
    if len(texts) != len(corpus):
        raise ValueError(f"{len(texts)} texts for {len(corpus)} records")
    first = ~pd.Series(texts, dtype=object).duplicated(keep="first").to_numpy()
    records = corpus.records[first].reset_index(drop=True)
    return replace(corpus, records=records, fingerprint=fingerprint_records(records),
                   duplicates=corpus.duplicates + int((~first).sum()))


def group_documents(records: pd.DataFrame, pattern: str, fields: list[str]) -> pd.DataFrame:
    """Join each record matching `pattern` (in its first field) with the records after it into one document.

    Records before the first match form a document of their own; fields join with a blank line,
    as the documents of a stream do, so the joined text stream stays the same. Empty values are
    skipped, as document_texts skips them (a record may have an empty field).
    """
    starts = records[fields[0]].map(lambda v: not _is_empty(v) and bool(re.search(pattern, str(v)))).to_numpy(bool)
    group = np.cumsum(starts)
    return records.groupby(group, sort=True)[fields].agg(_join_text).reset_index(drop=True)


def _join_text(values: pd.Series) -> str:
    return "\n\n".join(str(v) for v in values if not _is_empty(v))


def document_titles(corpus: Corpus, fields: tuple[str, ...], width: int = 80) -> list[str]:
    """A short readable label per document: its first non-empty line, heading marks stripped."""
    titles = []
    for text in document_texts(corpus, fields):
        first = next((line for line in text.split("\n") if line.strip()), "")  # lines, as files are split
        first = first.strip().strip("=").strip()
        titles.append(first if len(first) <= width else first[: width - 1] + "…")
    return titles


def fingerprint_records(records: pd.DataFrame) -> str:
    """Content hash of the records (field names and values, in order)."""
    columns = list(records.columns)
    return hash_texts(
        json.dumps(dict(zip(columns, row)), sort_keys=True, default=_jsonable) for row in records.itertuples(index=False)
    )


def _jsonable(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def split_train_test(corpus: Corpus, test_docs: int, seed: int, role: str = "domain") -> tuple[Corpus, Corpus]:
    """Deterministic split: `test_docs` documents drawn by `seed` are held out; both keep corpus order.

    Deduplicate first (drop_duplicates): the split draws records, not texts. Raises CorpusError when
    test_docs is not smaller than the corpus.
    """
    n = len(corpus)
    if test_docs >= n:
        dropped = f" (after dropping {corpus.duplicates} duplicates)" if corpus.duplicates else ""
        raise CorpusError(
            f"test_docs ({test_docs}) must be smaller than the {n} usable documents of {role}{dropped}; "
            f"lower test_docs" + (f" or raise {role}.max_docs" if corpus.capped else f", or give {role} more documents")
        )
    order = np.random.default_rng(seed).permutation(n)
    test_idx = np.sort(order[:test_docs])
    train_idx = np.sort(order[test_docs:])
    parts = []
    for idx in (train_idx, test_idx):
        records = corpus.records.iloc[idx].reset_index(drop=True)
        parts.append(Corpus(records=records, fingerprint=fingerprint_records(records)))
    return parts[0], parts[1]


def document_texts(corpus: Corpus, fields: tuple[str, ...]) -> list[str]:
    """Each record's text fields joined by a blank line (the language-modelling view of a document)."""
    cols = [c for c in fields if c in corpus.records.columns]
    return ["\n\n".join(str(v) for v in row if not _is_empty(v)) for row in corpus.records[cols].itertuples(index=False)]
