"""Corpus sources: local formats, field checks, fingerprints by content, deterministic split."""

import json

import pandas as pd
import pytest

from ftcore.config import CorpusSpec, FormatSpec
from ftcore.presets import WIKITEXT_ARTICLE
from ftcore.corpora import CorpusError, document_texts, document_titles, load_corpus, split_train_test


def test_csv_fields_and_fingerprint(corpus_files):
    spec = CorpusSpec(source="file", path=str(corpus_files["domain"]), text_fields=("titles", "summaries"))
    corpus = load_corpus(spec, "domain")
    assert len(corpus) == 40 and list(corpus.records.columns) == ["titles", "summaries"]
    texts = document_texts(corpus, spec.text_fields)
    assert texts[0].startswith(corpus.records.titles[0] + "\n\n")
    assert load_corpus(spec, "domain").fingerprint == corpus.fingerprint


def test_fingerprint_follows_content_not_path(corpus_files, tmp_path):
    copy = tmp_path / "copy.csv"
    copy.write_bytes(corpus_files["domain"].read_bytes())
    a = load_corpus(CorpusSpec(source="file", path=str(corpus_files["domain"]), text_fields=("titles",)), "domain")
    b = load_corpus(CorpusSpec(source="file", path=str(copy), text_fields=("titles",)), "domain")
    assert a.fingerprint == b.fingerprint
    df = pd.read_csv(copy)
    df.loc[3, "titles"] = "A changed title."
    df.to_csv(copy, index=False)
    c = load_corpus(CorpusSpec(source="file", path=str(copy), text_fields=("titles",)), "domain")
    assert c.fingerprint != a.fingerprint
    # A field the study does not use does not change the fingerprint.
    df = pd.read_csv(corpus_files["domain"]).assign(extra="x")
    df.to_csv(copy, index=False)
    d = load_corpus(CorpusSpec(source="file", path=str(copy), text_fields=("titles",)), "domain")
    assert d.fingerprint == a.fingerprint


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "text"])
def test_other_file_formats(tmp_path, fmt):
    docs = ["first document", "", "second document", "third"]
    if fmt == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    elif fmt == "parquet":
        path = tmp_path / "c.parquet"
        pd.DataFrame({"text": docs}).to_parquet(path)
    else:
        path = tmp_path / "c.txt"
        path.write_text("\n".join(docs) + "\n")
    corpus = load_corpus(CorpusSpec(source="file", path=str(path), max_docs=2), "general")
    assert corpus.records["text"].tolist() == ["first document", "second document"]


def test_instruction_format_uses_its_fields(corpus_files):
    spec = CorpusSpec(source="file", path=str(corpus_files["domain"]))
    fmt = FormatSpec(prompt_field="titles", completion_field="summaries")
    assert list(load_corpus(spec, "domain", fmt).records.columns) == ["titles", "summaries"]


def test_split_is_deterministic_disjoint_and_sized(corpus_files):
    corpus = load_corpus(CorpusSpec(source="file", path=str(corpus_files["domain"]), text_fields=("titles",)), "domain")
    train, test = split_train_test(corpus, 8, seed=1)
    again_train, again_test = split_train_test(corpus, 8, seed=1)
    assert len(test) == 8 and len(train) == 32
    assert test.records.equals(again_test.records) and train.fingerprint == again_train.fingerprint
    rows = lambda c: set(map(tuple, c.records.to_numpy()))  # noqa: E731
    assert len(rows(corpus)) == 40  # fixture documents are distinct, so disjointness is checkable
    assert not rows(test) & rows(train) and rows(test) | rows(train) == rows(corpus)
    other, _ = split_train_test(corpus, 8, seed=2)
    assert other.fingerprint != train.fingerprint


def test_bad_inputs_name_field_and_file(corpus_files, tmp_path):
    with pytest.raises(CorpusError, match=r"domain\.path: file .*missing\.csv does not exist"):
        load_corpus(CorpusSpec(source="file", path=str(tmp_path / "missing.csv")), "domain")
    with pytest.raises(CorpusError, match=r"\['abstract'\] not in .*its fields are \['titles', 'summaries'\]"):
        load_corpus(CorpusSpec(source="file", path=str(corpus_files["domain"]), text_fields=("abstract",)), "domain")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="general.path: .*not UTF-8"):
        load_corpus(CorpusSpec(source="file", path=str(latin1)), "general")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="no non-empty documents"):
        load_corpus(CorpusSpec(source="file", path=str(empty)), "general")
    corpus = load_corpus(CorpusSpec(source="file", path=str(corpus_files["domain"]), text_fields=("titles",)), "domain")
    with pytest.raises(CorpusError, match=r"test_docs \(40\) must be smaller than the 40"):
        split_train_test(corpus, 40, seed=0)


def test_hub_source_goes_through_datasets_load_dataset(tmp_path):
    """The Hub path is `datasets.load_dataset(path, subset, split=...)`; a local dataset directory takes it offline."""
    repo = tmp_path / "hub_like_dataset"
    (repo / "data").mkdir(parents=True)
    # The third record has no text in any used field (one with an abstract but no title is a document: kept).
    pd.DataFrame({"title": ["A", "B", ""], "abstract": ["first", "second", " "]}).to_parquet(
        repo / "data" / "train-00000-of-00001.parquet")
    spec = CorpusSpec(source="hub", path=str(repo), split="train", text_fields=("title", "abstract"))
    corpus = load_corpus(spec, "domain")
    assert corpus.records.to_dict("list") == {"title": ["A", "B"], "abstract": ["first", "second"]}


def test_doc_start_joins_records_into_articles(tmp_path):
    lines = ["intro line", " = First = ", " text of first ", " = = Section = = ", "more first", " = Second = ", "second"]
    path = tmp_path / "wiki.txt"
    path.write_text("\n".join(lines) + "\n")
    spec = CorpusSpec(source="file", path=str(path), doc_start=WIKITEXT_ARTICLE)
    corpus = load_corpus(spec, "general")
    assert len(corpus) == 3  # the lines before the first heading are a document of their own
    assert document_titles(corpus, ("text",)) == ["intro line", "First", "Second"]
    # The joined stream is the same text whether lines or articles are the documents.
    lines_corpus = load_corpus(CorpusSpec(source="file", path=str(path)), "general")
    assert "\n\n".join(document_texts(corpus, ("text",))) == "\n\n".join(document_texts(lines_corpus, ("text",)))
    assert len(load_corpus(spec.model_copy(update={"max_docs": 2}), "general")) == 2  # max_docs counts articles


def test_doc_start_errors_name_the_field(corpus_files):
    with pytest.raises(ValueError, match="doc_start is not a valid regular expression"):
        CorpusSpec(source="file", path="x", doc_start="(")
    spec = CorpusSpec(source="file", path=str(corpus_files["domain"]), doc_start="^x")
    with pytest.raises(CorpusError, match="domain.doc_start: applies to text corpora"):
        load_corpus(spec, "domain", FormatSpec(prompt_field="titles", completion_field="summaries"))


# --- the text as stored, byte for byte ----------------------------------------------------------

BOM = "\ufeff"


def _write_all_formats(tmp_path, docs, bom):
    prefix = BOM if bom else ""
    files = {"txt": tmp_path / f"c{bom}.txt", "jsonl": tmp_path / f"c{bom}.jsonl", "csv": tmp_path / f"c{bom}.csv"}
    files["txt"].write_text(prefix + "\n".join(docs) + "\n", encoding="utf-8")
    files["jsonl"].write_text(prefix + "".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    files["csv"].write_text(prefix + pd.DataFrame({"text": docs}).to_csv(index=False), encoding="utf-8")
    return files


def test_a_byte_order_mark_is_not_text_in_any_format(tmp_path):
    docs = ["First line of the corpus.", "Second line."]
    plain, marked = _write_all_formats(tmp_path, docs, False), _write_all_formats(tmp_path, docs, True)
    for fmt in plain:
        a = load_corpus(CorpusSpec(source="file", path=str(plain[fmt])), "general")
        b = load_corpus(CorpusSpec(source="file", path=str(marked[fmt])), "general")  # used to fail for jsonl
        assert b.records["text"].tolist() == docs, fmt
        assert b.fingerprint == a.fingerprint, fmt
        assert document_titles(b, ("text",))[0] == "First line of the corpus."


def test_a_text_file_splits_at_newlines_only(tmp_path):
    lines = ["page one\x0cpage two", "group\x1crecord\x1dunit\x1eend\x85next", "para\u2028line\u2029graph  "]
    path = tmp_path / "c.txt"
    path.write_bytes(("\r\n".join(lines) + "\n").encode("utf-8"))  # CRLF line ends, too
    corpus = load_corpus(CorpusSpec(source="file", path=str(path)), "general")
    assert corpus.records["text"].tolist() == lines  # 3 lines, 3 documents, every character kept


def test_whitespace_is_kept_the_same_under_either_pandas_string_behaviour(tmp_path):
    """pandas 2 reads text columns as object, pandas 3 as its string dtype; the corpus must not care."""
    docs = [" = Robert Boulter = ", " Robert Boulter is an English actor . ", "\tindented\t"]
    csv = tmp_path / "c.csv"
    pd.DataFrame({"text": docs}).to_csv(csv, index=False)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(docs) + "\n")
    seen = {}
    for infer_string in (False, True):  # False: pandas 2's object columns
        with pd.option_context("future.infer_string", infer_string):
            for path in (csv, jsonl, txt):
                corpus = load_corpus(CorpusSpec(source="file", path=str(path)), "general")
                assert corpus.records["text"].tolist() == docs, (infer_string, path.suffix)
                seen.setdefault(path.suffix, set()).add(corpus.fingerprint)
    assert all(len(fps) == 1 for fps in seen.values())


def test_a_field_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": ["a", "list"]}) + "\n")
    with pytest.raises(CorpusError, match=r"general: field .text. of record #2 .* holds a value of type list .*not text"):
        load_corpus(CorpusSpec(source="file", path=str(path)), "general")


# --- corpora as users keep them: compressed, directories, globs ---------------------------------------

def test_compressed_files_directories_and_globs(tmp_path):
    import bz2
    import gzip
    import lzma

    import zstandard

    docs = ["first document", "second document", "third"]
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    files = {"c.jsonl.gz": gzip.compress(jsonl), "c.txt.bz2": bz2.compress(("\n".join(docs) + "\n").encode()),
             "c.csv.xz": lzma.compress(pd.DataFrame({"text": docs}).to_csv(index=False).encode()),
             "c.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl)}
    plain = load_corpus(CorpusSpec(source="file", path=str(_write(tmp_path / "c.jsonl", jsonl))), "general")
    for name, data in files.items():
        corpus = load_corpus(CorpusSpec(source="file", path=str(_write(tmp_path / name, data))), "general")
        assert corpus.records["text"].tolist() == docs and corpus.fingerprint == plain.fingerprint, name
    shards = tmp_path / "shards"
    _write(shards / "part-0.jsonl.gz", gzip.compress(jsonl[: jsonl.index(b"\n") + 1]))
    _write(shards / "part-1.jsonl", jsonl[jsonl.index(b"\n") + 1:])
    for path in (shards, shards / "part-*"):  # a directory, or a glob: its files in name order
        corpus = load_corpus(CorpusSpec(source="file", path=str(path)), "general")
        assert corpus.records["text"].tolist() == docs and corpus.fingerprint == plain.fingerprint
    with pytest.raises(CorpusError, match="general.path: the pattern .*nothing-\\*.jsonl matches no file"):
        load_corpus(CorpusSpec(source="file", path=str(tmp_path / "nothing-*.jsonl")), "general")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(CorpusError, match="general.path: cannot read .*broken.jsonl.gz"):
        load_corpus(CorpusSpec(source="file", path=str(tmp_path / "broken.jsonl.gz")), "general")


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_an_empty_file_is_named_as_such(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CorpusError, match=r"domain.path: .*empty.jsonl holds no records"):
        load_corpus(CorpusSpec(source="file", path=str(tmp_path / "empty.jsonl")), "domain")


def test_a_title_is_the_first_line_as_files_split_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("First\x0cpage of the document\n")
    corpus = load_corpus(CorpusSpec(source="file", path=str(path)), "general")
    assert document_titles(corpus, ("text",)) == ["First\x0cpage of the document"]
