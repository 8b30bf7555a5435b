"""`ftstudy serve` end to end: a real Prefect server, the deployments `ftstudy deploy` registers, process workers.

A study run is created through the API the way the UI's run form does it (smoke config, arms on the
work-pool executor); a wrong parameter type is refused by the server; a failed run is retried with
`prefect flow-run retry` without retraining finished arms; the corpus check starts a study only
after the corpus changed. At the end every process `serve` started is gone, checked by process id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ftcore.config import ArmSpec, StudyConfig, TrainSpec
from ftcore.config_files import load_config

pytestmark = pytest.mark.slow
FTSTUDY = str(Path(sys.executable).with_name("ftstudy"))
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PG = "postgres@127.0.0.1:5432"  # the project's machines run PostgreSQL here (trust auth)


def _postgres(sql: str, database: str = "postgres"):
    """Run one statement on the local PostgreSQL; None when none answers."""
    import asyncio

    import asyncpg

    async def go():
        conn = await asyncpg.connect(f"postgresql://{PG}/{database}", timeout=5)
        try:
            return await conn.fetch(sql)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
        return None


@pytest.fixture(scope="module")
def database():
    """A fresh PostgreSQL database for the team server (a shared server's recommended backend); None = SQLite."""
    name = f"ftstudy_test_{os.getpid()}"
    if _postgres(f"CREATE DATABASE {name}") is None:
        yield None
        return
    yield name
    _postgres(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def service(tmp_path_factory, database):
    root = tmp_path_factory.mktemp("service")
    port = _free_port()
    home = root / "prefect-home"
    out = root / "serve.out"
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    db = ["--database-url", f"postgresql+asyncpg://{PG}/{database}"] if database else []
    with open(out, "wb") as f:
        proc = subprocess.Popen([FTSTUDY, "serve", "--port", str(port), "--home", str(home), *db], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    svc = {"proc": proc, "home": home, "root": root, "api": f"http://127.0.0.1:{port}/api", "out": out,
           "database": database}
    try:
        deadline = time.monotonic() + 300
        while "ftstudy serve: ready" not in out.read_text():
            assert proc.poll() is None, f"ftstudy serve exited {proc.returncode}:\n{out.read_text()}"
            assert time.monotonic() < deadline, f"ftstudy serve not ready in 300 s:\n{out.read_text()}"
            time.sleep(1)
        svc["pids"] = json.loads((home / "serve.json").read_text())["processes"]
        yield svc
    finally:
        if proc.poll() is None:  # the last test stops it; this is the fallback when a test failed early
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in svc.get("pids", {}).values():
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def client(service):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: service["api"]}):
        with get_client(sync_client=True) as c:
            yield c


@pytest.fixture(scope="module")
def config(service, tiny_model, corpus_files):
    """The smoke config on the fixture model, with its own copy of the domain corpus (changed later)."""
    data = service["root"] / "data"
    data.mkdir()
    domain = Path(shutil.copy(corpus_files["domain"], data / "papers.csv"))
    return load_config(
        "smoke",
        model={"source": "local", "name": str(tiny_model)},
        domain={"source": "file", "path": str(domain), "text_fields": ["titles", "summaries"], "max_docs": None},
        general={"source": "file", "path": str(corpus_files["general"]), "file_format": "text", "max_docs": None},
        replay={"source": "file", "path": str(corpus_files["replay"]), "text_fields": ["text"], "max_docs": None},
        test_docs=8, chunk_len=96, format={"prompt_template": "Title: {prompt}\nAbstract: "},
        arms=["full", "lora"], executor="work-pool", artifacts_dir=str(service["root"] / "artifacts"),
    )


def _deployment(client, name):
    return client.read_deployment_by_name(name)


def _wait(client, run_id, timeout=420):
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state and run.state.is_final():
            return run
        assert time.monotonic() < deadline, f"flow run {run.name} still {run.state.name} after {timeout} s"
        time.sleep(1)


def _runs(client, deployment):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    dep = _deployment(client, deployment)
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


def _train_runs(client, arm):
    return [r for r in _runs(client, "ftstudy-train-arm/train-arm") if r.name.startswith(f"train-{arm}-")]


def _logged(client, run_id, text, timeout=60) -> bool:
    """Whether a flow run's log (sent by its process as it ends, so polled) has a line containing `text`."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        if any(text in log.message for log in logs):
            return True
        time.sleep(0.5)
    return False


def _run_check(client, config):
    check = _deployment(client, "ftstudy-corpus-check/corpus-check")
    run = client.create_flow_run_from_deployment(check.id, parameters={"config": config.model_dump(mode="json")})
    run = _wait(client, run.id, timeout=180)
    assert run.state.is_completed(), run.state
    return run


def test_deployments_are_registered_with_the_config_form(client):
    study = _deployment(client, "ftstudy/study")
    assert study.work_pool_name == "ftstudy"
    schema = study.parameter_openapi_schema
    assert schema["properties"]["config"]["$ref"].endswith("StudyConfig")
    assert study.parameters["config"]["executor"] == "work-pool"  # the preset's values fill the form
    # PostgreSQL stores the schema as JSONB, which re-sorts its keys: the form's order is each field's position.
    for name, model in (("StudyConfig", StudyConfig), ("TrainSpec", TrainSpec), ("ArmSpec", ArmSpec)):
        props = schema["definitions"][name]["properties"]
        assert sorted(props, key=lambda k: props[k]["position"]) == list(model.model_fields), name
    arm = _deployment(client, "ftstudy-train-arm/train-arm")
    assert arm.work_pool_name == "ftstudy-gpu"
    # serve's pools start a run's engine with this interpreter directly, not through Prefect's workspace supervisor.
    from prefect.utilities.processutils import command_to_string

    for pool in ("ftstudy", "ftstudy-gpu"):
        command = client.read_work_pool(pool).base_job_template["variables"]["properties"]["command"]["default"]
        assert command == command_to_string([sys.executable, "-m", "prefect.engine"]), pool
    assert "PREFECT_LOGGING_EXTRA_LOGGERS" in arm.job_variables["env"]
    check = _deployment(client, "ftstudy-corpus-check/corpus-check")
    assert [s.schedule.cron for s in check.schedules] == ["0 * * * *"]
    # No hourly check of the demo config during the test: it would start a real demo study.
    for s in check.schedules:
        client.update_deployment_schedule(check.id, s.id, active=False)


def test_a_wrong_parameter_type_is_refused_by_the_server(client, config):
    from prefect.exceptions import PrefectHTTPStatusError

    study = _deployment(client, "ftstudy/study")
    bad = {**config.model_dump(mode="json"), "chunk_len": "long"}
    with pytest.raises(PrefectHTTPStatusError, match="config.chunk_len"):
        client.create_flow_run_from_deployment(study.id, parameters={"config": bad})


def test_a_failed_study_is_retried_without_retraining_finished_arms(client, config, service):
    # The lora arm cannot create its directory (a file is in the way): it fails, full finishes.
    blocker = Path(config.artifacts_dir) / "train-lora"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    study = _deployment(client, "ftstudy/study")
    run = client.create_flow_run_from_deployment(study.id, parameters={"config": config.model_dump(mode="json")})
    run = _wait(client, run.id)
    assert run.state.is_failed(), run.state
    assert "lora" in (run.state.message or "")
    assert [r.state.name for r in _train_runs(client, "full")] == ["Completed"]

    blocker.unlink()
    env = {**os.environ, "PREFECT_API_URL": service["api"]}
    subprocess.run([PREFECT, "--no-prompt", "flow-run", "retry", str(run.id)], env=env, check=True,
                   capture_output=True, timeout=120)
    run = _wait(client, run.id)
    assert run.state.is_completed(), run.state
    # The finished arm was a cache hit: one deployment run; lora ran twice (failed, then completed).
    assert len(_train_runs(client, "full")) == 1
    assert sorted(r.state.name for r in _train_runs(client, "lora")) == ["Completed", "Failed"]
    artifacts = client.read_artifacts()
    assert any(a.key == "ftstudy-table" and a.flow_run_id == run.id for a in artifacts)


def test_corpus_check_starts_a_study_only_after_a_change(client, config):
    before = len(_runs(client, "ftstudy/study"))
    _run_check(client, config)  # unchanged: counted below, after the changed corpus's study ran (well over 10 s)

    domain = Path(config.domain.path)
    domain.write_text(domain.read_text().replace("Loss", "Losses", 1))
    _run_check(client, config)
    deadline = time.monotonic() + 120
    while len(runs := _runs(client, "ftstudy/study")) == before:
        assert time.monotonic() < deadline, "no study run triggered by ftstudy.corpus.changed"
        time.sleep(1)
    triggered = max(runs, key=lambda r: r.created)
    assert triggered.parameters["config"]["domain"]["path"] == str(domain)
    triggered = _wait(client, triggered.id)
    assert triggered.state.is_completed(), triggered.state
    assert len(_runs(client, "ftstudy/study")) == before + 1, "a study ran although no corpus changed"
    # Only what depends on the domain corpus recomputed: the base model's general eval was a cache hit.
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[triggered.id])))
    states = {t.name: t.state.name for t in tasks}
    assert states["eval-base-general"] == "Cached" and states["fingerprint-general"] == "Cached"
    assert states["tokenize-domain"] == "Completed"
    # After that successful study the same corpus is unchanged again: the check stays quiet. Its log says it took the
    # path that emits nothing (flows.corpus_check), so no run can follow; a few seconds more for any that would.
    after = len(_runs(client, "ftstudy/study"))
    quiet = _run_check(client, config)
    assert _logged(client, quiet.id, "corpora unchanged since the last successful study")
    time.sleep(3.0)
    assert len(_runs(client, "ftstudy/study")) == after


def test_arms_and_seeds_fan_out_on_the_work_pool(client, config):
    """A sweep through the service: one train-arm run per arm and seed, joined into one table."""
    sweep = type(config).model_validate({**config.model_dump(mode="json"), "seeds": [0, 1],
                                         "arms": ["full", {"name": "lora-r2", "method": "lora", "lora": {"r": 2}}]})
    study = _deployment(client, "ftstudy/study")
    run = client.create_flow_run_from_deployment(study.id, parameters={"config": sweep.model_dump(mode="json")})
    run = _wait(client, run.id)
    assert run.state.is_completed(), run.state
    names = {r.name.rsplit("-", 1)[0] for r in _runs(client, "ftstudy-train-arm/train-arm")}
    # full at seed 0 was trained by the earlier study (same key): a cache hit, no new deployment run.
    assert {"train-full-s1", "train-lora-r2-s0", "train-lora-r2-s1"} <= names
    artifacts = [a for a in client.read_artifacts() if a.key == "ftstudy-table" and a.flow_run_id == run.id]
    (artifact,) = artifacts
    rows = artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)
    # The UI's table: the arms' changes (the base's perplexities are in its description), seeds shown as there are two
    assert [r["arm"] for r in rows] == ["full", "lora-r2"] and [r["seeds"] for r in rows] == ["2", "2"]
    assert "Base perplexity: domain " in artifact.description


def test_a_cancelled_study_cancels_its_arm_runs(client, config):
    """Cancel on a study (the UI's button) while its arm trains on the work pool: the study cancels the arm's run
    itself, so its process stops at once. Prefect's server would cancel it only in its next cancellation sweep
    (every 20 s), the arm training on meanwhile and the study waiting for it until its worker killed it (30 s)."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    from tasks.runner import CANCELLED_WITH_STUDY

    slow = type(config).model_validate({**config.model_dump(mode="json"), "arms": ["full"],
                                        "train": {**config.train.model_dump(), "max_steps": 1500}})
    run = client.create_flow_run_from_deployment(_deployment(client, "ftstudy/study").id,
                                                 parameters={"config": slow.model_dump(mode="json")})
    deadline = time.monotonic() + 240
    while not (arms := [r for r in _train_runs(client, "full") if r.state and r.state.is_running()]):
        assert time.monotonic() < deadline, f"no train-full run started: study {client.read_flow_run(run.id).state}"
        time.sleep(1)
    client.set_flow_run_state(run.id, State(type=StateType.CANCELLING))
    run, arm = _wait(client, run.id, timeout=120), _wait(client, arms[0].id, timeout=120)
    assert run.state.type == StateType.CANCELLED, run.state
    assert arm.state.type == StateType.CANCELLED, arm.state
    asked = [s.message for s in client.read_flow_run_states(arm.id) if s.type == StateType.CANCELLING]
    assert asked == [CANCELLED_WITH_STUDY]


def test_the_team_server_keeps_its_runs_in_postgresql(service, client):
    """Every study above ran through a server whose database is PostgreSQL (when one answers here)."""
    if service["database"] is None:
        pytest.skip(f"no PostgreSQL answers at {PG}: the service tests ran on SQLite")
    assert "database: postgresql+asyncpg://" in service["out"].read_text()
    rows = _postgres("SELECT count(*) AS n FROM flow_run WHERE name LIKE 'study-smoke-%'", service["database"])
    studies = [r for r in client.read_flow_runs(limit=200) if r.name.startswith("study-smoke-")]
    assert rows[0]["n"] == len(studies) >= 2


def _active_runs(service) -> list[tuple[str, str]]:
    """(name, state) of every flow run still Pending, Running or Cancelling, read from the service's database."""
    sql = "SELECT name, state_type FROM flow_run WHERE state_type IN ('PENDING', 'RUNNING', 'CANCELLING')"
    if service["database"]:
        return [(r["name"], r["state_type"]) for r in _postgres(sql, service["database"])]
    import sqlite3

    with sqlite3.connect(service["home"] / "prefect.db") as db:
        return db.execute(sql).fetchall()


def test_ctrl_c_mid_study_stops_every_process_and_ends_its_runs_and_serve_restarts_at_once(service, client, config):
    """Ctrl-C while an arm trains: every process serve started is gone, the study and its arm run end (none stays
    Running in the database), and serve starts again on the same port and database right away."""
    slow = type(config).model_validate({**config.model_dump(mode="json"), "arms": ["full"],
                                        "train": {**config.train.model_dump(), "max_steps": 2000}})
    run = client.create_flow_run_from_deployment(_deployment(client, "ftstudy/study").id,
                                                 parameters={"config": slow.model_dump(mode="json")})
    deadline = time.monotonic() + 240
    while not [r for r in _train_runs(client, "full") if r.state and r.state.is_running()]:
        assert time.monotonic() < deadline, f"no train-full run started: study {client.read_flow_run(run.id).state}"
        time.sleep(2)
    proc = service["proc"]
    tree = [psutil.Process(pid) for pid in service["pids"].values()]
    tree += [c for p in tree for c in p.children(recursive=True)]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 0
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"still running after Ctrl-C: {[(p.pid, p.name()) for p in alive]}"
    out = service["out"].read_text()
    assert "ftstudy serve: stopped" in out and "unfinished run(s)" in out
    assert _active_runs(service) == []

    again = service["root"] / "serve-again.out"
    port = service["api"].split(":")[-1].split("/")[0]
    db = ["--database-url", f"postgresql+asyncpg://{PG}/{service['database']}"] if service["database"] else []
    with open(again, "wb") as f:
        restarted = subprocess.Popen([FTSTUDY, "serve", "--port", port, "--home", str(service["home"]), *db],
                                     stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "ftstudy serve: ready" not in again.read_text():
            assert restarted.poll() is None, f"serve did not restart on port {port}:\n{again.read_text()}"
            assert time.monotonic() < deadline, again.read_text()
            time.sleep(1)
    finally:
        restarted.send_signal(signal.SIGINT)
        assert restarted.wait(120) == 0
