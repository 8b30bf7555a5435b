"""Benchmark tasks through lm-evaluation-harness: scores against a hand computation, the paired analysis,
bad input refused before any training, a task failing at run time failing alone."""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import MC_QUESTIONS  # noqa: E402
from ftcore import models, study, task_forgetting  # noqa: E402
from ftcore.task_forgetting import BenchmarkError, TaskRef  # noqa: E402
from ftcore.config import BenchmarksSpec  # noqa: E402


_REGISTRY = task_forgetting._registry


@lru_cache(maxsize=1)
def registry():
    return _REGISTRY()  # lm-eval's task index, built once for this module (about 10 s)


def _resolve(cfg, tmp_path):
    return task_forgetting.resolve(cfg, tmp_path / "bench", registry=registry)


def _choice_loglikelihood(model, tok, context: str, choice: str) -> float:
    """log p(" " + choice | context), summed over the choice's tokens, by hand: the continuation's tokens are
    those of context + continuation after the context's own (lm-eval's _encode_pair)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_accuracy_equals_a_hand_computation_of_the_choices_loglikelihoods(study_config, mc_task, tiny_model, tmp_path):
    cfg = study_config(benchmarks={"tasks": [str(mc_task)], "batch_size": 3})
    (ref,) = _resolve(cfg, tmp_path)
    assert ref.name == "tiny_mc" and ref.metric == "acc_norm" and ref.examples == len(MC_QUESTIONS)
    model, tok = models.load_model(tiny_model).eval(), models.load_tokenizer(tiny_model)

    summary, table = task_forgetting.run_task(model, tok, ref, batch_size=3, seed=1234, autocast=contextlib.nullcontext(),
                                         label="test")
    acc, acc_norm = [], []
    for question, choices, label in MC_QUESTIONS:
        ll = np.array([_choice_loglikelihood(model, tok, question, c) for c in choices])
        acc.append(float(np.argmax(ll) == label))
        acc_norm.append(float(np.argmax(ll / np.array([len(c) for c in choices])) == label))
    assert table["value"].tolist() == acc_norm
    assert summary["score"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    # the other metric, through the config: the hand computation again
    acc_ref = ref.model_copy(update={"metric": "acc"})
    summary, table = task_forgetting.run_task(model, tok, acc_ref, 3, 1234, contextlib.nullcontext(), "test")
    assert table["value"].tolist() == acc and summary["score"] == pytest.approx(np.mean(acc), abs=1e-12)


def test_a_perplexity_task_on_the_general_documents_matches_lm_evals_own_aggregate(study_config, tiny_model, tmp_path):
    cfg = study_config(benchmarks={"tasks": [{"task": "wikitext", "corpus": "general"}]})
    documents = pd.DataFrame({"doc": [3, 4], "text": ["The city council met on tuesday.", "The river runs on."],
                              "whole": [True, False]})
    (ref,) = task_forgetting.resolve(cfg, tmp_path / "bench", general_documents=lambda: documents, registry=registry)
    assert ref.name == "wikitext_general" and ref.metric == "bits_per_byte" and ref.perplexity_like
    model, tok = models.load_model(tiny_model).eval(), models.load_tokenizer(tiny_model)
    summary, table = task_forgetting.run_task(model, tok, ref, 2, 1234, contextlib.nullcontext(), "test")
    assert table["ftstudy_doc"].tolist() == [3, 4] and table["ftstudy_whole"].tolist() == [True, False]
    # bytes of the original page, as lm-eval counts them; bits per byte from our table = lm-eval's aggregate
    assert table["bytes"].tolist() == [len(t.encode()) for t in documents.text]
    ours = task_forgetting.bits_per_byte(table["loglikelihood"].sum(), table["bytes"].sum())
    assert ours == pytest.approx(summary["score"], rel=1e-9)


def _results(tmp_path, name, values_by_model):
    out = []
    for (arm, seed), values in values_by_model.items():
        path = tmp_path / f"{name}-{arm}-{seed}.parquet"
        pd.DataFrame({"example": range(len(values)), "doc_hash": [f"h{i}" for i in range(len(values))],
                      "value": values}).to_parquet(path)
        out.append({"arm": arm, "seed": seed, "task": name, "score": float(np.mean(values)), "samples_path": path})
    return out


def _ref(name):
    return TaskRef(field="benchmarks.tasks.0", name=name, yaml="x.yaml", num_fewshot=0, limit=None, metric="acc",
                   higher_is_better=True, output_type="multiple_choice", corpus=None, examples=40, digest="d")


def test_a_copied_task_folder_keeps_its_digest(study_config, mc_task, tmp_path):
    import shutil

    copy = tmp_path / "elsewhere"
    shutil.copytree(mc_task.parent, copy)
    first = _resolve(study_config(benchmarks={"tasks": [str(mc_task)]}), tmp_path / "a")
    again = _resolve(study_config(benchmarks={"tasks": [str(copy / mc_task.name)]}), tmp_path / "b")
    assert first[0].digest == again[0].digest  # what it reads, not where: a moved root or folder stays cached
    (copy / "data" / "mc.jsonl").write_text((copy / "data" / "mc.jsonl").read_text().replace("rocks", "stones"))
    assert _resolve(study_config(benchmarks={"tasks": [str(copy / mc_task.name)]}), tmp_path / "c")[0].digest \
        != first[0].digest


def test_the_change_is_in_points_paired_over_examples_and_task_forgetting_is_the_mean(tmp_path):
    rng = np.random.default_rng(0)
    base_a, base_b = rng.integers(0, 2, 40).astype(float), rng.integers(0, 2, 40).astype(float)
    same = _results(tmp_path, "a", {("base", None): base_a, ("same", 0): base_a, ("same", 1): base_a})
    worse_a = base_a.copy()
    worse_a[:10] = 0.0  # forgets some examples of task a
    worse = _results(tmp_path, "a", {("worse", 0): worse_a, ("worse", 1): worse_a})
    b = _results(tmp_path, "b", {("base", None): base_b, ("same", 0): base_b, ("same", 1): base_b,
                                 ("worse", 0): base_b, ("worse", 1): base_b})
    wide, per_task = task_forgetting.analyse(same + worse + b, [_ref("a"), _ref("b")], ["same", "worse"])
    row = wide.set_index("arm")
    # identical answers: no change, an interval of exactly 0, within noise
    assert row.loc["same", "task_forgetting_pts"] == 0 and row.loc["same", "task_forgetting_ci_low"] == 0
    assert row.loc["same", "task_forgetting_within_noise"]
    drop = 100 * (worse_a.mean() - base_a.mean())
    assert row.loc["worse", "task_a_change"] == pytest.approx(drop)
    assert row.loc["worse", "task_forgetting_pts"] == pytest.approx(drop / 2)  # the mean over the two tasks
    assert row.loc["worse", "task_a_ci_high"] <= 0  # every resample loses (paired: only answers that changed count)
    assert not row.loc["worse", "task_a_within_noise"]  # the interval excludes 0 and both seeds agree
    assert set(per_task.task) == {"a", "b"} and (per_task[per_task.arm == "base"]["change"] == 0).all()


def test_unpaired_examples_are_refused(tmp_path):
    res = _results(tmp_path, "a", {("base", None): [1.0, 0.0], ("arm", 0): [1.0, 1.0]})
    pd.DataFrame({"example": [0, 1], "doc_hash": ["x", "y"], "value": [1.0, 1.0]}).to_parquet(res[1]["samples_path"])
    with pytest.raises(ValueError, match="not paired"):
        task_forgetting.analyse(res, [_ref("a")], ["arm"])


def _no_training(root: Path) -> bool:
    return not any(root.glob("train-*")) and not any(root.glob("eval-*"))


@pytest.mark.parametrize("entry, message", [
    ("hellaswga", r"benchmarks.tasks.0: 'hellaswga' is neither a task of lm-eval .*did you mean hellaswag"),
    ("mmlu", r"benchmarks.tasks.0: 'mmlu' is a group or tag"),
    ("hellaswag", r"benchmarks.tasks.0: .*Hugging Face Hub, which cannot be reached"),
    ({"task": "wikitext", "corpus": "general", "metric": "accuracy"}, r"benchmarks.tasks.0.metric: .*no metric 'accuracy'.*bits_per_byte"),
    ({"task": "arc_easy", "corpus": "general"}, r"benchmarks.tasks.0.corpus: general fits perplexity tasks"),
])
def test_bad_tasks_are_refused_before_any_training_naming_the_field(study_config, entry, message, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(task_forgetting, "_registry", registry)  # hellaswag's and arc_easy's data are on the Hub,
    # unreachable here (HF_HUB_OFFLINE in conftest): arc_easy is refused for its output type before its data
    cfg = study_config(benchmarks={"tasks": [entry]})
    with pytest.raises(BenchmarkError, match=message):
        study.run_study(cfg)
    assert _no_training(Path(cfg.artifacts_dir))
    if not isinstance(entry, dict) or "corpus" not in entry:  # checked before the model is even fetched
        assert not any(Path(cfg.artifacts_dir).glob("fetch-model/*"))


def test_a_task_file_that_does_not_parse_or_does_not_exist_is_named(study_config, mc_task, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: x\ndoc_to_text: [unclosed\n")
    for path, message in ((broken, r"benchmarks.tasks.1: task file .*broken.yaml does not parse as YAML"),
                          (tmp_path / "missing.yaml", r"benchmarks.tasks.1: task file .*missing.yaml does not exist")):
        cfg = study_config(benchmarks={"tasks": [{"task": "wikitext", "corpus": "general"}, str(path)]})
        with pytest.raises(BenchmarkError, match=message):
            study.run_study(cfg)
        assert _no_training(Path(cfg.artifacts_dir))
    # a task whose data file is missing: refused at load, naming the field
    bad_data = tmp_path / "bad_data.yaml"
    bad_data.write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nowhere.jsonl\n"
                        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\n"
                        "doc_to_target: 0\n")
    cfg = study_config(benchmarks={"tasks": [str(bad_data)]})
    with pytest.raises(BenchmarkError, match=r"benchmarks.tasks.0: lm-eval could not load task .*bad_data.yaml.*nowhere"):
        study.run_study(cfg)
    # shots asked of a task with only a test split: refused (lm-eval would draw them from the scored examples)
    cfg = study_config(benchmarks={"tasks": [{"task": str(mc_task), "num_fewshot": 2}]})
    with pytest.raises(BenchmarkError, match=r"benchmarks.tasks.0.num_fewshot: .*no training, validation"):
        study.run_study(cfg)


def test_relative_data_files_from_an_included_file_are_refused(mc_task, tmp_path):
    child = mc_task.parent / "child.yaml"
    child.write_text(f"include: {mc_task.name}\ntask: tiny_mc_child\n")
    spec = BenchmarksSpec(tasks=[str(child)]).tasks[0]
    with pytest.raises(BenchmarkError, match=r"benchmarks.tasks.0: .*child.yaml takes relative data_files from a file"):
        task_forgetting.locate(spec, "benchmarks.tasks.0", registry, tmp_path)
    child.unlink()


def test_config_shorthands_and_duplicates():
    spec = BenchmarksSpec(tasks=["hellaswag", {"task": "arc_challenge", "num_fewshot": 25, "limit": 100}])
    assert spec.tasks[0].task == "hellaswag" and spec.tasks[0].num_fewshot == 0 and spec.tasks[1].limit == 100
    with pytest.raises(ValueError, match="names a task twice"):
        BenchmarksSpec(tasks=["hellaswag", "hellaswag"])


def test_a_task_failing_at_run_time_fails_its_step_only(study_config, mc_task, monkeypatch):
    cfg = study_config(arms=["full", "lora"], benchmarks={"tasks": [str(mc_task)]})
    real = task_forgetting.run_task

    def flaky(*args, label, **kwargs):
        if label.startswith("task-lora"):
            raise RuntimeError("out of memory (simulated)")
        return real(*args, label=label, **kwargs)

    monkeypatch.setattr(task_forgetting, "run_task", flaky)
    results = study.run_study(cfg)
    root = Path(cfg.artifacts_dir)
    assert results["failed"] == {}  # the arms themselves finished
    assert list(results["failed_tasks"]) == ["lora/tiny_mc"]
    table = pd.read_parquet(root / results["table"]).set_index("arm")
    assert math.isfinite(table.loc["full", "task_forgetting_pts"]) and pd.isna(table.loc["lora", "task_forgetting_pts"])
    report = (root / results["report"]).read_text()
    assert "FAILED lora/tiny_mc: RuntimeError: out of memory (simulated)" in report
