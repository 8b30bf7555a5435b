"""The ftstudy-gpu work pool's Kubernetes job template renders, with prefect-kubernetes' own code, to a
Job manifest that gives each arm its GPUs, the shared artifacts volume and the Hugging Face cache."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

pytest.importorskip("prefect_kubernetes")

TEMPLATE = Path(__file__).resolve().parent.parent / "deployments" / "kubernetes-gpu-job-template.json"


def _render(values):
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="train-full-s0-abc"))
    return config.job_manifest


def test_the_job_template_renders_to_a_gpu_job_with_the_shared_volumes(prefect_server):
    manifest = _render({"image": "registry.example/ftstudy:1", "gpus_per_arm": 2})
    default = _render({})
    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/ftstudy:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["args"] == ["prefect", "flow-run", "execute"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["artifacts"] == "/artifacts" and volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == "ftstudy-artifacts"
    assert mounts["hf-cache"] == "/cache/huggingface" and "persistentVolumeClaim" in volumes["hf-cache"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FTSTUDY_ARTIFACTS_DIR"] == mounts["artifacts"] and env["HF_HOME"] == mounts["hf-cache"]
    assert "HF_HUB_OFFLINE" in env and "PREFECT__FLOW_RUN_ID" in env
    # the defaults: one GPU per arm, the image built by the Dockerfile
    container = default["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["image"] == "ftstudy:latest"


def test_every_variable_the_template_uses_is_declared():
    import re

    template = json.loads(TEMPLATE.read_text())
    used = set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"])
