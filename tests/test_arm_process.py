"""An arm's own process: what it prints reaches the user (warnings once), a waiting arm says for whom."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from ftcore import inputs, study
from tasks.arm_process import EventReader, train_in_subprocess
from ftcore.steps import run_step
from tasks.devices import device_slot
from tasks.heap import available_memory, give_back_when_short
from tasks.runner import train_in_own_process

REPO = Path(__file__).resolve().parent.parent


def test_the_childs_warnings_and_errors_are_forwarded_once():
    calls = []
    reader = EventReader(lambda level, msg: calls.append((level, msg)), on_progress=None)
    warning = '{"log": "WARNING", "name": "py.warnings", "msg": "UserWarning: fan_in_fan_out is set to False"}'
    for line in [warning, warning, '{"log": "INFO", "name": "ftcore.training", "msg": "step 1: loss 3.2"}',
                 '{"log": "INFO", "name": "transformers", "msg": "chatty"}', "some raw print",
                 "RuntimeWarning: raw warning from C", '{"log": "ERROR", "name": "ftcore.arm", "msg": "arm failed: X",'
                 ' "error": "ValueError: bad", "traceback": "Traceback...\\nValueError: bad"}']:
        reader.read(line)
    assert calls == [(logging.WARNING, "py.warnings: UserWarning: fan_in_fan_out is set to False"),
                     (logging.INFO, "step 1: loss 3.2"),
                     (logging.WARNING, "RuntimeWarning: raw warning from C"),
                     (logging.ERROR, "arm failed: X")]
    assert reader.error == "ValueError: bad" and "some raw print" in reader.tail


@pytest.mark.slow
def test_a_real_arm_process_reports_a_library_warning_and_its_progress(study_config, tiny_models):
    """LoRA on GPT-2's Conv1D layers: peft switches fan_in_fan_out on and warns; the user sees it once. The
    deprecation transformers raises while TRL wraps the model (`is_gradient_checkpointing`) is not shown at all."""
    prepared = study.prepare(study_config(model={"source": "local", "name": str(tiny_models["gpt2"])},
                                          arms=["lora"], train={"max_steps": 2}))
    plan = study.plan_arms(prepared)[0]
    logs, progress = [], []
    result = train_in_own_process(study.train(plan, prepared.root), lambda level, msg: logs.append((level, msg)),
                                  on_progress=progress.append)
    assert result.summary["steps"] == 2 and [p["step"] for p in progress] == [1, 2]
    fan_in = [m for level, m in logs if level == logging.WARNING and "fan_in_fan_out" in m]
    assert len(fan_in) == 1, logs
    assert not [m for _, m in logs if "is_gradient_checkpointing" in m], logs


@pytest.mark.parametrize("method, imported", [("full", "False False"), ("lora", "False False"), ("qlora", "True True")])
def test_only_a_qlora_arm_process_imports_bitsandbytes(method, imported):
    """What an arm's process sees after hide_unused_libraries: peft's own check and the module itself."""
    code = ("import sys; from tasks.arm_worker import hide_unused_libraries; hide_unused_libraries([sys.argv[1]]); "
            "from peft.import_utils import is_bnb_available; "
            "print(is_bnb_available(), sys.modules.get('bitsandbytes') is not None)")
    out = subprocess.run([sys.executable, "-c", code, method], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split("\n")[-2] == imported, out.stderr[-2000:]


@pytest.mark.parametrize("run_id, method, imported", [("", "lora", "True"), ("x", "lora", "False"), ("x", "qlora", "True")],
                         ids=["in-process", "flow-run-process", "flow-run-process-qlora"])
def test_a_flow_run_process_hides_bitsandbytes_unless_an_arm_is_qlora(run_id, method, imported):
    """A served study's flow-run process (PREFECT__FLOW_RUN_ID set) imports what its arms need; a process that runs
    flows in-process keeps every library for a QLoRA study that may follow."""
    code = ("import json, os, sys; from ftcore.config_files import load_config; "
            "from flows.study import hide_unused_libraries_in_own_process as hide; "
            "hide(load_config('smoke', ['arms=[\"full\", {\"name\": \"a\", \"method\": ' + json.dumps(sys.argv[1]) + '}]'])); "
            "from peft.import_utils import is_bnb_available; print(is_bnb_available())")
    out = subprocess.run([sys.executable, "-c", code, method], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PREFECT__FLOW_RUN_ID": run_id})
    assert out.returncode == 0 and out.stdout.split("\n")[-2] == imported, out.stderr[-2000:]


def test_a_qlora_arm_trains_in_its_own_process(study_config, tiny_model_wide):
    pytest.importorskip("bitsandbytes")
    prepared = study.prepare(study_config(model={"source": "local", "name": str(tiny_model_wide)},
                                          arms=[{"name": "qlora", "method": "qlora"}], train={"max_steps": 2}))
    result = train_in_own_process(study.train(study.plan_arms(prepared)[0], prepared.root), lambda level, msg: None)
    assert result.summary["steps"] == 2 and (prepared.root / result.dir / "adapter").is_dir()


def test_a_failing_arm_process_raises_with_its_own_error(study_config):
    prepared = study.prepare(study_config(arms=["lora"]))
    plan = study.plan_arms(prepared)[0]
    (Path(prepared.cfg.artifacts_dir) / "train-lora").write_text("a file where the arm's directory goes")
    with pytest.raises(RuntimeError, match=r"^arm lora failed \(exit code 1\): \w+Error: .*train-lora"):
        train_in_subprocess(plan, prepared.cfg.artifacts_dir, lambda level, msg: None)


def test_a_waiting_step_says_who_holds_the_device(monkeypatch, tmp_path):
    monkeypatch.setenv("FTSTUDY_SLOTS_DIR", str(tmp_path))
    messages = []
    with device_slot(slots=1, label="train-full"):
        waiter = threading.Thread(target=lambda: device_slot(slots=1, label="eval-base-domain", log=messages.append,
                                                             poll=0.05, report_every=0.2).__enter__())
        waiter.start()
        time.sleep(0.7)
    waiter.join(5)
    waiting = [m for m in messages if "waiting for a device slot" in m]
    assert len(waiting) >= 2  # at once, then every report_every seconds
    assert "eval-base-domain: waiting" in waiting[0] and "slot 0: train-full (pid" in waiting[0]
    assert "eval-base-domain: got device slot 0" in messages[-1]


def test_evaluations_get_the_slot_before_trainings_then_in_the_order_they_waited(monkeypatch, tmp_path):
    """One slot: a study's base is scored before its arms train and an arm's evaluations follow its training (seen:
    the base's general evaluation waited 36 minutes behind three arms); steps of one kind go in the order they began
    waiting."""
    from tasks.devices import EVALUATION, TRAINING

    monkeypatch.setenv("FTSTUDY_SLOTS_DIR", str(tmp_path))
    order = []

    def step(label, priority):
        with device_slot(slots=1, label=label, poll=0.02, priority=priority):
            order.append(label)
            time.sleep(0.05)

    waiters = [threading.Thread(target=step, args=args) for args in [
        ("train-replay", TRAINING), ("train-lora", TRAINING), ("eval-base-general", EVALUATION),
        ("eval-full-domain", EVALUATION)]]
    with device_slot(slots=1, label="train-full", priority=TRAINING):
        for waiter in waiters:
            waiter.start()
            time.sleep(0.1)  # each begins waiting after the one before
    for waiter in waiters:
        waiter.join(10)
    assert order == ["eval-base-general", "eval-full-domain", "train-replay", "train-lora"]


def _train_log(root, result) -> list[tuple[int, float]]:
    import json

    lines = (Path(root) / result.dir / "train_log.jsonl").read_text().splitlines()
    return [(e["step"], e["loss"]) for e in map(json.loads, lines) if "loss" in e]


@pytest.mark.slow
def test_an_arm_on_two_processes_trains_as_one_and_resumes_after_a_kill(study_config, monkeypatch):
    """train.devices_per_arm=2: two processes (torchrun, gloo) at the same global batch (2 x 4) draw one process's
    loss curve; killed right after its checkpoint at step 2, the arm resumes there and ends on the same curve."""
    def plan(devices):
        cfg = study_config(arms=["full"], eval={"every_steps": 0},
                           train={"batch_size": 2, "grad_accum": 4, "max_steps": 4, "logging_steps": 1,
                                  "save_steps": 2, "devices_per_arm": devices})
        prepared = study.prepare(inputs.check_inputs(cfg))
        return study.train(study.plan_arms(prepared)[0], prepared.root), prepared.cfg.artifacts_dir

    one, root = plan(1)
    single = train_in_own_process(one, lambda level, msg: None)
    two, root = plan(2)
    monkeypatch.setenv("FTSTUDY_CRASH_AT", "after-checkpoint-2")
    with pytest.raises(RuntimeError, match="arm full failed"):
        train_in_own_process(two, lambda level, msg: None)
    monkeypatch.delenv("FTSTUDY_CRASH_AT")
    logs = []
    resumed = train_in_own_process(two, lambda level, msg: logs.append(msg))
    assert any("2 processes, DDP (gloo), each accumulating 2 micro-batch(es) of 2 rows" in m for m in logs), logs
    assert resumed.summary["resumed_from_step"] == 2 and resumed.summary["steps"] == 4
    expected, got = _train_log(root, single), _train_log(root, resumed)
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3, 4]
    # Tolerance: the two processes sum their gradients in another order (float32): 1e-5 relative.
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    assert (Path(root) / resumed.dir / "model" / "model.safetensors").is_file()


def test_fsdp_on_a_cpu_is_refused_before_any_work(study_config):
    """accelerate shards only across GPUs: on a CPU FSDP would silently run as DDP."""
    from ftcore.config import InputError

    cfg = study_config(arms=["full"], eval={"every_steps": 0}, device="cpu",
                       train={"grad_accum": 2, "devices_per_arm": 2, "distributed": "fsdp"})
    with pytest.raises(InputError, match="train.distributed fsdp shards a model across GPUs"):
        inputs.check_inputs(cfg)
    lora_only = study_config(arms=["lora"], eval={"every_steps": 0}, device="cpu",
                             train={"grad_accum": 2, "devices_per_arm": 2, "distributed": "fsdp"})
    inputs.check_inputs(lora_only)  # LoRA arms train with DDP: nothing to shard, nothing to refuse


def test_an_arm_on_two_devices_holds_two_slots_or_none(monkeypatch, tmp_path):
    """All or nothing: with one of two slots taken, a two-device arm waits holding none, then takes both."""
    from tasks.devices import device_slots

    monkeypatch.setenv("FTSTUDY_SLOTS_DIR", str(tmp_path))
    got = []
    with device_slot(slots=2, label="eval-base-domain"):
        waiter = threading.Thread(target=lambda: got.append(device_slots(2, slots=2, label="train-full",
                                                                         poll=0.05).__enter__()))
        waiter.start()
        time.sleep(0.3)
        assert not got
        with device_slot(slots=2, label="eval-other", poll=0.05) as other:  # the free slot was not kept by the waiter
            assert other == 1
    waiter.join(timeout=5)
    assert got == [[0, 1]]
    with pytest.raises(ValueError, match="needs 4 devices .*train.devices_per_arm.* this machine has 2"):
        device_slots(4, slots=2, label="train-full").__enter__()


def test_no_arm_starts_after_the_study_was_stopped(study_config):
    """A task that gets its device slot after Ctrl-C / SIGTERM must not start its arm (seen: a study killed
    with SIGTERM started the next arm while it shut down)."""
    from tasks import arm_process

    prepared = study.prepare(study_config(arms=["lora"]))
    plan = study.plan_arms(prepared)[0]
    try:
        assert arm_process.stop_arms() == 0
        with pytest.raises(RuntimeError, match="arm lora not started: the study is stopping"):
            train_in_subprocess(plan, prepared.cfg.artifacts_dir, lambda level, msg: None)
    finally:
        arm_process.STOPPING.clear()


def test_a_lora_only_study_with_fsdp_trains_with_ddp_on_a_cpu(monkeypatch):
    """fsdp shards full arms only: a LoRA arm's training settings on a CPU carry no FSDP and no CPU refusal
    (a fresh user's LoRA-only fsdp study failed in the arm); a full arm's are refused there."""
    from ftcore import training
    from ftcore.config import InputError, TrainSpec

    # SFTConfig itself needs the torchrun process group when devices_per_arm > 1: capture its arguments.
    monkeypatch.setattr(training, "SFTConfig", lambda **kwargs: kwargs)
    train = TrainSpec(grad_accum=2, devices_per_arm=2, distributed="fsdp")
    args = training.sft_config(train, 1e-4, 64, "fp32", "cpu", Path("/tmp/unused"), (), method="lora")
    assert "fsdp" not in args and args["gradient_accumulation_steps"] == 1 and args["ddp_backend"] == "gloo"
    with pytest.raises(InputError, match="train.distributed fsdp shards a model across GPUs"):
        training.sft_config(train, 1e-4, 64, "fp32", "cpu", Path("/tmp/unused"), (), method="full")


def test_an_arm_on_n_devices_outside_torchrun_is_refused(study_config):
    """In one process, devices_per_arm 2 would halve the global batch silently: refused before any work."""
    from ftcore.config import InputError

    cfg = inputs.check_inputs(study_config(arms=["full"], train={"grad_accum": 2, "devices_per_arm": 2}))
    with pytest.raises(InputError, match="train.devices_per_arm 2: arms trained in this process"):
        study.run_study(cfg)


def test_a_step_waiting_for_a_device_gives_up_when_the_study_stops(monkeypatch, tmp_path):
    """After Ctrl-C or SIGTERM a step still waiting for a device slot (held by another study, say) starts
    nothing and ends: the process must not wait for the slot forever (seen: a SIGTERMed run that never exited)."""
    from tasks.devices import StoppedError, device_slots

    monkeypatch.setenv("FTSTUDY_SLOTS_DIR", str(tmp_path))
    stop, errors = threading.Event(), []

    def wait():
        try:
            with device_slots(1, slots=1, label="eval-base-domain", poll=0.05, stop=stop):
                errors.append("started")
        except StoppedError as exc:
            errors.append(str(exc))

    with device_slot(slots=1, label="another study's arm"):
        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.2)
        stop.set()
        waiter.join(5)
    assert errors == ["eval-base-domain: not started: the study is stopping"]
    # The slot comes free as the study stops (seen: a waiting evaluation took it after SIGTERM and scored for
    # minutes): it starts nothing either.
    errors.clear()
    wait()
    assert errors == ["eval-base-domain: not started: the study is stopping"]


def test_an_arm_on_more_gpus_than_the_machine_has_is_refused_before_any_work(study_config, monkeypatch):
    """The door counts this machine's GPUs when the arms train here (executor subprocess), before it writes
    anything (the count was once asked of a function that did not exist: a GPU user's study crashed there)."""
    import torch

    from ftcore.config import InputError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = study_config(arms=["full"], device="cuda", train={"grad_accum": 2, "devices_per_arm": 2})
    with pytest.raises(InputError, match=r"train.devices_per_arm 2: this machine has 1 GPU\(s\)"):
        inputs.check_inputs(cfg)
    assert not Path(cfg.artifacts_dir).exists()


def _trained_bytes(arm_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(arm_dir)): p.read_bytes() for p in sorted(arm_dir.rglob("*.safetensors"))}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_forked_arm_trains_as_an_arm_started_afresh(study_config, tmp_path, monkeypatch, method):
    """The arm fork server changes when an arm's process starts, not what it computes: the same arm, forked
    and started afresh, logs the same losses and writes the same weights, bit for bit."""
    from tasks import arm_process

    kinds, logs, weights = [], {}, {}
    start = arm_process.start_arm
    monkeypatch.setattr(arm_process, "start_arm", lambda *a: kinds.append(type(p := start(*a)).__name__) or p)
    for fork in ("1", "0"):
        monkeypatch.setenv("FTSTUDY_FORK_ARMS", fork)
        prepared = study.prepare(study_config(arms=[method], train={"max_steps": 2},
                                              artifacts_dir=str(tmp_path / f"fork-{fork}")))
        plan = study.plan_arms(prepared)[0]
        train_in_subprocess(plan, prepared.cfg.artifacts_dir, lambda level, msg: None)
        arm_dir = prepared.root / plan.dir
        logs[fork] = [{k: v for k, v in json.loads(line).items() if k != "time" and "runtime" not in k and "per_second" not in k}
                      for line in (arm_dir / "train_log.jsonl").read_text().splitlines()]
        weights[fork] = _trained_bytes(arm_dir)
    assert kinds == ["ForkedArm", "Popen"]
    assert logs["1"] == logs["0"] and len(logs["1"]) >= 2
    assert weights["1"] and weights["1"] == weights["0"]


def test_an_arm_is_started_afresh_where_forking_could_change_it(study_config, monkeypatch):
    """On GPUs, for QLoRA (the fork server hides bitsandbytes), on several processes, or while a forked arm runs
    in a server whose environment the libraries read at import differs from this process's, an arm's process
    starts afresh; where no forked arm runs, the server is restarted in the new environment instead."""
    from tasks import arm_process

    plan = study.plan_arms(study.prepare(study_config(arms=["full"])))[0]
    stopped = []
    monkeypatch.setattr(arm_process, "_stop_fork_server", lambda: stopped.append(1) or True)
    monkeypatch.setattr(arm_process, "_fork_environ", None)
    assert arm_process.forkable(plan, None)
    monkeypatch.setenv("FTSTUDY_SLOTS_DIR", "/elsewhere")  # read when used: no matter
    assert arm_process.forkable(plan, None) and not stopped
    assert not arm_process.forkable(plan, "0")
    assert not arm_process.forkable(plan.model_copy(update={"method": "qlora"}), None)
    assert not arm_process.forkable(plan.model_copy(update={"train": plan.train.model_copy(update={"devices_per_arm": 2})}), None)
    monkeypatch.setenv("HF_HOME", "/elsewhere/hf")  # huggingface_hub reads it at import: a new server
    assert arm_process.forkable(plan, None) and stopped == [1]
    assert arm_process._fork_environ["HF_HOME"] == "/elsewhere/hf"
    monkeypatch.setattr(arm_process, "_stop_fork_server", lambda: False)  # a forked arm still runs
    monkeypatch.setenv("HF_HOME", "/elsewhere/hf2")
    assert not arm_process.forkable(plan, None)
    monkeypatch.setattr(arm_process, "_fork_environ", None)
    for off in ("0", "false", "No"):
        monkeypatch.setenv("FTSTUDY_FORK_ARMS", off)
        assert not arm_process.forkable(plan, None)
    monkeypatch.setenv("FTSTUDY_FORK_ARMS", " ")  # empty: the default
    assert arm_process.forkable(plan, None)
    monkeypatch.setenv("FTSTUDY_FORK_ARMS", "maybe")
    with pytest.raises(ValueError, match=r"FTSTUDY_FORK_ARMS='maybe': set it to 0 .* or 1"):
        arm_process.forkable(plan, None)


def _fork_server_hf_home() -> str:
    """huggingface_hub's HF_HOME as the fork server imported it (a setting read at import), seen by a forked child."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    read, write = ctx.Pipe(duplex=False)
    child = ctx.Process(target=exec, args=("import huggingface_hub.constants as c; conn.send(c.HF_HOME)", {"conn": write}))
    child.start()
    write.close()
    home = read.recv()
    child.join()
    return home


def test_the_fork_server_restarts_in_a_changed_environment(study_config, monkeypatch):
    """After the environment changed (HF_HOME), the next forked arm forks from a new server whose libraries read
    the new environment at import, as a fresh process's would."""
    from tasks import arm_process

    plan = study.plan_arms(study.prepare(study_config(arms=["full"])))[0]
    for home in ("/elsewhere/hf-a", "/elsewhere/hf-b"):
        monkeypatch.setenv("HF_HOME", home)
        assert arm_process.forkable(plan, None)
        assert _fork_server_hf_home() == home


def _fork_servers() -> list[int]:
    return [c.pid for c in psutil.Process().children() if "multiprocessing.forkserver" in " ".join(c.cmdline())]


def test_the_fork_server_starts_before_the_first_fork_where_arms_fork(study_config, monkeypatch):
    """prestart_fork_server starts the server (in this process's environment) before any arm is forked, so its
    imports overlap the wait for a device slot; the next fork uses that server. Not for an arm that starts afresh."""
    from tasks import arm_process

    plan = study.plan_arms(study.prepare(study_config(arms=["full"])))[0]
    assert not arm_process.prestart_fork_server(plan, "0")  # on a GPU
    assert not arm_process.prestart_fork_server(plan.model_copy(update={"method": "qlora"}), None)
    monkeypatch.setenv("HF_HOME", "/elsewhere/hf-prestarted")  # a new server, started now
    assert arm_process.prestart_fork_server(plan, None)
    (server,) = _fork_servers()
    assert _fork_server_hf_home() == "/elsewhere/hf-prestarted"
    assert _fork_servers() == [server]


def test_an_arm_whose_directory_cannot_be_made_fails_before_its_fork_server_starts(study_config, monkeypatch):
    """A file where the arm's directory goes: the run fails at once, before the fork server's imports (seconds of
    a core) start, which would outlive the failure (the process waits for them at exit)."""
    from tasks import runner

    prepared = study.prepare(study_config(arms=["full"]))
    step = study.train(study.plan_arms(prepared)[0], prepared.root)
    step.dir.parent.parent.mkdir(parents=True, exist_ok=True)
    step.dir.parent.write_text("in the way")
    started = []
    monkeypatch.setattr(runner, "prestart_fork_server", lambda *args: started.append(args))
    with pytest.raises(FileExistsError):
        runner.train_here(step)
    assert started == []


def test_an_arm_run_created_while_the_study_stops_is_cancelled(study_config, monkeypatch):
    """The stop came while a task created its arm's run on the work pool, so cancel_pool_arms did not see that run:
    the task cancels it as soon as it has it, and forgets it when it ends."""
    import prefect.deployments

    from tasks import arm_process, runner

    prepared = study.prepare(study_config(arms=["full"]))
    step = study.train(study.plan_arms(prepared)[0], prepared.root)

    class Run:
        id, name, state = "run-1", "train-full-x", None

    def creating(*args, **kwargs):
        arm_process.STOPPING.set()  # the study stops while the run is being created
        return Run()

    cancelled = []
    monkeypatch.setattr(prefect.deployments, "run_deployment", creating)
    monkeypatch.setattr(runner, "cancel_pool_arms", lambda: cancelled.append(set(runner.POOL_RUNS)))
    monkeypatch.setattr(runner, "wait_for_run", lambda run_id: Run())
    try:
        with pytest.raises(RuntimeError, match="ended unknown"):
            runner.train_on_work_pool(step, "ftstudy-train-arm/train-arm")
    finally:
        arm_process.STOPPING.clear()
    assert cancelled == [{"run-1"}]
    assert not runner.POOL_RUNS


def test_waiting_for_an_arm_run_gives_up_a_while_after_the_study_stops(monkeypatch):
    """A cancelled arm run whose worker is gone never ends: the stopped study's task stops waiting STOP_WAIT_S after
    the stop (its process waits for the task before it exits); before a stop it waits as long as the run runs."""
    import prefect.client.orchestration as orchestration

    from tasks import arm_process, runner

    reads = []

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read_flow_run(self, run_id):
            reads.append(run_id)
            if len(reads) == 2:
                arm_process.STOPPING.set()  # the study stops while its arm's run is still running
            return type("Run", (), {"state": type("Running", (), {"is_final": lambda self: False})()})()

    monkeypatch.setattr(orchestration, "get_client", lambda **kwargs: Client())
    monkeypatch.setattr(runner, "STOP_WAIT_S", 0.5)
    try:
        run = runner.wait_for_run("run-1")
    finally:
        arm_process.STOPPING.clear()
    assert not run.state.is_final()
    assert 3 <= len(reads) <= 4  # read each second: twice before the stop, then until 0.5 s after it


def test_a_study_starts_the_fork_server_at_its_start_where_its_arms_fork(study_config, monkeypatch):
    """prestart_for_study starts the server when the study begins (its imports overlap the fetch, tokenizing and
    the base's evaluations), not for arms on a work pool or QLoRA arms alone; torch writing its default inductor
    cache directory into the environment meanwhile (it does on first use) keeps that server for the first arm."""
    from tasks import arm_process

    assert not arm_process.prestart_for_study(study_config(arms=["full"], executor="work-pool"))
    qlora = {"name": "qlora", "method": "qlora"}
    assert not arm_process.prestart_for_study(study_config(arms=[qlora]))
    monkeypatch.setenv("HF_HOME", "/elsewhere/hf-study")  # a new server, started now
    assert arm_process.prestart_for_study(study_config(arms=[qlora, "lora"]))
    (server,) = _fork_servers()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_elsewhere")
    plan = study.plan_arms(study.prepare(study_config(arms=["lora"])))[0]
    assert arm_process.forkable(plan, None)
    assert _fork_servers() == [server] and _fork_server_hf_home() == "/elsewhere/hf-study"


FROZEN_IMPORTS = """
import gc
from tasks.heap import frozen_imports
full = []
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and full.append(1))
before = gc.get_freeze_count()
with frozen_imports():
    import torch, transformers  # about 300k objects: without the pause, a full collection at every quarter grown
print(len(full), gc.get_freeze_count() - before > 100_000, gc.isenabled())
try:
    with frozen_imports():
        raise ImportError("no such library")
except ImportError:
    print(gc.isenabled())
"""


def test_heavy_imports_run_without_full_collections_and_stay_frozen():
    """tasks.heap.frozen_imports: no full garbage collection while the block imports (each would scan every object
    imported so far), the imported objects frozen afterwards, the collector enabled again, also after an error."""
    out = subprocess.run([sys.executable, "-c", FROZEN_IMPORTS], cwd=Path(__file__).parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == ["0", "True", "True", "True"], out.stdout + out.stderr


FROZEN_WHEN_TRAINING = """
import gc, sys
if sys.argv[1] == "fork-server":  # the server's preload, which every arm forked from it inherits
    import tasks.arm_libraries
    print(gc.get_freeze_count())
    sys.exit()
from ftcore import training
import tasks.arm_worker as worker
training.train_arm = lambda plan, root, **kw: print(gc.get_freeze_count())
worker.ArmPlan.model_validate_json = lambda data: type("Plan", (), {"method": "full", "device": "cpu"})()
worker.main("/nonexistent", "{}")
"""


@pytest.mark.parametrize("where", ["afresh", "fork-server"])
def test_an_arm_trains_with_the_libraries_objects_frozen_out_of_garbage_collection(where):
    """An arm's process freezes the libraries' objects (gc.freeze) before it trains, started afresh or forked from the
    fork server: the Trainer's gc.collect() at the end of training then skips them (0.31 s a time with them)."""
    out = subprocess.run([sys.executable, "-c", FROZEN_WHEN_TRAINING, where], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=120)
    frozen = [int(line) for line in out.stdout.split() if line.isdigit()]
    assert frozen and frozen[-1] > 100_000, out.stdout + out.stderr


MALLOC_PROBE = """
import ctypes, resource
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]

def mapped():  # whether glibc serves 64 MiB with a mapping of its own (returned to the kernel when freed)
    before = libc.mallinfo2().hblks
    block = libc.malloc(64 << 20)
    after = libc.mallinfo2().hblks
    libc.free(block)
    return after > before

def faults():  # page faults of three more rounds of 64 MiB written and freed, after a first
    ctypes.memset(block := libc.malloc(64 << 20), 1, 64 << 20)
    libc.free(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        ctypes.memset(block := libc.malloc(64 << 20), 1, 64 << 20)
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""


def test_keep_freed_memory_makes_glibc_reuse_freed_pages_instead_of_faulting_them_in_again():
    """tasks.heap.keep_freed_memory on a CPU: a 64-MiB block is no longer a mapping of its own, and writing one again
    after freeing it faults no page in (16,384 faults a round before: a fault per 4 KiB). For a GPU, nothing changes."""
    probe = MALLOC_PROBE + """
from tasks.heap import keep_freed_memory
print(mapped(), faults() > 3 * 16_000)
print(keep_freed_memory("cuda"), mapped())  # a GPU's process: its host memory is given back as before
print(keep_freed_memory("cpu"))
print(mapped(), faults() < 1_000)
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["True", "True", "False", "True", "True", "False", "True"], out.stdout + out.stderr


@pytest.mark.parametrize("device, answer", [
    ("cpu", "mapped False <class 'tasks.heap.give_back_when_short.<locals>.GiveBackWhenShort'>"),
    ("cuda", "mapped True\n"),  # a GPU's arm: its host memory given back as glibc does, and no callback
])
def test_an_arm_trains_with_freed_memory_kept_on_a_cpu(device, answer):
    """An arm's process (tasks.arm_worker.main, afresh or forked from the fork server) on a CPU keeps freed memory
    before it trains (each step's tensors reuse the last one's pages: demo-base's training 1.18x as fast) and trains
    with the callback that gives it back when memory runs short; on a GPU, neither."""
    probe = MALLOC_PROBE + f"""
from ftcore import training
import tasks.arm_worker as worker
training.train_arm = lambda plan, root, callbacks=None, **kw: print("mapped", mapped(), *map(type, callbacks or []))
worker.ArmPlan.model_validate_json = lambda data: type("Plan", (), {{"method": "full", "device": "{device}"}})()
worker.resolve_device = lambda device: device  # as resolved on a machine with that device
worker.main("/nonexistent", "{{}}")
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         timeout=120)
    assert answer in out.stdout, out.stdout + out.stderr


def test_freed_memory_kept_is_given_back_to_the_kernel_on_demand():
    """tasks.heap.give_back_freed_memory: with freed memory kept, a freed 256-MiB block stays resident; given back, the
    process's resident memory falls by about its size, though the block is not the heap's top."""
    probe = MALLOC_PROBE + """
from tasks.heap import give_back_freed_memory, keep_freed_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
keep_freed_memory("cpu")
ctypes.memset(block := libc.malloc(256 << 20), 1, 256 << 20)
above = libc.malloc(1 << 10)  # live above it
written = rss()
libc.free(block)
kept = rss()
print(written - kept < 16 << 20, give_back_freed_memory(), kept - rss() > 240 << 20)
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr


def test_an_arm_gives_its_freed_memory_back_whenever_the_machine_runs_short(study_config, caplog):
    """tasks.heap.give_back_when_short, in a real arm's training (a curve point every step, a checkpoint every 2 of 4
    steps): with memory plenty, nothing is given back; short (under an eighth available), after each optimizer
    step, each step's end (after its curve point) and each checkpoint; the first time logged, and at the end how
    often."""
    prepared = study.prepare(study_config(arms=["full"], train={"max_steps": 4, "save_steps": 2, "logging_steps": 1},
                                          eval={"every_steps": 1, "curve_tokens": 300}))
    plan = study.plan_arms(prepared)[0]
    memory, given = [(4e9, 24e9)], []
    callback = give_back_when_short(memory=lambda: memory[0], give_back=lambda: given.append(1) or True)
    run_step(study.train(plan, prepared.root, callbacks=[callback]))
    assert given == []
    memory[0] = (2.9e9, 24e9)
    shutil.rmtree(Path(prepared.root) / plan.dir)
    with caplog.at_level(logging.INFO, logger="ftcore.arm"):
        run_step(study.train(plan, prepared.root, callbacks=[callback]))
    assert len(given) == 4 + 4 + 1  # checkpoint at step 2 (none at the last step)
    assert [r.getMessage()[:41] for r in caplog.records if r.name == "ftcore.arm"] == [
        "memory short (2.9 of 24.0 GB available): ", "memory was short 9 time(s) by step 4; eac"]


AVAILABLE, TOTAL = 6_000_000 * 1024, 24_000_000 * 1024  # the fake machine's /proc/meminfo, in bytes


V1_UNLIMITED = "9223372036854771712"  # what cgroup v1 reports where no limit is set


@pytest.mark.parametrize("cgroup, levels, answer", [
    (None, {}, (AVAILABLE, TOTAL)),  # no cgroup file: the machine's
    ("0::/ftstudy.slice", {"ftstudy.slice": {"memory.max": "8000000000", "memory.current": "7000000000"}},
     (1e9, 8e9)),  # v2, limited
    # v2, limited, 0.5 GB of its usage inactive file cache (reclaimable): 1.5 GB of headroom
    ("0::/ftstudy.slice", {"ftstudy.slice": {"memory.max": "8000000000", "memory.current": "7000000000",
                                             "memory.stat": "anon 6000000000\ninactive_file 500000000\n"}},
     (1.5e9, 8e9)),
    ("0::/ftstudy.slice", {"ftstudy.slice": {"memory.max": "max", "memory.current": "7000000000"}},
     (AVAILABLE, TOTAL)),  # v2, no limit
    # v2, the limit on a parent (a slice's, a pod's), the process's own cgroup unlimited
    ("0::/job/step/task", {"job/step/task": {"memory.max": "max", "memory.current": "1000000000"},
                           "job/step": {"memory.max": "max", "memory.current": "7000000000"},
                           "job": {"memory.max": "8000000000", "memory.current": "7900000000"}}, (1e8, 8e9)),
    # v2, two limits: the one with less headroom
    ("0::/a/b", {"a/b": {"memory.max": "6000000000", "memory.current": "1000000000"},
                 "a": {"memory.max": "10000000000", "memory.current": "9000000000"}}, (1e9, 10e9)),
    # v1: the machine's available memory is less than the headroom under the limit
    ("4:memory:/docker/abc", {"docker/abc": {"memory.limit_in_bytes": "12000000000",
                                             "memory.usage_in_bytes": "2000000000"}}, (AVAILABLE, 12e9)),
    ("4:memory:/docker/abc", {"docker/abc": {"memory.limit_in_bytes": "12000000000",
                                             "memory.usage_in_bytes": "11000000000",
                                             "memory.stat": "cache 3000000000\ntotal_inactive_file 2000000000\n"}},
     (3e9, 12e9)),
    # v1, the process's own cgroup unlimited, its parent limited
    ("4:memory:/user/job", {"user/job": {"memory.limit_in_bytes": V1_UNLIMITED, "memory.usage_in_bytes": "1"},
                            "user": {"memory.limit_in_bytes": "4000000000", "memory.usage_in_bytes": "3500000000"}},
     (5e8, 4e9)),
    # v1 without a cgroup namespace: the process's path is not under the mount; its top holds the limit
    ("4:memory:/docker/abc", {"": {"memory.limit_in_bytes": "5000000000", "memory.usage_in_bytes": "4000000000"}},
     (1e9, 5e9)),
], ids=["machine", "v2", "v2-file-cache", "v2-unlimited", "v2-parent", "v2-least-headroom", "v1", "v1-file-cache",
        "v1-parent", "v1-top"])
def test_available_memory_is_the_machines_or_the_headroom_under_a_cgroup_limit(tmp_path, cgroup, levels, answer):
    """tasks.heap.available_memory: a limit on the process's cgroup or any above it, its working set (usage less the
    inactive file cache) against it; the machine's where no level is limited below the machine's memory."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 24000000 kB\nMemFree: 1000 kB\nMemAvailable: 6000000 kB\n")
    if cgroup:
        (proc / "self" / "cgroup").write_text(f"9:pids:/\nnot a cgroup line\n{cgroup}\n")
        top = cgroups / "memory" if cgroup.split(":")[1] else cgroups
        for level, files in levels.items():
            (top / level).mkdir(parents=True, exist_ok=True)
            for name, value in files.items():
                (top / level / name).write_text(value + "\n")
    assert available_memory(proc, cgroups) == answer
    assert available_memory(tmp_path / "nothing", cgroups) is None


HAS_CUDA = ("import sys; from tasks.devices import device_count, has_cuda; "
            "print(has_cuda(), device_count(), 'torch' in sys.modules)")


@pytest.mark.parametrize("build, answer", [
    ('cuda = None\nhip = None', "False 1 False"),  # a CPU build: torch is not imported (its __init__ would fail)
    ('cuda = "12.4"\nhip = None', "True 2 True"),  # built for CUDA: torch is asked
    ('cuda = None\nhip = "6.2"', "True 2 True"),  # built for ROCm (torch.cuda too)
], ids=["cpu-build", "cuda-build", "rocm-build"])
def test_whether_arms_get_gpus_is_known_without_importing_a_cpu_build_of_torch(tmp_path, build, answer):
    """has_cuda and device_count: a work-pool arm's run starts its fork server before anything else where the arm
    forks and takes its device slot, which a CPU build of torch (torch/version.py) tells without torch's import
    (about 1.6 s of one core); any other build asks torch."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "version.py").write_text(build + "\n")
    (fake / "__init__.py").write_text("import types\nif __import__('torch.version').version.cuda is None and "
                                      "__import__('torch.version').version.hip is None:\n"
                                      "    raise ImportError('a CPU build was imported')\n"
                                      "cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])}
    out = subprocess.run([sys.executable, "-c", HAS_CUDA], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == answer.split(), out.stderr


def test_this_machines_torch_agrees_with_has_cuda():
    import torch

    out = subprocess.run([sys.executable, "-c", HAS_CUDA], capture_output=True, text=True, timeout=120, check=True)
    gpu_build = bool(torch.version.cuda or torch.version.hip)
    assert out.stdout.split() == [str(torch.cuda.is_available()), str(torch.cuda.device_count() or 1), str(gpu_build)]


KILLED_STUDY = """
import sys, time
from pathlib import Path
from ftcore.plan import ArmPlan
from tasks.arm_process import start_arm
plan = ArmPlan.model_validate_json(Path(sys.argv[1]).read_text())
proc = start_arm(plan, Path(sys.argv[2]), None)
print(type(proc).__name__, proc.pid, flush=True)
for line in proc.stdout:
    if '"progress"' in line:
        print("training", flush=True)
        time.sleep(600)
"""


def test_a_forked_arm_dies_with_the_study_process_even_by_sigkill(study_config, tmp_path):
    """A forked arm's parent is the fork server, not the study: the lifeline pipe takes it down when the study's
    process is killed, so a killed run leaves no orphan training (as PR_SET_PDEATHSIG does for a fresh one)."""
    import os
    import signal

    prepared = study.prepare(study_config(arms=["full"], train={"max_steps": 500}))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(study.plan_arms(prepared)[0].model_dump_json())
    script = subprocess.Popen([sys.executable, "-c", KILLED_STUDY, str(plan_file), str(prepared.root)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        kind, pid = script.stdout.readline().split()
        assert kind == "ForkedArm"
        assert script.stdout.readline().strip() == "training"
        os.kill(script.pid, signal.SIGKILL)
        script.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(int(pid)):
            time.sleep(0.1)
        assert not _alive(int(pid)), "the forked arm outlived its study's process"
    finally:
        script.kill()


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed and not yet reaped by the fork server, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


CTRL_C_IN_PYTHON = """
import os, signal, sys, time
from ftcore import training
def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the arm runs Python code: KeyboardInterrupt at once
    time.sleep(30)
training.train_arm = interrupted
from tasks.arm_worker import main
sys.exit(main(sys.argv[1]))
"""


def test_ctrl_c_in_an_arm_ends_it_by_sigint_not_as_a_failure(study_config):
    """A terminal's Ctrl-C reaches the arm too. Raised as KeyboardInterrupt in Python code (a progress line being
    written, say) it must end the arm by SIGINT, which the study reports as a stopped arm, not with exit code 1 and a
    traceback (seen: the study's own stop arrived after it, and the run said the arm failed)."""
    import signal

    prepared = study.prepare(study_config(arms=["full"]))
    plan = study.plan_arms(prepared)[0]
    out = subprocess.run([sys.executable, "-c", CTRL_C_IN_PYTHON, str(prepared.root)], input=plan.model_dump_json(),
                         capture_output=True, text=True, cwd=REPO, timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    assert out.returncode == -signal.SIGINT, out.stdout[-2000:] + out.stderr[-2000:]
    assert "arm failed" not in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_an_arm_started_while_the_study_stops_is_stopped(study_config, monkeypatch):
    """The stop came while the arm's process was being started (a fork waits for the fork server's imports), so
    stop_arms saw no process: the arm is stopped as soon as it exists (seen: a SIGTERMed study waited 2 min 40 s for
    its arm to train to the end)."""
    from tasks import arm_process

    prepared = study.prepare(study_config(arms=["full"]))
    plan = study.plan_arms(prepared)[0]

    def starting(*args):
        arm_process.stop_arms()  # the stop arrives while the process starts
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)

    monkeypatch.setattr(arm_process, "start_arm", starting)
    started = time.monotonic()
    try:
        with pytest.raises(arm_process.ArmStopped, match="arm full stopped before it finished"):
            train_in_subprocess(plan, prepared.cfg.artifacts_dir, lambda level, msg: None)
    finally:
        arm_process.STOPPING.clear()
    assert time.monotonic() - started < 30


class _Terminated(BaseException):
    """What Prefect's SIGTERM handler raises in a flow run's main thread (its TerminationSignal) on cancellation."""


def test_an_arm_waited_for_in_an_interrupted_thread_is_stopped(study_config, monkeypatch):
    """A train-arm run waits for its arm in its main thread, where a cancellation's SIGTERM raises. The arm must
    stop then: the worker signals that process alone when its pool sets the flow-run command (ftstudy serve's do),
    and the process would otherwise wait at exit for its arm to train to the end (seen: 30 s, until the worker's
    SIGKILL)."""
    import signal

    from tasks import arm_process

    prepared = study.prepare(study_config(arms=["full"]))
    plan = study.plan_arms(prepared)[0]
    started = []

    def starting(*args):
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.PIPE,
                                        text=True))
        return started[-1]

    def terminated(*args):
        raise _Terminated

    monkeypatch.setattr(arm_process, "start_arm", starting)
    previous = signal.signal(signal.SIGALRM, terminated)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(_Terminated):
            train_in_subprocess(plan, prepared.cfg.artifacts_dir, lambda level, msg: None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        for proc in started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # not stopped: still sleeping
                proc.kill()
                proc.wait()
    assert started[0].returncode == -signal.SIGTERM
    assert not arm_process.LIVE


def test_ctrl_c_while_the_fork_server_imports_does_not_kill_it():
    """The fork server is in the terminal's process group and imports for seconds before Python's forkserver ignores
    SIGINT: a Ctrl-C then must not kill it (seen: a traceback, and the arm waiting for it failed with EOFError); the
    handler is given back for the arms it forks."""
    import signal

    code = ("import os, signal, threading; threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start(); "
            "import tasks.arm_libraries; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]
