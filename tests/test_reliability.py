"""Faults lose nothing: damaged artifacts are recomputed, concurrent runs share one artifacts root."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pandas as pd
import pytest

from ftcore import study
from ftcore.io import entries_digest, file_entries, verify_manifest
from ftcore.results import Result
from ftcore.steps import Step, run_step


class Counted(Result):
    n: int


def test_a_step_reuses_verified_results_and_recomputes_damaged_ones(tmp_path):
    calls = []

    def compute(out, device):
        calls.append(1)
        (out / "data.txt").write_text("payload" * 100)
        return {"n": len(calls)}

    out = tmp_path / "root" / "step" / "key"
    step = Step("fingerprint", "step", out, compute, Counted, outputs=("data.txt",))
    first = run_step(step)
    # the result carries the content digest of its outputs: what the keys of later steps hash
    assert first.digest == entries_digest(file_entries(out, ["data.txt"]))
    assert first.n == 1
    assert run_step(step).n == 1 and len(calls) == 1
    # truncated on disk: detected by its checksum, recomputed, never used
    (out / "data.txt").write_text("payl")
    assert not verify_manifest(out)
    assert run_step(step).n == 2
    # edited in place with the same size
    (out / "data.txt").write_text("PAYLOAD" + "payload" * 99)
    assert run_step(step).n == 3
    # an unfinished step (no manifest) is not reused either
    (out / "manifest.json").unlink()
    assert run_step(step).n == 4


def _run(cfg_json: str, queue) -> None:
    from ftcore.config import StudyConfig

    cfg = StudyConfig.model_validate_json(cfg_json)
    queue.put(str(Path(cfg.artifacts_dir) / study.run_study(cfg)["table"]))


def test_two_concurrent_runs_produce_the_same_table(study_config):
    cfg = study_config(arms=["full", "lora"])
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(cfg.model_dump_json(), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    tables = [pd.read_parquet(queue.get(timeout=5)) for _ in procs]
    pd.testing.assert_frame_equal(tables[0], tables[1])
    # each step ran once: one directory per step, each with a valid manifest
    root = Path(cfg.artifacts_dir)
    for step in ("tokenize-domain", "train-full", "train-lora", "eval-base-domain", "eval-lora-general"):
        dirs = [d for d in (root / step).iterdir() if d.is_dir()]
        assert len(dirs) == 1 and verify_manifest(dirs[0]), step
        if step.startswith("train-"):
            log = [json.loads(x) for x in (dirs[0] / "train_log.jsonl").read_text().splitlines()]
            assert [e["step"] for e in log] == sorted({e["step"] for e in log})  # trained once, not twice


class Named(Result):
    label: str


def test_a_result_is_named_by_the_study_that_reads_it(tmp_path):
    """A label names a result in this study (a seed added turns "full" into "full-s0"); it is no part of the
    content, so a recorded result takes the current one."""
    def compute(out, device):
        (out / "w").write_text("weights")
        return {"label": "full"}

    out = tmp_path / "root" / "train-full" / "key"
    assert run_step(Step("train", "train-full", out, compute, Named, outputs=("w",), names={"label": "full"})).label == "full"
    again = run_step(Step("train", "train-full-s0", out, compute, Named, outputs=("w",), names={"label": "full-s0"}))
    assert again.label == "full-s0"


def test_a_failed_step_leaves_no_directory_behind(tmp_path):
    """A step that fails is computed again next time, from nothing: its half-written files do not stay under the
    artifacts root looking like a result (a fresh user found empty step directories after refused inputs)."""
    def compute(out, device):
        (out / "half.parquet").write_text("x")
        raise ValueError("bad input")

    out = tmp_path / "root" / "tokenize-domain" / "key"
    with pytest.raises(ValueError, match="bad input"):
        run_step(Step("tokenize", "tokenize-domain", out, compute, Counted))
    assert not out.exists()
