"""The study's one DAG: fingerprint -> fetch -> tokenize -> checks -> baseline evals -> arms -> evals -> report.

`run_study` is the only definition of the step order. It runs the steps (ftcore.steps) through a
Runner: `InlineRunner` here (one process, no Prefect: notebooks, tests, benchmarks), or the Prefect
runner in flows/ (cached tasks in the UI, arms in their own processes or on a work pool). Either
way an arm that fails does not stop the others: the report lists it and the result names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from ftcore import benchmarks, corpora, models, tracking, training
from ftcore.config import InputError, StudyConfig
from ftcore.io import write_json
from ftcore.plan import ArmPlan, ModelRef, plan_arm
from ftcore.steps import (BENCHMARK, EVALUATE, FETCH_MODEL, FINGERPRINT, QUANTIZED_BASE, REPORT, TOKENIZE_DOMAIN, TOKENIZE_STREAM,
                          TRAIN, Step, StudyError, recorded)

log = logging.getLogger("ftcore.study")
SETS = ("domain", "general")
LATEST = "latest.json"

__all__ = ["InlineRunner", "Prepared", "Runner", "StudyError", "prepare", "plan_arms", "recorded", "run_study"]


# --- runners ---------------------------------------------------------------------------------------

class Runner(Protocol):
    """How the DAG's steps run: `run` waits for a step; `submit` may run it concurrently (a future)."""

    def run(self, step: Step, *args: Any) -> Any: ...

    def submit(self, step: Step, *args: Any) -> Any: ...

    def outcome(self, future: Any) -> tuple[Any, str | None]:
        """(result, None) when the step finished, (None, why) when it failed."""


@dataclass
class Done:
    """A finished step of the InlineRunner: its result, or the error it failed with."""

    value: Any = None
    error: BaseException | None = None


class InlineRunner:
    """Every step in this process, one after another. A failing step's error is kept in its future, so
    the DAG decides (an arm fails alone); bad input (InputError) stops the study at once."""

    def run(self, step: Step, *args: Any) -> Any:
        return step.run(*args)

    def submit(self, step: Step, *args: Any) -> Done:
        upstream = [a for a in args if isinstance(a, Done)]
        for done in upstream:
            if done.error is not None:
                return Done(error=RuntimeError(f"{step.name}: an input failed ({done.error})"))
        args = tuple(a.value if isinstance(a, Done) else a for a in args)
        try:
            return Done(step.run(*args))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - the DAG reports it (a failed arm), the others go on
            log.exception("%s failed", step.name)
            return Done(error=exc)

    def outcome(self, future: Done) -> tuple[Any, str | None]:
        if future.error is None:
            return future.value, None
        return None, f"{type(future.error).__name__}: {future.error}"


def result(runner: Runner, future: Any) -> Any:
    """A step's result; raises when it failed."""
    value, error = runner.outcome(future)
    if error is not None:
        raise RuntimeError(error)
    return value


# --- checks before any expensive work ----------------------------------------------------------------

def resolve_paths(cfg: StudyConfig) -> StudyConfig:
    """The config with every path absolute, resolved once against this process's working directory
    (the artifacts root, local corpus files, a local model), so child processes and workers that run
    elsewhere read and write the same places."""
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    update: dict[str, Any] = {"artifacts_dir": absolute(cfg.artifacts_dir)}
    for role in ("domain", "general", "replay"):
        spec = getattr(cfg, role)
        if spec is not None and spec.source == "file":
            update[role] = spec.model_copy(update={"path": absolute(spec.path)})
    if cfg.model.source == "local":
        update["model"] = cfg.model.model_copy(update={"name": absolute(cfg.model.name)})
    if cfg.model.wheel_dir is not None:
        update["model"] = cfg.model.model_copy(update={"wheel_dir": absolute(cfg.model.wheel_dir)})
    return cfg.model_copy(update=update)


def check_artifacts_dir(cfg: StudyConfig) -> Path:
    """The artifacts root, created; StudyError naming artifacts_dir when it cannot be written."""
    root = Path(cfg.artifacts_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise StudyError(f"artifacts_dir: {root} is not writable ({exc.strerror}); choose a writable directory") from None
    return root


def check_inputs(cfg: StudyConfig) -> StudyConfig:
    """Everything that can be checked before any model is loaded; returns the config with absolute paths.

    Raises InputError (naming the field or file) for an unwritable artifacts root, a corpus source
    that does not exist or a model source that cannot be resolved.
    """
    cfg = resolve_paths(cfg)
    check_trackers(cfg)
    warn_slow_bf16(cfg)
    check_artifacts_dir(cfg)
    corpus_versions(cfg)  # every corpus source exists (or its Hub revision resolves)
    from ftcore import sources

    sources.source_version(cfg.model)
    if cfg.executor == "subprocess" and cfg.train.devices_per_arm > 1:  # arms train here: its devices decide
        from ftcore import training

        training.check_devices_per_arm(cfg)
    return cfg


# What each tracker of report_to needs installed, and how to install it.
TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "mlflow": ("mlflow", "pip install 'ftstudy[mlflow]'"),
            "wandb": ("wandb", "pip install wandb")}


def check_trackers(cfg: StudyConfig) -> None:
    """Every tracker in report_to is installed; StudyError naming report_to otherwise (an asked-for tracker that
    silently logs nothing, or fails every arm after the base evaluations, is worse than a refusal)."""
    import importlib.util

    for tracker in cfg.report_to:
        module, install = TRACKERS[tracker]
        if importlib.util.find_spec(module) is None:
            raise StudyError(f"report_to: {tracker} is not installed ({install}); or drop it from report_to")


def warn_slow_bf16(cfg: StudyConfig) -> None:
    """A warning (not an error: the numbers are right, only slow) for bf16 on a CPU that emulates it."""
    if training.resolve_device(cfg.device) != "cpu" or training.cpu_has_native_bf16():
        return
    slow = [name for name, value in (("precision", cfg.precision), ("eval.precision", cfg.eval.precision))
            if value == "bf16"]
    if slow:
        log.warning("%s: bf16 on this CPU, which has no native bf16 (AVX512-BF16 or AMX), is emulated and runs "
                    "several times slower than fp32 (6x measured on an AVX2-only CPU); set %s to fp32 unless "
                    "you need bf16's numbers", " and ".join(slow), " and ".join(slow))


def check_split(cfg: StudyConfig, domain: dict[str, Any]) -> None:
    if cfg.test_docs >= domain["documents"]:
        raise corpora.CorpusError(f"test_docs ({cfg.test_docs}) must be smaller than the {domain['documents']} usable "
                                  "documents of domain; lower test_docs or raise domain.max_docs")


def check_model_fits(cfg: StudyConfig, model_dir: str | Path) -> None:
    limit = models.max_context(model_dir)
    if limit is not None and cfg.chunk_len > limit:
        raise StudyError(f"chunk_len: {cfg.chunk_len} tokens exceed the model's context of {limit}; lower chunk_len")


def check_replay_budget(cfg: StudyConfig, domain: dict[str, Any], replay: dict[str, Any] | None) -> None:
    """Enough replay tokens for every arm's replay_ratio, checked before any training starts."""
    replaying = [a for a in cfg.arms if a.replay_ratio > 0]
    if not replaying or replay is None:
        return
    greediest = max(replaying, key=lambda a: a.replay_ratio)  # the largest ratio needs the most replay tokens
    root = Path(cfg.artifacts_dir)
    try:
        training.build_training_mix(pd.read_parquet(root / domain["train"], columns=["input_ids", "completion_mask"]),
                                    pd.read_parquet(root / replay["path"], columns=["input_ids", "completion_mask"]),
                                    greediest.replay_ratio, cfg.train.seed)
    except training.ReplayBudgetError as exc:
        raise training.ReplayBudgetError(f"arm {greediest.name}: {exc}") from None


# --- the DAG -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prepared:
    """The study's inputs, fetched, tokenized and checked: what the baseline and every arm start from."""

    cfg: StudyConfig  # paths absolute
    model: ModelRef
    domain: dict[str, Any]
    general: dict[str, Any]
    replay: dict[str, Any] | None
    versions: dict[str, str] = field(default_factory=dict)  # corpus source versions (ftcore.study.corpus_versions)
    tasks: tuple[benchmarks.TaskRef, ...] = ()  # benchmark tasks, resolved and loaded (ftcore.benchmarks)

    def data(self, which: str) -> dict[str, Any]:
        return self.domain if which == "domain" else self.general

    def path(self, relative: str) -> Path:
        """A path from a step's result, on this machine."""
        return Path(self.cfg.artifacts_dir) / relative

    @property
    def model_dir(self) -> Path:
        return self.model.locate(self.cfg.artifacts_dir)


def prepare(cfg: StudyConfig, runner: Runner | None = None) -> Prepared:
    """Fingerprint the corpora, fetch the model, tokenize, and check what can only be checked then.

    Fingerprints come first: a bad corpus fails before any model is loaded. Raises InputError.
    """
    runner = runner or InlineRunner()
    cfg = check_inputs(cfg)
    versions = corpus_versions(cfg)  # what the corpus check compares against after a success
    corpus = {role: runner.run(FINGERPRINT, cfg, role) for role in corpus_roles(cfg)}
    check_split(cfg, corpus["domain"])
    # Benchmark tasks that read their own data are found, loaded and checked before the model is fetched.
    workdir, registry = Path(cfg.artifacts_dir) / "benchmark-tasks", benchmarks.registry_once()
    own_tasks = benchmarks.resolve(cfg, workdir, registry=registry, which="own")
    model = ModelRef.model_validate(runner.run(FETCH_MODEL, cfg))
    check_model_fits(cfg, model.locate(cfg.artifacts_dir))
    for arm in cfg.arms:  # LoRA targets the study cannot train or evaluate faithfully, before any work
        if arm.method == "qlora":
            training.check_qlora(model.locate(cfg.artifacts_dir), arm.name, cfg.device)
        if arm.method != "full":
            training.check_lora(cfg.lora_of(arm), model.locate(cfg.artifacts_dir), arm.name)
    domain = runner.run(TOKENIZE_DOMAIN, cfg, model, corpus["domain"])
    general = runner.run(TOKENIZE_STREAM, cfg, "general", model, corpus["general"])
    replay = runner.run(TOKENIZE_STREAM, cfg, "replay", model, corpus["replay"]) if "replay" in corpus else None
    check_replay_budget(cfg, domain, replay)  # before any model is loaded for evaluation or training
    on_general = benchmarks.resolve(cfg, workdir, general_documents=lambda: general_documents(cfg, general),
                                    registry=registry, which="general")
    tasks = benchmarks.in_config_order(cfg, own_tasks, on_general)
    return Prepared(cfg, model, domain, general, replay, versions, tuple(tasks))


def general_documents(cfg: StudyConfig, general: dict[str, Any]) -> pd.DataFrame:
    """The general documents the general perplexity scores (within eval.max_general_tokens): columns doc (index
    in the general corpus), text, and whole (all of its tokens are scored)."""
    import numpy as np

    frame = pd.read_parquet(Path(cfg.artifacts_dir) / general["path"], columns=["token_docs"])
    every = np.concatenate(frame["token_docs"].to_numpy())
    scored = every[: cfg.eval.max_general_tokens] if cfg.eval.max_general_tokens else every
    ids, counts = np.unique(scored, return_counts=True)
    total = dict(zip(*np.unique(every, return_counts=True)))
    texts = corpora.document_texts(corpora.load_corpus(cfg.general, "general"), cfg.general.text_fields)
    return pd.DataFrame({"doc": ids, "text": [texts[d] for d in ids],
                         "whole": [int(c) == int(total[d]) for d, c in zip(ids, counts)]})


def plan_arms(prepared: Prepared) -> list[ArmPlan]:
    """Every arm at every seed, resolved once (ftcore.plan.plan_arm)."""
    p = prepared
    return [plan_arm(p.cfg, arm, seed, p.model, p.domain, p.replay, p.general)
            for seed in p.cfg.run_seeds for arm in p.cfg.arms]


def run_study(cfg: StudyConfig, runner: Runner | None = None) -> dict[str, Any]:
    """Measure what fine-tuning costs: the base and every arm on domain and general text, and the report.

    Returns the report's files (paths relative to the artifacts root), `failed` (arm run -> error) and
    `failed_tasks` (benchmark step "label/task" -> error). Raises InputError for bad input, before any model is
    loaded where it can be checked.
    """
    runner = runner or InlineRunner()
    if isinstance(runner, InlineRunner) and cfg.train.devices_per_arm > 1:
        # In-process arms are one process: each would accumulate grad_accum / N micro-batches and train on a
        # silently smaller global batch.
        raise InputError(f"train.devices_per_arm {cfg.train.devices_per_arm}: arms trained in this process (the "
                         "in-process runner) run as one process; run the study as a flow (ftstudy run), which starts "
                         "each arm under torchrun, or set train.devices_per_arm=1")
    p = prepare(cfg, runner)
    cfg, root = p.cfg, p.cfg.artifacts_dir
    baseline = {w: runner.submit(EVALUATE, cfg, p.model, p.data(w), w) for w in SETS}
    # With eval.kl_top_k, an arm's general evaluation reads the base's stored top-k (exact KL needs none).
    against = {"domain": None, "general": baseline["general"] if cfg.eval.kl_top_k else None}
    base = list(baseline.values())
    if any(a.method == "qlora" for a in cfg.arms):  # the 4-bit base: what quantization alone costs
        base += [runner.submit(EVALUATE, cfg, p.model, p.data(w), w, QUANTIZED_BASE, against[w]) for w in SETS]
    plans = plan_arms(p)
    trained = {plan.label: runner.submit(TRAIN, plan, root) for plan in plans}
    arm_evals = {label: [runner.submit(EVALUATE, cfg, p.model, p.data(w), w, fut, against[w]) for w in SETS]
                 for label, fut in trained.items()}

    scored = {"base": None, **({"base-nf4": QUANTIZED_BASE} if any(a.method == "qlora" for a in cfg.arms) else {}),
              **trained}
    tasks = {(label, t.name): runner.submit(BENCHMARK, cfg, p.model, t, *([arm] if arm is not None else []))
             for label, arm in scored.items() for t in p.tasks}

    evals = [result(runner, f) for f in base]
    arms, failed = [], {}
    for label, fut in trained.items():
        value, error = runner.outcome(fut)
        if error is not None:
            failed[label] = error.splitlines()[0][:300]
            log.error("train-%s failed: %s", label, failed[label])
            continue
        arms.append(value)
        evals += [result(runner, f) for f in arm_evals[label]]

    data = {f"domain {split}": st for split, st in p.domain["stats"].items()}
    data |= {"general": p.general["stats"]} | ({"replay": p.replay["stats"]} if p.replay else {})
    bench = task_results(runner, p.tasks, tasks, failed)
    results = runner.run(REPORT, cfg, evals, arms, failed, data, p.model, bench)
    mark_latest(cfg, results)
    tracking.publish(cfg, Path(root), results, arms, evals)
    failed_tasks = bench["failed"] if bench else {}
    if not failed and not failed_tasks:  # a study with a failed step is not a success the corpus check builds on
        record_corpus_versions(cfg, p.versions)
    return {**results, "failed": failed, "failed_tasks": failed_tasks}


def task_results(runner: Runner, refs: tuple[benchmarks.TaskRef, ...], futures: dict[tuple[str, str], Any],
                 failed_arms: dict[str, str]) -> dict[str, Any] | None:
    """The benchmark steps' results for the report; a step that failed is listed (its arm's did not train: skipped)."""
    if not refs:
        return None
    results, failed = [], {}
    for (label, task), fut in futures.items():
        if label in failed_arms:
            continue
        value, error = runner.outcome(fut)
        if error is not None:
            failed[f"{label}/{task}"] = error.splitlines()[0][:300]
            log.error("bench-%s-%s failed: %s", label, task, failed[f"{label}/{task}"])
        else:
            results.append(value)
    return {"tasks": [t.model_dump() for t in refs], "results": results, "failed": failed}


def mark_latest(cfg: StudyConfig, results: dict[str, Any]) -> Path:
    """Record the newest report of this artifacts root (what `ftstudy show` prints); paths relative to it."""
    return write_json(results, Path(cfg.artifacts_dir) / LATEST)


def report_files(root: str | Path, results: dict[str, Any]) -> dict[str, Path]:
    """The report's files (table, report, plots, per-run tables) of a study's results, as paths under `root`."""
    return {name: Path(root) / rel for name, rel in results.items() if name not in ("digest", "failed", "failed_tasks")}


# --- corpus change detection (what a scheduled check compares) -----------------------------------

def corpus_roles(cfg: StudyConfig) -> list[str]:
    """The corpora this study reads: domain, general, and replay when an arm mixes replay text in."""
    return ["domain", "general"] + (["replay"] if any(a.replay_ratio > 0 for a in cfg.arms) else [])


def corpus_versions(cfg: StudyConfig) -> dict[str, str]:
    """Cheap identity of every corpus source now: a file's sha256 or a Hub dataset's commit."""
    return {role: corpora.source_version(getattr(cfg, role), role) for role in corpus_roles(cfg)}


def _corpus_state_path(cfg: StudyConfig) -> Path:
    # One record per set of corpus sources, so studies sharing an artifacts root do not mix.
    specs = {role: getattr(cfg, role).model_dump(mode="json") for role in corpus_roles(cfg)}
    digest = hashlib.sha256(json.dumps(specs, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.artifacts_dir).expanduser() / "corpus-state" / f"{cfg.name}-{digest}.json"


def has_recorded_versions(cfg: StudyConfig) -> bool:
    """Whether a successful study of these corpus sources is recorded under the artifacts root."""
    return _corpus_state_path(cfg).is_file()


def record_corpus_versions(cfg: StudyConfig, versions: dict[str, str]) -> Path:
    """Remember the corpus versions a successful study measured."""
    return write_json({"name": cfg.name, "versions": versions}, _corpus_state_path(cfg))


def changed_corpora(cfg: StudyConfig, versions: dict[str, str] | None = None) -> dict[str, str]:
    """Roles whose source differs from the last successful study, each with why; empty when none."""
    versions = versions if versions is not None else corpus_versions(cfg)
    path = _corpus_state_path(cfg)
    if not path.exists():
        return {role: "no successful study recorded yet" for role in versions}
    seen = json.loads(path.read_text())["versions"]
    return {role: f"{seen.get(role, 'none')[:12]} -> {version[:12]}"
            for role, version in versions.items() if seen.get(role) != version}
