"""deployments/prefect.yaml agrees with the code: entrypoints, the config it offers, the trigger's event."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from flows import corpus_check
from ftcore.config import SHARED_DATA, StudyConfig, load_config
from tasks.devices import visible_gpu

ROOT = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}


def test_every_entrypoint_is_a_flow_in_this_repo():
    assert set(DEPLOYMENTS) == {"study", "train-arm", "corpus-check"}
    for dep in DEPLOYMENTS.values():
        path, name = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(getattr(module, name), "deploy"), dep["entrypoint"]


def test_the_offered_config_is_the_demo_preset_with_arms_on_the_work_pool():
    data = DEPLOYMENTS["study"]["parameters"]["config"]
    for role in ("domain", "general", "replay"):  # relative to the repository root, where workers run
        data = {**data, role: {**data[role], "path": str(SHARED_DATA / data[role]["path"].removeprefix("../shared/data/"))}}
    assert StudyConfig.model_validate(data) == load_config("demo", executor="work-pool")
    assert DEPLOYMENTS["corpus-check"]["parameters"] == DEPLOYMENTS["study"]["parameters"]


def test_the_study_trigger_listens_to_what_the_corpus_check_emits():
    (trigger,) = DEPLOYMENTS["study"]["triggers"]
    assert trigger["expect"] == [corpus_check.EVENT]
    pattern = trigger["match"]["prefect.resource.id"]
    assert corpus_check.resource_id(load_config("smoke")).startswith(pattern.rstrip("*"))
    assert trigger["parameters"]["config"] == "{{ event.payload.config }}"


def test_arms_use_the_train_arm_deployment_on_the_gpu_pool():
    cfg = load_config("smoke")
    flow_name, deployment = cfg.train_deployment.split("/")
    assert deployment in DEPLOYMENTS and flow_name == "ftstudy-train-arm"
    assert DEPLOYMENTS["train-arm"]["work_pool"]["name"] == "ftstudy-gpu"


def test_a_slot_maps_to_the_workers_own_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert [visible_gpu(0), visible_gpu(1)] == ["4", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu(1) == "1"
