"""Config validation names the field; presets hold the seed recipe's values; overrides parse."""

import pytest
from pydantic import ValidationError

from ftcore.config import ArmSpec, ConfigError, StudyConfig
from ftcore.config_files import describe_error, load_config, parse_override
from ftcore.presets import PRESETS


def _error_fields(exc: ValidationError) -> list[str]:
    return [".".join(map(str, e["loc"])) for e in exc.errors()]


@pytest.mark.parametrize(
    "override, field",
    [
        ({"train": {"learning_rate": -1}}, "train.learning_rate"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"replay_ratio": 1.0}, "replay_ratio"),
        ({"replay_ratio": -0.1}, "replay_ratio"),
        ({"arms": ["full", "dpo"]}, "arms.1"),
        ({"chunk_len": 2}, "chunk_len"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"domain": {"source": "ftp", "path": "x"}}, "domain.source"),
        ({"eval": {"precision": "fp8"}}, "eval.precision"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ValidationError) as info:
        load_config("smoke", **override)
    assert field in _error_fields(info.value)
    assert field in describe_error(info.value)


def test_cross_field_errors_say_what_is_wrong():
    with pytest.raises(ValidationError, match="replay .*not set"):
        load_config("smoke", replay=None)
    with pytest.raises(ValidationError, match="duplicate names"):
        load_config("smoke", arms=["full", "full"])
    with pytest.raises(ValidationError, match="'full' and 'again' train the same thing"):
        load_config("smoke", arms=["full", {"name": "again"}])
    with pytest.raises(ValidationError, match="'lora' and 'lora-r4' train the same thing"):  # r=4 is the study's
        load_config("smoke", arms=["lora", {"name": "lora-r4", "method": "lora", "lora": {"r": 4}}])
    with pytest.raises(ValidationError, match="arm 'x': lora settings given but method is 'full'"):
        load_config("smoke", arms=[{"name": "x", "lora": {"r": 2}}])
    with pytest.raises(ValidationError, match="arm.s. r5 mix in replay text but replay .* is not set"):
        load_config("smoke", replay=None, arms=[{"name": "r5", "replay_ratio": 0.05}])
    with pytest.raises(ValidationError, match="seeds has duplicates"):
        load_config("smoke", seeds=[1, 1])
    with pytest.raises(ValidationError, match="stride"):
        load_config("smoke", eval={"stride": 10_000})
    with pytest.raises(ValidationError, match="prompt_template"):
        load_config("smoke", format={"prompt_template": "no slot"})
    with pytest.raises(ValidationError, match="train.grad_accum 8 is not a multiple of train.devices_per_arm 3"):
        load_config("smoke", train={"grad_accum": 8, "devices_per_arm": 3})
    with pytest.raises(ValidationError, match="fsdp shards an arm across its processes and train.devices_per_arm is 1"):
        load_config("smoke", train={"distributed": "fsdp"})
    with pytest.raises(ValidationError, match="fsdp with curves .* is not supported"):
        load_config("smoke", train={"grad_accum": 2, "devices_per_arm": 2, "distributed": "fsdp"})
    # FSDP shards the full arms only; its settings are written out, LoRA arms keep DDP
    from ftcore.training import fsdp_settings

    sharded = load_config("smoke", train={"grad_accum": 2, "devices_per_arm": 2, "distributed": "fsdp"},
                          eval={"every_steps": 0}).train
    assert fsdp_settings(sharded, "full")["fsdp_config"] | {} == {
        "version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False, "cpu_offload": False,
        "activation_checkpointing": False}
    assert fsdp_settings(sharded, "lora") == {} == fsdp_settings(sharded.model_copy(update={"devices_per_arm": 1}), "full")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="demo.*seed.*smoke"):
        load_config("nope")


def test_seed_preset_holds_the_reference_recipe():
    cfg = load_config("seed")
    assert cfg.model.name == "gpt2-medium" and cfg.model.source == "hub"
    assert (cfg.general.path, cfg.general.subset, cfg.general.split) == ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
    assert cfg.replay.subset == "wikitext-103-raw-v1" and cfg.replay.split == "train"
    assert cfg.domain.max_docs == 10000 and cfg.test_docs == 1000
    assert cfg.chunk_len == 512
    t = cfg.train
    assert (t.batch_size, t.grad_accum, t.learning_rate, t.epochs, t.logging_steps) == (4, 8, 5e-5, 2, 50)
    assert cfg.replay_ratio == 0.1 and cfg.arm_names == ["full", "replay", "lora"]
    assert cfg.format.kind == "instruction"


def test_presets_validate_and_are_frozen():
    for name in PRESETS:
        cfg = load_config(name)
        assert isinstance(cfg, StudyConfig)
    with pytest.raises(ValidationError):
        cfg.chunk_len = 3


def test_arms_are_data():
    cfg = load_config("smoke", arms=["full", "replay", {"name": "replay-25", "replay_ratio": 0.25},
                                     {"name": "lora-r2", "method": "lora", "lora": {"r": 2}}, "lora"],
                      lora={"learning_rate": 0.005}, replay_ratio=0.05)
    assert cfg.arm_names == ["full", "replay", "replay-25", "lora-r2", "lora"]
    arm = dict(zip(cfg.arm_names, cfg.arms))
    # Shorthands are expanded once, when the config is validated: every entry is a spec afterwards.
    assert all(isinstance(a, ArmSpec) for a in cfg.arms)
    assert arm["replay"].replay_ratio == 0.05 and arm["replay"].method == "full"
    # An arm's LoRA settings change only the fields it names; the rest come from the study's `lora`.
    lora_r2 = cfg.lora_of(arm["lora-r2"])
    assert (lora_r2.r, lora_r2.alpha, lora_r2.learning_rate) == (2, 8, 0.005)
    assert cfg.lora_of(arm["lora"]).r == 4
    # The dumped config (what a deployment receives) validates to the same arms.
    assert StudyConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_the_reference_arm_is_a_field():
    assert load_config("smoke").reference == "full"
    assert load_config("smoke", arms=["lora", "replay"]).reference == "lora"  # no arm named full: the first
    assert load_config("smoke", reference_arm="replay").reference == "replay"
    with pytest.raises(ValidationError, match="reference_arm 'nope' is not one of the arms"):
        load_config("smoke", reference_arm="nope")


def test_presets_are_small_overrides_of_the_defaults():
    from ftcore import presets

    # The seed recipe is the defaults: its preset names only the data and the tasks (Biderman et al. 2024's three).
    assert set(presets.SEED) == {"name", "domain", "general", "replay", "benchmarks"}
    assert [t.task for t in load_config("seed").benchmarks.tasks] == ["hellaswag", "arc_challenge", "winogrande"]
    assert {t.num_fewshot for t in load_config("seed").benchmarks.tasks} == {0}
    assert all(len(p) <= 16 for p in presets.PRESETS.values())


def test_seeds_replace_train_seed_per_run():
    cfg = load_config("smoke", seeds=[3, 4])
    assert cfg.run_seeds == (3, 4)
    assert cfg.run_label("full", 4) == "full-s4" and load_config("smoke").run_label("full", 0) == "full"
    assert load_config("smoke").run_seeds == (0,)


def test_overrides_are_dotted_and_json_typed():
    assert parse_override("train.learning_rate=1e-4") == {"train": {"learning_rate": 1e-4}}
    assert parse_override('arms=["full"]') == {"arms": ["full"]}
    assert parse_override("name=my study") == {"name": "my study"}
    cfg = load_config("smoke", ["train.max_steps=3", 'arms=["lora"]'])
    assert cfg.train.max_steps == 3 and cfg.arm_names == ["lora"]
    with pytest.raises(ConfigError, match="field=value"):
        parse_override("train.max_steps")


def test_schema_documents_every_field():
    schema = StudyConfig.model_json_schema()
    missing = [name for name, prop in schema["properties"].items() if "description" not in prop]
    assert not missing
    for sub in ("TrainSpec", "LoraSpec", "EvalSpec", "CorpusSpec", "FormatSpec", "ModelSpec"):
        props = schema["$defs"][sub]["properties"]
        assert all("description" in p for p in props.values()), sub


def test_readme_config_reference_is_generated():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from readme import CONFIG_DOC, section

    from ftcore.config_files import config_reference

    assert section(CONFIG_DOC.read_text(), "config").strip() == config_reference().strip(), (
        "docs/configuration.md's config reference is stale: run `python tools/readme.py`")


def test_demo_reads_shared_data_when_present_else_the_hub(monkeypatch, tmp_path):
    import shutil

    from ftcore import presets

    for name in presets.DATA_FILES:
        (tmp_path / "shared-data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(presets.data_dir() / name, tmp_path / "shared-data" / name)
    monkeypatch.setenv("FTSTUDY_DATA", str(tmp_path / "shared-data"))
    cfg = load_config("demo")
    assert cfg.domain.source == "file" and cfg.domain.path.startswith(str(tmp_path / "shared-data"))
    monkeypatch.setenv("FTSTUDY_DATA", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"the smoke preset reads the offline corpora .* set FTSTUDY_DATA"):
        load_config("smoke")
    cfg = load_config("demo")
    assert (cfg.domain.source, cfg.domain.path, cfg.format.completion_field) == ("hub", "CShorten/ML-ArXiv-Papers", "abstract")
    assert cfg.general.subset == "wikitext-2-raw-v1" and cfg.replay.subset == "wikitext-103-raw-v1"


# --- config files ---------------------------------------------------------------------------------

def test_init_writes_every_field_and_reads_back_to_the_same_config(tmp_path):
    from ftcore.config_files import EXAMPLE_CORPORA, config_yaml

    for name in [None, *PRESETS]:
        cfg = load_config(name) if name else StudyConfig.model_validate(EXAMPLE_CORPORA)
        path = tmp_path / f"{name}.yaml"
        path.write_text(config_yaml(cfg if name else None))
        assert load_config(None, config_file=path) == cfg, name
    text = config_yaml(load_config("demo"))
    for field in ("train.learning_rate", "lora.target_modules", "eval.max_general_tokens", "report_to"):
        leaf = field.split(".")[-1]
        assert f"{leaf}:" in text, field
    assert "# Peak learning rate of the full fine-tune arms." in text  # each field under its description


def test_a_config_file_in_yaml_or_json_under_preset_and_set(tmp_path):
    import json

    yaml_file = tmp_path / "study.yaml"
    yaml_file.write_text("name: mine\ntrain:\n  max_steps: 5\nlora: {r: 2}\n")
    json_file = tmp_path / "study.json"
    json_file.write_text(json.dumps({"name": "mine", "train": {"max_steps": 5}, "lora": {"r": 2}}))
    for path in (yaml_file, json_file):
        # the order: defaults < preset < file < --set; nested fields merge
        cfg = load_config("smoke", ["train.max_steps=7"], config_file=path)
        assert (cfg.name, cfg.train.max_steps, cfg.lora.r) == ("mine", 7, 2)
        assert cfg.train.learning_rate == load_config("smoke").train.learning_rate  # the preset's, kept
        assert cfg.lora.alpha == load_config("smoke").lora.alpha


def test_bad_config_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist"):
        load_config(None, config_file=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML or JSON at line 3"):
        load_config(None, config_file=bad)
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(None, config_file=bad)
    bad.write_text("name: x\ntrain: {learning_rate: -1}\n")
    with pytest.raises(ValidationError) as info:
        load_config("smoke", config_file=bad)
    assert "train.learning_rate" in describe_error(info.value)
    trailing = tmp_path / "study.json"  # YAML reads this; JSON tools do not, so neither does ftstudy
    trailing.write_text('{"name": "x",\n "seeds": [0, 1],\n}\n')
    with pytest.raises(ConfigError, match=r"study.json is not valid JSON at line 3, column 1"):
        load_config(None, config_file=trailing)


def test_messages_suggest_the_field_and_how_to_quote():
    with pytest.raises(ValidationError) as info:
        load_config("smoke", ["train.learning_rat=1e-4", "learning_rate=1", "model.revision=1234567"])
    text = describe_error(info.value)
    assert "train.learning_rat: not a field; did you mean 'train.learning_rate'?" in text
    assert "learning_rate: not a field; did you mean 'train.learning_rate'?" in text
    assert "model.revision: Input should be a valid string (got the number 1234567" in text
    with pytest.raises(ConfigError, match="looks like a JSON list or object but does not parse"):
        parse_override("lora.target_modules=[q_proj,v_proj]")
    with pytest.raises(ValidationError) as info:
        load_config("smoke", arms=["full", "full"])
    assert describe_error(info.value) == "config: arms has duplicate names: ['full', 'full']"


def test_an_arm_left_unnamed_is_named_after_its_method_and_settings():
    """The UI form's Arms -> Add item with Name left blank submits; the arm gets a readable name."""
    cfg = load_config("smoke", arms=["full", {"name": "", "method": "lora", "lora": {"r": 2}},
                                     {"method": "full", "replay_ratio": 0.05}, {"method": "lora", "learning_rate": 3e-4},
                                     {"method": "lora", "learning_rate": [1e-4, 1e-3]}])
    assert cfg.arm_names == ["full", "lora-r2", "full-replay0.05", "lora-lr3e-4", "lora-lr1e-4", "lora-lr1e-3"]
    schema = StudyConfig.model_json_schema()["$defs"]["ArmSpec"]
    assert "name" not in schema.get("required", [])  # the form does not block Submit on it
    # An unnamed arm whose name another arm has is numbered (the form's default arm beside the preset's full).
    assert load_config("smoke", arms=["full", "lora", {"method": "lora", "lora": {"alpha": 4}}]).arm_names == [
        "full", "lora", "lora-2"]
    with pytest.raises(ValidationError, match="'full' and 'full-2' train the same thing"):
        load_config("smoke", arms=["full", {"name": ""}])
