"""Shared fixtures: a tiny random model with a tokenizer trained here, small corpus files, a config."""

from __future__ import annotations

import json
import os
import random
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

from ftcore.config import load_config  # noqa: E402
from ftcore.models import build_tiny_model  # noqa: E402

WORDS = ("model network learning data training loss gradient layer attention token language vision graph "
         "robust sparse kernel policy reward image neural deep transfer domain general memory efficient").split()
PROSE = ("the city council met on tuesday to discuss the new bridge and the river that runs through the old town "
         "where the market has stood for a hundred years").split()


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
