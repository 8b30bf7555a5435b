"""Shared fixtures: a tiny random model with a tokenizer trained here, small corpus files, a config."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest

import tempfile  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prefect reads these when imported: keep its home out of ~/.prefect and give the server time.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ftstudy-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ftcore")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's own device slots (tasks/devices.py): its studies do not wait for a study running beside it on
# this machine; the processes a test starts inherit them.
os.environ.setdefault("FTSTUDY_SLOTS_DIR", tempfile.mkdtemp(prefix="ftstudy-slots-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (`make test` runs two workers) each worker inherits what the controller set above: give
    # it a Prefect home and device slots of its own, so the two workers' studies neither share a database nor
    # wait for each other's arms. One compute thread per worker and per process it starts (set before torch is
    # imported): two workers with torch's default of one thread per core oversubscribe the cores, and the tiny
    # models gain nothing from a second thread.
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="ftstudy-prefect-home-")
    os.environ["FTSTUDY_SLOTS_DIR"] = tempfile.mkdtemp(prefix="ftstudy-slots-")
    os.environ["OMP_NUM_THREADS"] = "1"
else:
    # One migrated Prefect database for the whole session (below), made by this process: its path, which the workers
    # inherit. Always a new directory, which this process removes at the end.
    os.environ["FTSTUDY_TEST_PREFECT_DB"] = str(Path(tempfile.mkdtemp(prefix="ftstudy-prefect-db-")) / "prefect.db")

from ftcore.config_files import load_config  # noqa: E402
from ftcore.sources import build_tiny_model  # noqa: E402

WORDS = ("model network learning data training loss gradient layer attention token language vision graph "
         "robust sparse kernel policy reward image neural deep transfer domain general memory efficient").split()
PROSE = ("the city council met on tuesday to discuss the new bridge and the river that runs through the old town "
         "where the market has stood for a hundred years").split()


# The longest test files first, in this order (one worker's seconds on a 2-core AVX2 EPYC, BENCHMARKS.md §14:
# 261, 199, 170, 167, 111 and 76), then the rest in their order. The service's file is mostly waiting for its
# processes, so it starts first, beside the CPU-bound arm-process file.
LONGEST_FIRST = ("test_service.py", "test_arm_process.py", "test_cli.py", "test_flow.py", "test_resume.py",
                 "test_study.py")


def pytest_collection_modifyitems(config, items):
    """The longest test files first, longest first, then the rest: `make test`'s two workers take one file at a time
    in this order (`--dist loadfile --no-loadscope-reorder`), each the next file when it is almost done with its
    own, so the longest files start first and the short ones fill in at the end."""
    def place(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=place)


# A new Prefect database costs 115 migrations, 12.7 s of a core on a 2-core AVX2 EPYC (BENCHMARKS.md §14), and the
# suite needs several: each pytest process's test server and the Prefect home of each process's `ftstudy run`s. The
# pytest process that starts the session (xdist's controller, or `pytest` alone) migrates one in the background at
# once, while the workers start; each test server and each Prefect home then begins from a copy (SQLite's backup API:
# a consistent copy, whatever is still in the write-ahead log). Where the copy is not there yet, Prefect migrates its
# own database as it would without it.
MIGRATE = """
import asyncio, os, sqlite3, sys
from contextlib import closing
from prefect.server.database import provide_database_interface
asyncio.run(provide_database_interface().create_db())
building, template = sys.argv[1:]
with closing(sqlite3.connect(building)) as a, closing(sqlite3.connect(template + ".part")) as b:
    a.backup(b)
os.replace(template + ".part", template)  # a reader sees the whole database or none
"""
_migration: subprocess.Popen | None = None


def pytest_configure(config):
    global _migration
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    template = Path(os.environ["FTSTUDY_TEST_PREFECT_DB"])
    building = template.with_name("building.db")
    env = {**os.environ, "PREFECT_HOME": str(template.parent),
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{building}"}
    _migration = subprocess.Popen([sys.executable, "-c", MIGRATE, str(building), str(template)], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)


def _migrated_db(wait_s: float = 0) -> Path | None:
    """The session's migrated database once it is there (waiting up to `wait_s` seconds for it), else None."""
    template = Path(os.environ["FTSTUDY_TEST_PREFECT_DB"])
    deadline = time.monotonic() + wait_s
    while True:
        ended = _migration is not None and _migration.poll() is not None  # in the process that started it
        if template.exists():
            return template
        if ended or time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _copy_db(source: Path, dest: Path) -> None:
    part = dest.with_name(dest.name + ".part")
    with closing(sqlite3.connect(source)) as a, closing(sqlite3.connect(part)) as b:
        a.backup(b)
    os.replace(part, dest)


def pytest_unconfigure(config):
    if _migration is not None and _migration.poll() is None:
        _migration.kill()
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(Path(os.environ["FTSTUDY_TEST_PREFECT_DB"]).parent, ignore_errors=True)


@pytest.fixture(autouse=True)
def migrated_prefect_home():
    """This process's Prefect home (its `ftstudy run`s' database) begins from the migrated copy, if it has none yet."""
    home_db = Path(os.environ["PREFECT_HOME"]) / "prefect.db"
    if not home_db.exists() and (template := _migrated_db()) is not None:
        home_db.parent.mkdir(parents=True, exist_ok=True)
        _copy_db(template, home_db)
    yield


@pytest.fixture(autouse=True, scope="module")
def frozen_heap():
    """At each test file's start, the process's surviving objects (the libraries, earlier files' fixtures) frozen out
    of garbage collection (gc.freeze), as the arm fork server does: transformers' Trainer calls gc.collect() when
    an arm's training ends, which otherwise scans them all for every arm a test trains in this process. Unfrozen at
    the file's end, so what it left behind is collected before the next file's freeze."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's test server (prefect_test_harness: a SQLite database of its own, a copy of the session's migrated
    one), once per pytest process: each start costs seconds, and four test files need one. Its settings stay active
    for this process's later tests, which run flows against it or use no Prefect API at all; the processes
    tests start never see it (it sets no environment variable)."""
    import prefect.testing.utilities as harness

    with pytest.MonkeyPatch.context() as patch:
        if (template := _migrated_db(wait_s=60)) is not None:
            # The directory prefect_test_harness makes for its database (prefect-test.db) holds the migrated copy.
            patch.setattr(harness, "mkdtemp", lambda: _dir_holding(template, "prefect-test.db"))
        with harness.prefect_test_harness(server_startup_timeout=120):
            yield


def _dir_holding(db: Path, name: str) -> str:
    directory = tempfile.mkdtemp(prefix="ftstudy-prefect-test-")
    _copy_db(db, Path(directory) / name)
    return directory


def _sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    rng = random.Random(0)
    papers = pd.DataFrame({
        "titles": [_sentence(rng, WORDS, 4) for _ in range(40)],
        "summaries": [" ".join(_sentence(rng, WORDS, 8) for _ in range(3)) for _ in range(40)],
    })
    papers.to_csv(root / "papers.csv", index=False)
    (root / "wiki.txt").write_text("\n".join(_sentence(rng, PROSE, 12) for _ in range(60)) + "\n")
    with open(root / "replay.jsonl", "w") as f:
        for _ in range(30):
            f.write(json.dumps({"title": "speech", "text": " ".join(_sentence(rng, PROSE, 10) for _ in range(4))}) + "\n")
    return {"domain": root / "papers.csv", "general": root / "wiki.txt", "replay": root / "replay.jsonl"}


@pytest.fixture
def study_config(tiny_model, corpus_files, tmp_path):
    """The smoke preset pointed at the fixture model and files, artifacts in a fresh tmp dir."""
    def make(**fields):
        base = {
            "model": {"source": "local", "name": str(tiny_model)},
            "domain": {"source": "file", "path": str(corpus_files["domain"]), "text_fields": ["titles", "summaries"], "max_docs": None},
            "general": {"source": "file", "path": str(corpus_files["general"]), "file_format": "text", "max_docs": None},
            "replay": {"source": "file", "path": str(corpus_files["replay"]), "text_fields": ["text"], "max_docs": None},
            "test_docs": 8,
            "format": {"prompt_template": "Title: {prompt}\nAbstract: "},
            "chunk_len": 96,
            "artifacts_dir": str(tmp_path / "artifacts"),
        }
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return load_config("smoke", **base)
    return make


def build_tiny_family(family: str, out: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer random GPT-2 or GPT-NeoX (the seed recipe's families) with the tiny model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    common = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id}
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=1024, **common))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, max_position_embeddings=1024, **common))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Tiny random models of the three families the study is used with: Llama, GPT-2, GPT-NeoX."""
    root = tmp_path_factory.mktemp("families")
    return {"llama": tiny_model, **{f: build_tiny_family(f, root / f, tiny_model) for f in ("gpt2", "neox")}}


@pytest.fixture(scope="session")
def tiny_model_wide(tmp_path_factory) -> Path:
    """The tiny Llama at hidden size 64: bitsandbytes' 4-bit CPU kernels need widths in blocks of 64."""
    path = tmp_path_factory.mktemp("models") / "tiny-wide"
    build_tiny_model(path, hidden=64)
    return path


MC_QUESTIONS = [  # (question, choices, label): a small multiple-choice task in lm-eval's YAML format
    ("The model learns from", ["data", "rocks", "the sky"], 0), ("Attention is", ["all you need", "none"], 0),
    ("The training loss goes", ["down", "up", "sideways"], 0), ("A neural network has", ["layers", "wheels"], 0),
    ("The city council met on", ["tuesday", "the bridge", "memory"], 0), ("The river runs through", ["the old town", "a kernel"], 0),
]


@pytest.fixture(scope="session")
def mc_task(tmp_path_factory) -> Path:
    """A local multiple-choice task as lm-eval reads it: a YAML file with `dataset_path: json` and data files
    given relative to the YAML's folder."""
    root = tmp_path_factory.mktemp("tasks")
    (root / "data").mkdir()
    with open(root / "data" / "mc.jsonl", "w") as f:
        for q, choices, label in MC_QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/mc.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return root / "tiny_mc.yaml"
