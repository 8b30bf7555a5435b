"""An arm's own process: what it prints reaches the user (warnings once), a waiting arm says for whom."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from ftcore import study
from tasks.arm_process import EventReader, train_in_subprocess
from tasks.devices import device_slot


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
    """LoRA on GPT-2's Conv1D layers: peft switches fan_in_fan_out on and warns; the user sees it once."""
    prepared = study.prepare(study_config(model={"source": "local", "name": str(tiny_models["gpt2"])},
                                          arms=["lora"], train={"max_steps": 2}))
    plan = study.plan_arms(prepared)[0]
    logs, progress = [], []
    result = train_in_subprocess(plan, prepared.cfg.artifacts_dir, lambda level, msg: logs.append((level, msg)),
                                 on_progress=progress.append)
    assert result["summary"]["steps"] == 2 and [p["step"] for p in progress] == [1, 2]
    fan_in = [m for level, m in logs if level == logging.WARNING and "fan_in_fan_out" in m]
    assert len(fan_in) == 1, logs


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
