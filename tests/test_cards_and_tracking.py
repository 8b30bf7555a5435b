"""Every trained arm gets a Hugging Face model card with the table's numbers; the study goes to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ftcore import study


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, corpus_files, mc_task):
    """One small study (full and LoRA, two seeds, a local benchmark task), logged to an MLflow file store."""
    import mlflow

    from ftcore.config_files import load_config

    root = tmp_path_factory.mktemp("study")
    # MLflow's local store (a SQLite file; its older file store is deprecated), artifacts beside it.
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.create_experiment("ftstudy-smoke", artifact_location=(root / "mlruns").as_uri())
    cfg = load_config(
        "smoke", model={"source": "local", "name": str(tiny_model)},
        domain={"source": "file", "path": str(corpus_files["domain"]), "text_fields": ["titles", "summaries"],
                "max_docs": None},
        general={"source": "file", "path": str(corpus_files["general"]), "file_format": "text", "max_docs": None},
        replay={"source": "file", "path": str(corpus_files["replay"]), "max_docs": None},
        test_docs=8, chunk_len=96, format={"prompt_template": "Title: {prompt}\nAbstract: "},
        arms=["full", "lora"], seeds=[0, 1], report_to=["tensorboard", "mlflow"], artifacts_dir=str(root / "a"),
        forgetting_budget_pct=5.0, eval={"curve_tokens": 300, "every_steps": None},
        benchmarks={"tasks": [str(mc_task)], "batch_size": 6})
    results = study.run_study(cfg)
    return cfg, Path(cfg.artifacts_dir), results


def test_every_arm_has_a_model_card_with_the_tables_numbers(finished):
    from huggingface_hub import ModelCard

    cfg, root, results = finished
    table = pd.read_parquet(root / results["table"]).set_index("arm")
    cards = sorted((root / results["report"]).parent.glob("cards/*.md"))
    assert [c.stem for c in cards] == ["full-s0", "full-s1", "lora-s0", "lora-s1"]
    for arm, folder, library in (("full", "model", "transformers"), ("lora", "adapter", "peft")):
        beside = sorted(root.glob(f"train-{arm}/*/{folder}/README.md"))
        assert len(beside) == 2  # one per seed, next to the weights a user pushes
        card = ModelCard.load(beside[0])
        assert card.data.library_name == library and "ftstudy" in card.data.tags
        row = table.loc[arm]
        for s in ("domain", "general"):
            assert f"{row[f'{s}_change_pct']:+.1f}% (95% CI {row[f'{s}_change_ci_low']:+.1f} to " \
                   f"{row[f'{s}_change_ci_high']:+.1f})" in card.text
        assert ("PeftModel.from_pretrained" in card.text) == (arm == "lora")
        assert str(root.parent) not in card.text  # corpora by file name, not this machine's paths


def test_a_qlora_arms_card_is_an_adapters_card_loaded_on_the_4bit_base(finished):
    from huggingface_hub import ModelCard

    from ftcore import cards
    from ftcore.results import TrainedArm

    cfg, root, results = finished
    table, runs = pd.read_parquet(root / results["table"]), pd.read_parquet(root / results["runs"])
    arm = TrainedArm(label="lora", arm="lora", method="qlora", seed=0, digest="d", dir="train-lora/k", key="k", summary={})
    text = cards.model_card(cfg, arm, table, runs, None)
    card = ModelCard(text)
    assert card.data.library_name == "peft" and "qlora" in card.data.tags
    assert "A QLoRA adapter" in text and "BitsAndBytesConfig(load_in_4bit=True" in text
    assert "PeftModel.from_pretrained" in text and '"lora.r"' in text


def test_the_study_is_a_parent_run_and_each_arm_and_seed_a_child(finished):
    import mlflow

    cfg, root, results = finished
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(f"ftstudy-{cfg.name}")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("ftstudy.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["train-full-s0", "train-full-s1", "train-lora-s0", "train-lora-s1"]
    table = pd.read_parquet(root / results["table"]).set_index("arm")
    assert parent.data.metrics["lora.general_change_pct"] == pytest.approx(table.loc["lora", "general_change_pct"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table.parquet", "report.md", "frontier.png", "config.yaml", "cards"} <= artifacts
    lora = next(r for r in children if r.info.run_name == "train-lora-s1")
    assert lora.data.params["lora.r"] == str(cfg.lora.r) and lora.data.params["seed"] == "1"
    losses = client.get_metric_history(lora.info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, cfg.train.max_steps + 1))
    assert "domain_ppl" in lora.data.metrics and "general_bpb" in lora.data.metrics
    assert lora.data.metrics["general_kl_to_base"] > 0
    curve = client.get_metric_history(lora.info.run_id, "curve_general_ppl")
    assert [m.step for m in curve] == list(range(0, cfg.train.max_steps + 1))  # about 10 points: every step of 6
    assert {"curves.png", "path.png"} <= artifacts
    # the benchmark task: its score and change per arm, the task forgetting, its table and frontier
    assert parent.data.metrics["lora.task_forgetting_pts"] == pytest.approx(table.loc["lora", "task_forgetting_pts"])
    assert "full.task_tiny_mc_score" in parent.data.metrics and {"tasks.parquet", "task_frontier.png"} <= artifacts
    # a cached rerun logs nothing new
    study.run_study(cfg)
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)


def test_the_report_has_the_curves_the_budget_and_the_kl(finished):
    cfg, root, results = finished
    report = (root / results["report"]).read_text()
    assert "## Forgetting along training" in report and "![curves](curves.png)" in report and "![path](path.png)" in report
    assert "Forgetting budget: general perplexity at most +5%" in report
    table = pd.read_parquet(root / results["table"]).set_index("arm")
    runs = pd.read_parquet(root / results["runs"])
    for arm in ("full", "lora"):
        per_seed = runs[runs.arm == arm]["general_kl"]
        assert (per_seed > 0).all() and table.loc[arm, "general_kl"] == pytest.approx(per_seed.mean())
        assert table.loc[arm, "general_kl_ci_low"] <= table.loc[arm, "general_kl"] <= table.loc[arm, "general_kl_ci_high"]
    assert "KL(base‖arm) general" in (root / results["table"]).with_name("table.md").read_text()
    assert table.loc["base", "general_kl"] == 0.0
    for summary in root.glob("train-*/*/train_summary.json"):  # at most the best step's weights stay
        budget = json.loads(summary.read_text())["budget"]
        kept = sorted(p.name for p in (summary.parent / "within-budget").glob("step-*"))
        assert kept == ([f"step-{budget['best_step']}"] if budget["best_weights"] else [])
