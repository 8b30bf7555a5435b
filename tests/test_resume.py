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

from ftcore import study

from test_flow import REPO, _recomputed, _run, harness  # noqa: F401 - harness: Prefect's test server for every test here

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
    env = dict(os.environ)  # the worker's Prefect home (conftest): a new one's database costs ~10 s of migrations
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

    # The uninterrupted run: the DAG without Prefect, in this process (its table is `ftstudy run`'s: the test below
    # compares the two), which saves an arm process and the flow's bookkeeping.
    written = study.run_study(cfg.model_copy(update={"artifacts_dir": str(tmp_path / "clean")}))
    clean = pd.read_parquet(tmp_path / "clean" / written["table"])
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


# The study's DAG without Prefect, once per (artifacts root, crash point) of argv[1], each in a process forked from
# this one after its imports (each run pays its own work, not ~4 s of torch and transformers imports again; nothing
# has run a model before the forks, as in the arm fork server). Prints "<root> <point> <how it ended>" per run.
FORKED_RUNS = """
import json, os, signal, sys, traceback
from ftcore import study
from ftcore.config_files import load_config
import tasks.arm_libraries  # torch, transformers, peft: what every run imports

for root, point in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if point:
                os.environ["FTSTUDY_CRASH_AT"] = point
            study.run_study(load_config("smoke", sys.argv[2:], artifacts_dir=root))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    ended = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    print("RUN", root, point, ended, flush=True)
"""


def test_sigkill_at_each_write_then_rerun_gives_the_same_table(corpus_files, tmp_path):
    """Kill the run (SIGKILL) at the moment each kind of artifact is about to be renamed into place.

    The killed runs are the DAG without Prefect (atomic writes are ftcore's; this saves a Prefect
    server start per kill), each in its own process (FORKED_RUNS); the rerun that must recover from them is
    `ftstudy run`.
    """
    files = {"domain": {"path": str(corpus_files["domain"]), "max_docs": None},
             "general": {"path": str(corpus_files["general"]), "max_docs": None},
             "replay": {"path": str(corpus_files["replay"]), "max_docs": None}}
    overrides = [f"{k}={json.dumps(v)}" for k, v in files.items()]
    overrides += ['arms=["full"]', "chunk_len=96", "test_docs=8", 'format.prompt_template="Title: {prompt}\\nAbstract: "']
    env = dict(os.environ)  # the worker's Prefect home (conftest): a new one's database costs ~10 s of migrations

    def run(command):
        # Output to a file, not a pipe: a killed run's orphaned API server would hold a pipe open.
        log = tmp_path / "run.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            code = proc.wait(timeout=300)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever a killed run left behind
        except ProcessLookupError:
            pass
        return code, log.read_text()

    reference, artifacts = tmp_path / "reference", tmp_path / "crashed"
    # the first rename:model is the built base model, the second the arm's trained model
    points = ["rename:model", "rename:train.parquet", "rename:chunks.parquet",
              "rename:scores.parquet", "rename:model", "rename:report.md"]
    runs = [(str(reference), None)] + [(str(artifacts), point) for point in points]
    code, out = run([sys.executable, "-c", FORKED_RUNS, json.dumps(runs), *overrides])
    assert code == 0, out[-3000:]
    ended = [line.split(" ", 3)[1:] for line in out.splitlines() if line.startswith("RUN ")]
    assert ended == [[str(reference), "None", "exit 0"]] + [
        [str(artifacts), point, f"signal {signal.SIGKILL.value}"] for point in points], out[-3000:]
    code, out = run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--artifacts", str(artifacts),
                     *(f"--set={o}" for o in overrides)])
    assert code == 0, out
    table = pd.read_parquet(artifacts / json.loads((artifacts / "latest.json").read_text())["table"])
    pd.testing.assert_frame_equal(table, pd.read_parquet(reference / json.loads((reference / "latest.json").read_text())["table"]))
