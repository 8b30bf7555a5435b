"""The Prefect flow end to end: table, all-cached rerun, exactly-dependent recomputation (resuming: test_resume.py)."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.study import study_flow

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def harness(prefect_server):
    """Every test here runs flows against Prefect's test server (tests/conftest.py)."""
    yield


def _run(cfg):
    state = study_flow(config=cfg, return_state=True)
    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        # Task run states reach the server as events, a moment after the flow returns.
        while True:
            runs = client.read_task_runs(flow_run_filter=flow_run)
            if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    return state, {r.name: r.state.name if r.state else "unknown" for r in runs}


def _recomputed(states):
    return {name for name, s in states.items() if s != "Cached"}


ALL_STEPS = {"fingerprint-domain", "fingerprint-general", "fingerprint-replay", "fetch-model", "tokenize-domain",
             "tokenize-general", "tokenize-replay", "train-full", "train-replay", "train-lora", "write-results",
             *(f"eval-{a}-{s}" for a in ("base", "full", "replay", "lora") for s in ("domain", "general"))}


def test_flow_table_cache_and_dependent_recomputation(study_config, corpus_files, tmp_path):
    domain_file = tmp_path / "papers.csv"
    domain_file.write_bytes(corpus_files["domain"].read_bytes())
    cfg = study_config(domain={"path": str(domain_file)})

    state, states = _run(cfg)
    assert state.is_completed()
    assert set(states) == ALL_STEPS and _recomputed(states) == ALL_STEPS
    root = Path(cfg.artifacts_dir)
    table = pd.read_parquet(root / state.result()["table"])
    assert table.arm.tolist() == ["base", "full", "replay", "lora"]
    assert len(table) == 4 and {"domain_change_ci_low", "general_within_noise", "pareto"} <= set(table.columns)
    measured = [f"{s}_{k}" for s in ("domain", "general") for k in ("ppl", "ppl_ci_low", "ppl_ci_high", "change_pct")]
    assert all(math.isfinite(v) for v in table[measured].to_numpy().ravel())
    with get_client(sync_client=True) as client:  # the UI's artifacts: the table, and each arm's curve
        keys = {a.key for a in client.read_artifacts()}
    assert {"ftstudy-table", "curve-full", "curve-replay", "curve-lora"} <= keys

    # nothing changed: every task is a cache hit and the table is the same
    state, states = _run(cfg)
    assert state.is_completed() and _recomputed(states) == set()
    assert pd.read_parquet(root / state.result()["table"]).equals(table)
    # the cache is the step directories alone: Prefect keeps no results of its own
    assert not (root / ".prefect-results").exists()

    # the artifacts root copied elsewhere (another worker, a container): still every task a cache hit
    copy = tmp_path / "mounted-elsewhere"
    shutil.copytree(root, copy)
    state, states = _run(cfg.model_copy(update={"artifacts_dir": str(copy)}))
    assert state.is_completed() and _recomputed(states) == set()
    assert pd.read_parquet(copy / state.result()["table"]).equals(table)

    # a changed domain corpus reruns what depends on it; the base model's general eval stays cached.
    # (Every abstract changes, at its start: an arm whose few steps never draw a changed row trains to
    # the same weights, and text past chunk_len is cut; either way nothing below would change.)
    df = pd.read_csv(domain_file)
    df["summaries"] = "Sparse attention for graphs. " + df["summaries"]
    df.to_csv(domain_file, index=False)
    _, states = _run(cfg)
    assert _recomputed(states) == {"fingerprint-domain", "tokenize-domain", "eval-base-domain", "train-full",
                                   "train-replay", "train-lora", "write-results",
                                   *(f"eval-{a}-{s}" for a in ("full", "replay", "lora") for s in ("domain", "general"))}

    # only LoRA settings changed: only the LoRA arm and its evaluations rerun
    _, states = _run(cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 2})}))
    assert _recomputed(states) == {"train-lora", "eval-lora-domain", "eval-lora-general", "write-results"}


def test_benchmark_tasks_run_on_the_base_and_every_arm_as_cached_steps(study_config, mc_task):
    cfg = study_config(arms=["full", "lora"], benchmarks={"tasks": [str(mc_task)], "batch_size": 4})
    state, states = _run(cfg)
    assert state.is_completed()
    bench = {f"task-{a}-tiny_mc" for a in ("base", "full", "lora")}
    assert {name: states.get(name) for name in bench} == dict.fromkeys(bench, "Completed")
    root, results = Path(cfg.artifacts_dir), state.result()
    table = pd.read_parquet(root / results["table"]).set_index("arm")
    assert table.loc[["full", "lora"], "task_forgetting_pts"].notna().all()
    assert table.loc[["full", "lora"], "task_tiny_mc_score"].between(0, 100).all()
    tasks = pd.read_parquet(root / results["tasks"])
    assert sorted(tasks.arm) == ["base", "full", "lora"] and set(tasks.task) == {"tiny_mc"}
    report = (root / results["report"]).read_text()
    assert "## Benchmark tasks (lm-evaluation-harness)" in report and "tiny_mc (acc_norm, 0-shot, n=6)" in report
    assert "Δ tasks, points" in (root / results["table"]).with_name("table.md").read_text()
    with get_client(sync_client=True) as client:
        assert "ftstudy-tasks" in {a.key for a in client.read_artifacts()}
    state, states = _run(cfg)  # the same study again: every step, the tasks too, a cache hit
    assert state.is_completed() and _recomputed(states) == set()


SWEEP = [{"name": "replay-25", "replay_ratio": 0.25}, {"name": "lora-r2", "method": "lora", "lora": {"r": 2}}]


def test_arms_and_seeds_are_data_each_with_its_own_cache_key(study_config):
    cfg = study_config(arms=SWEEP, seeds=[0, 1])
    state, states = _run(cfg)
    assert state.is_completed()
    names = ("replay-25", "lora-r2")
    assert {n for n in states if n.startswith("train-")} == {f"train-{a}-s{s}" for a in names for s in (0, 1)}
    assert {f"eval-{a}-s{s}-{w}" for a in names for s in (0, 1) for w in ("domain", "general")} <= set(states)
    root = Path(cfg.artifacts_dir)
    results = state.result()
    table = pd.read_parquet(root / results["table"])
    assert table.arm.tolist() == ["base", *names] and table.seeds.tolist() == [0, 2, 2]
    runs = pd.read_parquet(root / results["runs"]).set_index(["arm", "seed"])
    assert len(runs) == 5 and runs.loc[("lora-r2", 0), "domain_ppl"] != runs.loc[("lora-r2", 1), "domain_ppl"]
    assert table.set_index("arm").loc["lora-r2", "domain_change_pct"] == pytest.approx(
        runs.loc["lora-r2", "domain_change_pct"].mean())
    docs = pd.read_parquet(root / results["general_docs"])
    assert set(docs.arm) == set(names) and docs.groupby(["arm", "seed"]).size().nunique() == 1
    report = (root / results["report"]).read_text()
    assert "## Every seed" in report and "## Where forgetting happens" in report

    # One more arm and one more seed: only the new branches train; the four finished ones are cache hits.
    more = study_config(arms=[*SWEEP, "full"], seeds=[0, 1, 2])
    _, states = _run(more)
    assert {n for n in _recomputed(states) if n.startswith("train-")} == {
        "train-replay-25-s2", "train-lora-r2-s2", "train-full-s0", "train-full-s1", "train-full-s2"}


def test_failing_arms_fail_alone_with_their_own_error(study_config):
    """One arm cannot create its directory (a file is in the way), one diverges (a LoRA scale of
    alpha/r = 2.5e39 overflows fp32: the first loss is NaN); both fail in their own process, with their
    own error in the report, and the full arm finishes and is evaluated."""
    cfg = study_config(arms=["full", {"name": "blocked", "method": "lora"},
                             {"name": "diverging", "method": "lora", "lora": {"alpha": 10**40}}])
    Path(cfg.artifacts_dir).mkdir(parents=True)
    (Path(cfg.artifacts_dir) / "train-blocked").write_text("a file where the arm's directory goes")
    state, states = _run(cfg)
    assert state.is_failed()
    assert states["train-blocked"] == "Failed" and states["train-diverging"] == "Failed"
    assert states["train-full"] == "Completed" and states["eval-full-general"] == "Completed"
    report = json.loads((Path(cfg.artifacts_dir) / "latest.json").read_text())["report"]
    text = (Path(cfg.artifacts_dir) / report).read_text()
    assert "FAILED arm blocked" in text and "train-blocked" in text
    assert "NonFiniteLossError: training diverged: loss nan at step 1" in text
    assert "| full |" in text and "| blocked |" not in text and "| diverging |" not in text


def test_work_pool_executor_without_its_deployment_fails_before_any_work(study_config):
    cfg = study_config(executor="work-pool")
    state, states = _run(cfg)
    assert state.is_failed()
    assert "train_deployment: no deployment 'ftstudy-train-arm/train-arm'" in state.message
    assert not states  # no task ran
    assert not (Path(cfg.artifacts_dir) / "fetch-model").exists()


def test_corpus_check_emits_only_after_a_recorded_study_and_not_while_one_runs_or_a_stale_one_is_ended(study_config, corpus_files, tmp_path):
    import shutil

    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelled, Cancelling, Running, Scheduled

    from deployments.serve import end_orphaned_runs
    from flows.corpus_check import corpus_check_flow
    from ftcore import inputs

    domain = Path(shutil.copy(corpus_files["domain"], tmp_path / "papers.csv"))
    cfg = study_config(domain={"path": str(domain)})
    # A fresh server: no study of these corpora succeeded yet, so there is nothing to re-run.
    result = corpus_check_flow(config=cfg)
    assert result["recorded"] is False and not result["changed"] and "event_id" not in result
    inputs.record_corpus_versions(inputs.resolve_paths(cfg), inputs.corpus_versions(inputs.resolve_paths(cfg)))
    domain.write_text(domain.read_text() + "A new title,A new abstract about sparse kernels.\n")
    with get_client(sync_client=True) as client:
        pending = client.create_flow_run(study_flow, parameters={"config": cfg.model_dump(mode="json")}, state=Scheduled())
        result = corpus_check_flow(config=cfg)  # changed, but a study of the same corpora is on its way
        assert result["in_progress"] == str(pending.id) and "event_id" not in result
        client.set_flow_run_state(pending.id, Cancelled(), force=True)
        # A study a stopped service left Running (and one left Cancelling) blocks the check until the service's
        # next start ends them (deployments.serve.end_orphaned_runs); finished runs are left as they are.
        stale = client.create_flow_run(study_flow, parameters={"config": cfg.model_dump(mode="json")}, state=Running())
        stuck = client.create_flow_run(study_flow, parameters={"config": cfg.model_dump(mode="json")}, state=Running())
        client.set_flow_run_state(stuck.id, Cancelling(), force=True)
        assert corpus_check_flow(config=cfg)["in_progress"] == str(stale.id)
        ended = end_orphaned_runs(PREFECT_API_URL.value(), "stopped")
        assert {stale.name, stuck.name} <= set(ended)
        assert client.read_flow_run(stale.id).state.type == StateType.CRASHED
        assert client.read_flow_run(stuck.id).state.type == StateType.CANCELLED
        assert "Retry" in client.read_flow_run(stale.id).state.message
        assert client.read_flow_run(pending.id).state.type == StateType.CANCELLED  # untouched
        assert end_orphaned_runs(PREFECT_API_URL.value(), "stopped") == []
    result = corpus_check_flow(config=cfg)
    assert set(result["changed"]) == {"domain"} and result.get("event_id")


def test_a_bad_form_fails_first_with_the_message_alone(study_config, corpus_files):
    """What the UI's form cannot express (duplicate arm names, a missing file) fails the run at once,
    with the field-named message and nothing else; runs of the same config are told apart by name."""
    data = study_config().model_dump(mode="json")
    state, states = _run({**data, "arms": ["full", "full"]})
    assert state.is_failed() and not states
    assert state.message.startswith("invalid config:") and "arms has duplicate names" in state.message
    state, states = _run({**data, "domain": {**data["domain"], "path": "/no/such/file.csv"}})
    assert state.is_failed() and not states and "domain.path: file /no/such/file.csv does not exist" in state.message
    with get_client(sync_client=True) as client:
        names = [r.name for r in client.read_flow_runs(limit=200) if r.name.startswith("study-smoke-")]
    assert len(names) == len(set(names)) >= 2


def test_a_study_over_its_forgetting_budget_ends_over_budget_and_exits_3(study_config, monkeypatch, capsys):
    """The gate's wiring: the flow ends Failed, named Over budget, with the verdict; the CLI exits 3 and
    prints the table; a study within its budget completes and exits 0. (The verdict itself: test_gate.)"""
    from flows import cli
    from ftcore import gate

    cfg = study_config(arms=["full"], forgetting_budget_pct=50, gate=["all"])
    root = Path(cfg.artifacts_dir)
    state, _ = _run(cfg)
    table = pd.read_parquet(root / json.loads((root / "latest.json").read_text())["table"]).set_index("arm")
    assert table.loc["full", "general_change_pct"] <= 50  # a tiny model's general change is far from +50%
    assert state.is_completed() and cli.finish(state, cfg, root) == cli.EXIT_OK
    assert "gate: within budget: full" in capsys.readouterr().out

    over, within = gate.Verdict(("full: general perplexity +60.0% [+55.0, +65.0]",), "over budget: full: ..."), gate.verdict
    monkeypatch.setattr(gate, "verdict", lambda *args: over)
    state, states = _run(cfg)
    assert set(states.values()) == {"Cached"}  # the gate re-reads the results; it recomputes nothing
    assert state.is_failed() and state.name == "Over budget" and state.message == over.line
    assert cli.finish(state, cfg, root) == gate.EXIT_OVER_BUDGET == 3
    out = capsys.readouterr()
    assert "| full |" in out.out and "gate: over budget: full" in out.err
    # `ftstudy run` of a study whose every step is recorded reads it back without a flow run: the same verdict
    from ftcore import inputs

    recorded = cli._recorded(inputs.check_inputs(cfg))
    assert recorded is not None and cli.finish_recorded(recorded, cfg, root) == gate.EXIT_OVER_BUDGET
    out = capsys.readouterr()
    assert "| full |" in out.out and "gate: over budget: full" in out.err
    monkeypatch.setattr(gate, "verdict", within)
    assert cli.finish_recorded(recorded, cfg, root) == cli.EXIT_OK
    assert "gate: within budget: full" in capsys.readouterr().out
