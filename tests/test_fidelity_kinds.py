"""Issue 27: six kinds of input that gave a silently wrong number, each rebuilt small with a tiny fixture
tokenizer (a BOS-adding one, an NFKC-normalizing one) and checked against a computation written here,
independently of ftcore: duplicates across the held-out split, replay that is the benchmark, BOS scored
inside sliding windows, bytes lost to a normalizing tokenizer, documents dropped for one empty field.
(The chat template that ends in a newline is in test_chunking: test_mask_matches_trl_own_preparation.)"""

from __future__ import annotations

import copy
import json
import math
import re
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ftcore import contamination, report, study
from ftcore.inputs import StudyError
from ftcore.config import CorpusSpec, FormatSpec, InputError
from ftcore.corpora import document_texts, load_corpus
from ftcore.models import load_model, load_tokenizer

SEP = "\n\n"  # the study's general_separator


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def _variant(tok, normalizer=None, bos: bool = False):
    """The tiny tokenizer with a Unicode normalizer and/or a BOS it puts before every text (Llama, Gemma)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tok.backend_tokenizer)
    extra = {}
    if normalizer is not None:
        backend.normalizer = normalizer
    if bos:
        backend.add_special_tokens(["<bos>"])
        backend.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))])
        extra["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token, pad_token=tok.pad_token, **extra)


@pytest.fixture(scope="module")
def bos_tok(tok):
    out = _variant(tok, bos=True)
    assert out("a")["input_ids"][0] == out.bos_token_id
    return out


@pytest.fixture(scope="module")
def nfkc_tok(tok):
    from tokenizers import normalizers

    return _variant(tok, normalizer=normalizers.NFKC())


@pytest.fixture(scope="module")
def trimming_tok(tok):
    """NFKC, and offsets trimmed of the leading space a byte-level token carries (GPT-2's trim_offsets)."""
    from tokenizers import normalizers, processors

    out = _variant(tok, normalizer=normalizers.NFKC())
    out.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    return out


def _stream_by_hand(tokenizer, texts: list[str]) -> list[int]:
    """The general stream: each document then the separator, tokenized without special tokens, in order."""
    return [t for text in texts for t in tokenizer(text + SEP, add_special_tokens=False)["input_ids"]]


# --- 1. duplicates on both sides of the held-out split (datasets #4261) ---------------------------------

@pytest.mark.parametrize("kind", ["instruction", "lm"])
def test_duplicated_documents_are_dropped_before_the_split(study_config, corpus_files, tmp_path, kind):
    papers = pd.read_csv(corpus_files["domain"]).head(20)  # 20 distinct title/abstract pairs
    twice = pd.concat([papers, papers.sample(frac=1, random_state=0)], ignore_index=True)  # each stored twice
    path = tmp_path / "twice.csv"
    twice.to_csv(path, index=False)
    cfg = study_config(domain={"path": str(path)}, test_docs=8, arms=["full"],
                       format={"kind": kind} if kind == "lm" else {})
    p = study.prepare(cfg)
    root = Path(cfg.artifacts_dir)
    train, test = pd.read_parquet(root / p.domain.train), pd.read_parquet(root / p.domain.test)
    stats = p.domain.stats
    assert stats["train"]["docs"] + stats["test"]["docs"] == 20 and stats["test"]["docs"] == 8  # were 32 + 8
    if kind == "instruction":  # no held-out row is token for token a training row (4 of 8 were)
        assert not set(map(tuple, test["input_ids"])) & set(map(tuple, train["input_ids"]))
    else:  # no held-out document's text is a training document's: the two streams share no document
        tok = load_tokenizer(p.model_dir)
        texts = [f"{t}{SEP}{s}" for t, s in zip(papers.titles, papers.summaries)]
        held = tok.decode([t for r in test["input_ids"] for t in r])
        trained = tok.decode([t for r in train["input_ids"] for t in r])
        assert all((text in held) != (text in trained) for text in texts)
    assert stats["corpus"]["duplicates"] == 20 and stats["corpus"]["docs"] == 20
    assert any("20 duplicate documents" in line for line in report.data_lines(study.data_stats(p)))


def test_a_held_out_abstract_stored_under_another_title_is_not_scored(study_config, corpus_files, tmp_path):
    """The same abstract under two titles is no duplicate record, but scoring it after training on it is a leak:
    held-out rows whose scored text the training rows hold are dropped and counted (a fresh user's case)."""
    papers = pd.read_csv(corpus_files["domain"]).head(20)
    renamed = papers.assign(titles=papers.titles + " (v2)")
    path = tmp_path / "renamed.csv"
    pd.concat([papers, renamed], ignore_index=True).to_csv(path, index=False)
    cfg = study_config(domain={"path": str(path)}, test_docs=8, arms=["full"], chunk_len=256)
    p = study.prepare(cfg)
    root = Path(cfg.artifacts_dir)
    train, test = pd.read_parquet(root / p.domain.train), pd.read_parquet(root / p.domain.test)

    def completion(row) -> tuple:  # the scored tokens, computed here from the labels
        return tuple(t for t in row["labels"] if t != -100)

    trained = {completion(r) for _, r in train.iterrows()}
    assert not any(completion(r) in trained for _, r in test.iterrows())  # no held-out abstract was trained on
    copies = p.domain.stats["test"]["copies"]
    assert copies > 0 and len(test) == 8 - copies
    assert any(f"{copies} held-out example" in line for line in report.data_lines(study.data_stats(p)))


def test_replay_that_holds_the_held_out_domain_text_is_refused(study_config, corpus_files, tmp_path):
    """Replay text that contains the held-out domain documents would inflate the replay arm's domain gain."""
    papers = pd.read_csv(corpus_files["domain"])
    path = tmp_path / "replay-papers.jsonl"
    papers.assign(text=papers.titles + "\n\n" + papers.summaries)[["text"]].to_json(path, orient="records", lines=True)
    cfg = study_config(arms=["replay"], replay={"path": str(path), "text_fields": ["text"], "max_docs": None})
    with pytest.raises(StudyError, match=r"replay.path and domain.path overlap: [\d.]+% of the held-out domain rows"):
        study.prepare(cfg)


def test_one_run_shared_by_chance_refuses_no_small_general_set():
    """In a set of 2,048 scored tokens one shared run of 32 is 1.6%: over 1%, but two runs' worth is the floor."""
    assert not contamination.too_much(32 / 2048, 2048)
    assert contamination.too_much(0.05, 2048) and contamination.too_much(0.02, 100_000)


# --- 2. replay that is the benchmark (lm-eval #1056) --------------------------------------------------

def test_replay_that_holds_the_benchmark_is_refused_with_its_share(study_config, corpus_files, tmp_path, tok):
    lines = corpus_files["general"].read_text().splitlines()
    own = [json.loads(line)["text"] for line in corpus_files["replay"].read_text().splitlines()]
    replay = tmp_path / "replay.jsonl"  # half the benchmark's documents, in order, then text of its own
    replay.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:30] + own))
    cfg = study_config(replay={"path": str(replay)}, arms=["full", "replay"], eval={"max_general_tokens": None})
    # By hand: the general tokens of the 30 copied documents, of all its tokens.
    lengths = [len(tok(line + SEP, add_special_tokens=False)["input_ids"]) for line in lines]
    expected = 100 * sum(lengths[:30]) / sum(lengths)
    with pytest.raises(InputError, match=r"replay\.path and general\.path overlap: .*must be disjoint") as caught:
        study.prepare(cfg)
    share = float(re.search(r"overlap: ([\d.]+)%", str(caught.value)).group(1))
    assert share == pytest.approx(expected, abs=0.06)
    assert not list(Path(cfg.artifacts_dir).glob("train-*")) and not list(Path(cfg.artifacts_dir).glob("eval-*"))


def test_domain_text_that_is_the_benchmark_is_refused(study_config, corpus_files, tmp_path):
    lines = corpus_files["general"].read_text().splitlines()
    paragraphs = [" ".join(lines[i:i + 3]) for i in range(0, 60, 3)]  # 20 general documents of ~100 tokens
    general = tmp_path / "general.txt"
    general.write_text("\n".join(paragraphs) + "\n")
    domain = tmp_path / "domain.csv"  # abstracts that are the benchmark's documents
    pd.DataFrame({"titles": [f"Paper {i}" for i in range(20)], "summaries": paragraphs}).to_csv(domain, index=False)
    with pytest.raises(InputError, match=r"domain\.path and general\.path overlap: \d"):
        study.prepare(study_config(domain={"path": str(domain)}, general={"path": str(general)}, arms=["full"]))


def test_disjoint_replay_is_accepted(study_config):
    p = study.prepare(study_config(arms=["full", "replay"]))  # the fixture's replay speeches share no run
    assert p.replay is not None


# --- 3. BOS scored inside sliding windows (lm-eval #2382) ----------------------------------------------

TEXTS = ["The first document is here.", "A second one, a bit longer than the first one.", "Third: short.",
         "And a fourth document that runs on for a while, so windows cross it."]


@pytest.mark.parametrize("stride", [3, 5, 7, 8, None])  # 8 and None: the stored rows, right before too
def test_windows_predict_every_stream_token_once_after_a_bos_and_never_a_bos(bos_tok, stride):
    from ftcore.chunking import tokenize_lm
    from ftcore.perplexity import stream_token_docs, stream_windows

    df, _ = tokenize_lm(TEXTS, bos_tok, chunk_len=8)
    stream = _stream_by_hand(bos_tok, TEXTS)
    bos = bos_tok.bos_token_id
    windows = stream_windows(df, 8, stride)
    done = 0  # stream tokens predicted so far
    for ids, labels, n_bytes in windows:
        assert len(ids) <= 8 and ids[0] == bos and bos not in ids[1:]  # BOS first, and only there
        predicted = [lab for lab in labels[1:] if lab != -100]
        assert bos not in predicted
        m = len(predicted)
        assert labels[len(ids) - m:] == ids[len(ids) - m:] and set(labels[1: len(ids) - m]) <= {-100}
        # after BOS, the window is the stream just before and up to its last predicted token
        assert ids[1:] == stream[done + m - (len(ids) - 1): done + m] and predicted == stream[done: done + m]
        assert n_bytes == len(bos_tok.decode(predicted).encode())
        done += m
    assert done == len(stream)  # every stream token once
    assert sum(n for _, _, n in windows) == sum(len((t + SEP).encode()) for t in TEXTS)
    assert [len(d) for d, _ in stream_token_docs(df, 8, stride)] == [len(ids) for ids, _, _ in windows]


def test_max_general_tokens_counts_stream_tokens(bos_tok):
    from ftcore.chunking import tokenize_lm
    from ftcore.perplexity import stream_windows

    df, _ = tokenize_lm(TEXTS, bos_tok, chunk_len=8)
    windows = stream_windows(df, 8, 4, max_tokens=20)
    assert [lab for _, labels, _ in windows for lab in labels[1:] if lab != -100] == _stream_by_hand(bos_tok, TEXTS)[:20]


# --- 5. bytes lost to a normalizing tokenizer (tokenizers #1201) ---------------------------------------

# Decomposed accents (NFC/NFKC compose them), half-width katakana with a voiced mark, a ligature, a circled digit.
COMPOSED = ["Un cafe\u0301 tre\u0300s cre\u0300me, na\u0131\u0308ve re\u0301sume\u0301.", "\uff8a\uff9f\uff9d and \uff76\uff9e",
            "the \ufb01nal \u2460 of e\u0301e\u0301 done"]


@pytest.mark.parametrize("which", ["nfkc_tok", "trimming_tok"])
def test_bytes_are_the_original_text_under_an_nfkc_tokenizer(request, which):
    from ftcore.chunking import tokenize_documents, tokenize_lm

    nfkc_tok = request.getfixturevalue(which)
    assert all(unicodedata.normalize("NFKC", t) != t for t in COMPOSED)  # the normalizer changes every text
    _, nbytes, _, _ = tokenize_documents(COMPOSED, nfkc_tok, SEP)
    assert nbytes.sum() == sum(len((t + SEP).encode("utf-8")) for t in COMPOSED)  # every original byte, once
    df, _ = tokenize_lm(COMPOSED, nfkc_tok, chunk_len=6)
    assert sum(sum(b) for b in df["token_bytes"]) == sum(len((t + SEP).encode("utf-8")) for t in COMPOSED)


@pytest.mark.parametrize("which", ["nfkc_tok", "trimming_tok"])
def test_bits_per_byte_of_a_completion_under_an_nfkc_tokenizer(tiny_model, request, which):
    """The issue's case: bits per byte = NLL / ln 2 / the completion's original UTF-8 bytes."""
    from ftcore.chunking import tokenize_instruction
    from ftcore.perplexity import domain_rows, score_rows, summarize

    nfkc_tok = request.getfixturevalue(which)

    fmt = FormatSpec(prompt_field="t", completion_field="c", prompt_template="Q: {prompt}\nA: ")
    records = pd.DataFrame({"t": ["one", "two", "three"], "c": COMPOSED})
    df, _ = tokenize_instruction(records, fmt, nfkc_tok, chunk_len=128)
    completions = [" " + c for c in COMPOSED]  # the template's trailing space belongs to the completion
    assert df["n_bytes"].tolist() == [len(c.encode("utf-8")) for c in completions]
    scores = score_rows(load_model(tiny_model), domain_rows(df), 2, nfkc_tok.pad_token_id)
    summary = summarize(scores)
    by_hand = scores["nll_sum"].sum() / math.log(2) / sum(len(c.encode("utf-8")) for c in completions)
    assert summary["bpb"] == pytest.approx(by_hand, rel=1e-9)


def test_bytes_no_offsets_can_attribute_give_no_bits_per_byte():
    """Start offsets that go backwards split the text no way: bytes unknown, bits per byte NaN, not a number."""
    from ftcore.chunking import token_bytes
    from ftcore.perplexity import document_scores, summarize

    assert token_bytes("abcdef", [(0, 3), (3, 4), (1, 6)]) == [-1, -1, -1]
    scores = pd.DataFrame({"n_tokens": [3, 4], "nll_sum": [1.0, 2.0], "n_bytes": [5, -1]})
    summary = summarize(scores)
    assert math.isnan(summary["bpb"]) and summary["ppl"] == pytest.approx(math.exp(3.0 / 7))
    assert document_scores(scores, row_docs=pd.Series([0, 0]))["n_bytes"].tolist() == [-1]


# --- 6. a document dropped when one of its fields is empty ---------------------------------------------

def _titled(title: str = "Heading {}", text: str = "The {}th paragraph of prose, with enough words to tokenize.",
            n: int = 20, empty_titles: int = 5, wholly_empty: int = 2) -> list[dict]:
    docs = [{"title": "" if i < empty_titles else title.format(i), "text": text.format(i)} for i in range(n)]
    return docs + [{"title": "", "text": "  "}] * wholly_empty


def _by_hand(docs: list[dict]) -> list[str]:
    """Each document's non-empty fields joined by a blank line; documents with none are no documents."""
    joined = [SEP.join(v for v in (d["title"], d["text"]) if v.strip()) for d in docs]
    return [j for j in joined if j]


def test_a_document_with_one_empty_field_is_kept(tmp_path):
    path = tmp_path / "titled.jsonl"
    docs = _titled()
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    corpus = load_corpus(CorpusSpec(source="file", path=str(path), text_fields=("title", "text")), "general")
    assert document_texts(corpus, ("title", "text")) == _by_hand(docs)  # 20 documents, 5 without a title
    assert corpus.empty == 2  # only the wholly empty ones are dropped, and counted


def test_the_study_scores_and_trains_on_documents_with_an_empty_field(study_config, tmp_path, tok):
    docs = _titled()
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps(d) + "\n" for d in docs))
    domain = tmp_path / "domain.csv"
    abstracts = _titled("Paper {}: sparse kernels", "We study {} sparse graph kernels and their gradient policy.")
    pd.DataFrame([{"titles": d["title"], "summaries": d["text"]} for d in abstracts]).to_csv(domain, index=False)
    cfg = study_config(general={"path": str(general), "file_format": "auto", "text_fields": ["title", "text"]},
                       domain={"path": str(domain)}, format={"kind": "lm"}, arms=["full"])
    p = study.prepare(cfg)
    assert p.general.stats["docs"] == 20 and p.general.stats["empty"] == 2
    assert p.general.stats["tokens"] == len(_stream_by_hand(tok, _by_hand(docs)))
    assert p.domain.stats["train"]["docs"] + p.domain.stats["test"]["docs"] == 20
    assert p.domain.stats["corpus"]["empty"] == 2
    assert any("general: 2 records without text dropped" in line for line in report.data_lines(study.data_stats(p)))


def test_an_instruction_record_needs_its_completion_not_its_prompt(tmp_path):
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"t": ["", "Title", "Title two", ""], "c": ["an abstract", "", "another abstract", ""]}).to_csv(
        path, index=False)
    corpus = load_corpus(CorpusSpec(source="file", path=str(path)), "domain",
                         FormatSpec(prompt_field="t", completion_field="c"))
    assert corpus.records["c"].tolist() == ["an abstract", "another abstract"]  # an empty completion cannot train
    assert corpus.empty == 2


def test_shared_runs_are_found_by_binary_search_as_by_a_set_lookup():
    """shared_mask looks each run up in the sorted hashes (a binary search): the same tokens as np.isin marks,
    at both ends of the sorted hashes and with none at all."""
    rng = np.random.default_rng(0)
    theirs_ids = rng.integers(0, 50, 5000)
    ids = np.concatenate([rng.integers(0, 50, 300), theirs_ids[100:180], rng.integers(0, 50, 300), theirs_ids[:40]])
    theirs = contamination.hashes_of([theirs_ids], 8)
    expected_hits = np.flatnonzero(np.isin(contamination.run_hashes(ids, 8), theirs))
    mask = contamination.shared_mask(ids, theirs, 8)
    edges = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(edges, expected_hits, 1)
    np.add.at(edges, expected_hits + 8, -1)
    assert (mask == (np.cumsum(edges)[:-1] > 0)).all() and mask[300:380].all() and mask[-40:].all()
    assert not contamination.shared_mask(ids, np.zeros(0, np.uint64), 8).any()
    edge = contamination.run_hashes(ids, 8)[[0, -1]]
    assert contamination.shared_mask(ids, np.sort(np.concatenate([theirs, edge])), 8)[[0, -1]].all()
