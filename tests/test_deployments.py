"""`ftstudy deploy` registers what the code defines: a preset's config in the form, the trigger, the schedule."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate

from deployments.deploy import ARM_POOL, STUDY_POOL, default_config, deploy
from flows import corpus_check
from ftcore.config import ConfigError, StudyConfig
from ftcore.config_files import load_config
from tasks.devices import visible_gpu


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, prefect_server):
    artifacts = tmp_path_factory.mktemp("deployed") / "artifacts"
    with get_client(sync_client=True) as client:
        for pool in (STUDY_POOL, ARM_POOL):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        names = deploy("smoke", artifacts=artifacts)
        yield {"artifacts": artifacts, **{name: client.read_deployment_by_name(name) for name in names}}


def test_the_form_is_filled_from_the_preset_not_a_copy_of_it(deployed):
    from ftcore.inputs import resolve_paths

    study = deployed["ftstudy/study"]
    form = StudyConfig.model_validate(study.parameters["config"])
    # every path absolute: a worker in any directory reads the same corpora and writes the same root
    assert form == resolve_paths(load_config("smoke", executor="work-pool", artifacts_dir=str(deployed["artifacts"])))
    assert form.artifacts_dir == str(deployed["artifacts"]) and form.domain.path.startswith("/")
    assert study.parameter_openapi_schema["properties"]["config"]["$ref"].endswith("StudyConfig")
    assert deployed["ftstudy-corpus-check/corpus-check"].parameters == study.parameters
    with pytest.raises(ConfigError, match="unknown preset"):
        default_config("nope")


def test_pools_entrypoints_and_environment(deployed):
    assert deployed["ftstudy/study"].work_pool_name == STUDY_POOL
    assert deployed["ftstudy/study"].entrypoint == "flows/study.py:study_flow"
    arm = deployed["ftstudy-train-arm/train-arm"]
    assert arm.work_pool_name == ARM_POOL and arm.entrypoint == "flows/train_arm.py:train_arm_flow"
    assert arm.job_variables["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "ftcore"
    assert load_config("smoke").train_deployment == "ftstudy-train-arm/train-arm"


def test_the_study_trigger_listens_to_what_the_corpus_check_emits(deployed):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        automations = client.read_automations_by_name("ftstudy/study__automation_1") or client.read_automations()
    (trigger,) = [a.trigger for a in automations]
    assert set(trigger.expect) == {corpus_check.EVENT}
    pattern = trigger.match.model_dump()["prefect.resource.id"]
    assert corpus_check.resource_id(load_config("smoke")).startswith(str(pattern).strip("[]'\"").rstrip("*"))
    check = deployed["ftstudy-corpus-check/corpus-check"]
    assert [s.schedule.cron for s in check.schedules] == ["0 * * * *"]


def test_a_slot_maps_to_the_workers_own_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert [visible_gpu(0), visible_gpu(1)] == ["4", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu(1) == "1"


def test_a_port_a_stopped_server_left_in_time_wait_is_free_and_a_listening_one_is_not():
    """A restart right after Ctrl-C must bind the same port (seen: "port in use" for ~50 s while nothing listened)."""
    import socket

    from deployments.serve import port_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert not port_free("127.0.0.1", port)  # a listener
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
    server.close()
    client.close()
    assert port_free("127.0.0.1", port)


def test_every_other_preset_has_a_study_form_of_its_own(deployed):
    """The UI picks a preset by picking its deployment: ftstudy/demo-base's form holds demo-base's values."""
    from ftcore.inputs import resolve_paths

    assert {"ftstudy/demo", "ftstudy/demo-base", "ftstudy/demo-frontier"} <= set(deployed)
    assert "ftstudy/smoke" not in deployed  # the study deployment's own preset is ftstudy/study
    form = StudyConfig.model_validate(deployed["ftstudy/demo-base"].parameters["config"])
    assert form == resolve_paths(load_config("demo-base", executor="work-pool", artifacts_dir=str(deployed["artifacts"])))
    assert deployed["ftstudy/demo-base"].entrypoint == "flows/study.py:study_flow"
    assert not deployed["ftstudy/demo-base"].schedules  # only the corpus check is scheduled


def test_the_form_refuses_a_number_left_empty_instead_of_running_at_another_value():
    """A number field cleared in the UI (or given text) is dropped from the submitted config; it must be refused by
    the form's schema, not filled with the schema's default (the smoke form's lr 0.001 ran at 5e-5)."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    from flows.study import study_flow

    schema = parameter_schema(study_flow.fn).model_dump_for_openapi()
    params = {"config": default_config("smoke")}
    assert validate(params, schema, raise_on_error=True) == []  # the form as filled
    for section, field in (("train", "learning_rate"), ("eval", "batch_size"), (None, "chunk_len"),
                           ("train", "max_steps"), ("eval", "max_general_tokens")):  # numbers that may be null too
        cleared = {**params["config"]}
        if section:
            cleared[section] = {k: v for k, v in cleared[section].items() if k != field}
        else:
            cleared.pop(field)
        with pytest.raises(ValidationError, match=f"'{field}' is a required property"):
            validate({"config": cleared}, schema, raise_on_error=True)
    # An arm added in the form needs no number it has no field for: its entries stay optional.
    defs = schema["definitions"] if "definitions" in schema else schema["$defs"]
    assert not defs["ArmSpec"].get("required")
    # The form checks no range (Prefect's form drops minimum/maximum): the range is shown beside the field instead.
    train = defs["TrainSpec"]["properties"]
    assert train["learning_rate"]["description"].endswith("Allowed: > 0, < 1.")
    assert train["max_steps"]["description"].endswith("Allowed: > 0.")  # a number that may be null: its option's range
