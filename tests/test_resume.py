"""Resuming the flow: a killed run resumes its arm from its checkpoint, a damaged artifact is recomputed, a run
killed at each kind of write recovers to the same table. (Apart from test_flow.py so that pytest-xdist's two
workers, one test file each, share the flow tests.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from test_flow import REPO, _recomputed, _run, harness  # noqa: F401 - harness: the module's Prefect test server

pytestmark = pytest.mark.slow


def _cli(cfg_args, artifacts, env):
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--artifacts", str(artifacts),
                             *cfg_args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_kill_and_resume_matches_an_uninterrupted_run(study_config, tiny_model, corpus_files, tmp_path):
    fields = {"arms": ["full"], "train": {"max_steps": 80, "save_steps": 10, "logging_steps": 10}}
    cfg = study_config(**fields)
    overrides = [f"--set={k}={json.dumps(v)}" for k, v in cfg.model_dump(mode="json").items()
                 if k not in ("artifacts_dir",)]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    artifacts = tmp_path / "killed"

    proc = _cli(overrides, artifacts, env)
    deadline = time.monotonic() + 240
    # Kill as soon as a checkpoint is complete (only the newest two are kept, so wait for any).
    while not list(artifacts.glob("train-full/*/checkpoints/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(artifacts.glob("train-full/*/train_summary.json"))

    proc = _cli(overrides, artifacts, env)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    assert "resuming from" in out and "resumed from checkpoint step" in out
    resumed = pd.read_parquet(artifacts / json.loads((artifacts / "latest.json").read_text())["table"])

    clean_cfg = cfg.model_copy(update={"artifacts_dir": str(tmp_path / "clean")})
    state, _ = _run(clean_cfg)
    clean = pd.read_parquet(tmp_path / "clean" / state.result()["table"])
    pd.testing.assert_frame_equal(resumed, clean, rtol=1e-4)


def test_damaged_artifact_is_recomputed_not_used(study_config):
    cfg = study_config(arms=["full"])
    root = Path(cfg.artifacts_dir)
    state, _ = _run(cfg)
    table = pd.read_parquet(root / state.result()["table"])
    scores = next(root.glob("eval-full-domain/*/scores.parquet"))
    scores.write_bytes(scores.read_bytes()[:100])  # truncated on disk
    state, states = _run(cfg)
    assert _recomputed(states) == {"eval-full-domain"}
    assert pd.read_parquet(root / state.result()["table"]).equals(table)


INLINE = ("import sys; from ftcore import study; from ftcore.config_files import load_config; "
          "study.run_study(load_config('smoke', sys.argv[2:], artifacts_dir=sys.argv[1]))")


def test_sigkill_at_each_write_then_rerun_gives_the_same_table(corpus_files, tmp_path):
    """Kill the run (SIGKILL) at the moment each kind of artifact is about to be renamed into place.

    The killed runs are the DAG without Prefect (atomic writes are ftcore's; this saves a Prefect
    server start per kill); the rerun that must recover from them is `ftstudy run`.
    """
    files = {"domain": {"path": str(corpus_files["domain"]), "max_docs": None},
             "general": {"path": str(corpus_files["general"]), "max_docs": None},
             "replay": {"path": str(corpus_files["replay"]), "max_docs": None}}
    overrides = [f"{k}={json.dumps(v)}" for k, v in files.items()]
    overrides += ['arms=["full"]', "chunk_len=96", "test_docs=8", 'format.prompt_template="Title: {prompt}\\nAbstract: "']
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}

    def run(artifacts, crash_at=None, cli=False):
        # Output to a file, not a pipe: a killed run's orphaned API server would hold a pipe open.
        log = tmp_path / "run.log"
        command = ([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--artifacts", str(artifacts),
                    *(f"--set={o}" for o in overrides)] if cli else
                   [sys.executable, "-c", INLINE, str(artifacts), *overrides])
        with open(log, "w") as out:
            proc = subprocess.Popen(command, cwd=REPO, env={**env, **({"FTSTUDY_CRASH_AT": crash_at} if crash_at else {})},
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            code = proc.wait(timeout=300)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever a killed run left behind
        except ProcessLookupError:
            pass
        return code, log.read_text()

    code, out = run(tmp_path / "reference")
    assert code == 0, out
    reference = pd.read_parquet(tmp_path / "reference" / json.loads((tmp_path / "reference" / "latest.json").read_text())["table"])

    artifacts = tmp_path / "crashed"
    # the first rename:model is the built base model, the second the arm's trained model
    points = ["rename:model", "rename:train.parquet", "rename:chunks.parquet",
              "rename:scores.parquet", "rename:model", "rename:report.md"]
    for point in points:
        code, out = run(artifacts, point)
        assert code == -signal.SIGKILL, (point, code, out[-2000:])
    code, out = run(artifacts, cli=True)
    assert code == 0, out
    table = pd.read_parquet(artifacts / json.loads((artifacts / "latest.json").read_text())["table"])
    pd.testing.assert_frame_equal(table, reference)
