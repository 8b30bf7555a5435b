"""Forgetting on benchmark tasks, through EleutherAI's lm-evaluation-harness (the `lm_eval` package).

The papers the study follows measure forgetting on tasks as well as on perplexity (Biderman et al.
2024, "LoRA Learns Less and Forgets Less": the drop in mean HellaSwag, ARC-Challenge, WinoGrande
accuracy). ftstudy does not run tasks itself: lm-eval's registry and YAML task format define them,
its `simple_evaluate` scores them, and its per-sample log gives what the report pairs across models.

Three parts:
- `resolve`: every task of `benchmarks` found, loaded once (its data too) and fingerprinted, before
  any training; a bad name, a file that does not parse, a task whose data needs the unreachable Hub
  is a BenchmarkError (an InputError) naming the field.
- `run_task`: one task on one model (the base, the 4-bit base or an arm as it trained), with
  lm-eval; returns its score and the per-example table.
- `analyse` / `write`: per task and arm the score, the change against the base (in points for
  accuracy-like metrics, in % for a perplexity task), a paired bootstrap interval over examples,
  the spread over seeds and the mean change over the accuracy tasks ("task forgetting"); the
  report section, the frontier plot, and, for a perplexity task scored on the study's own general
  documents (`corpus: general`), the agreement of lm-eval's and ftstudy's bits per byte.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict

from ftcore import stats
from ftcore.progress import Progress
from ftcore.config import BenchmarkTask, InputError, StudyConfig
from ftcore.io import write_text

log = logging.getLogger("ftcore.task_forgetting")
ROLLING = "loglikelihood_rolling"
# The metric compared when the config names none: acc_norm where a task defines it (Biderman et al. 2024).
PREFERRED = ("acc_norm", "acc", "bits_per_byte")
# Metrics that are a share of examples in [0, 1]: reported in % and their changes in points.
SHARES = {"acc", "acc_norm", "acc_mutual_info", "exact_match", "f1", "mc1", "mc2", "mcc"}
INSTALL = "pip install 'ftstudy[tasks]'"


class BenchmarkError(InputError):
    """A benchmark task ftstudy cannot run: unknown, unparsable, or with data it cannot reach."""


class TaskRef(BaseModel):
    """One resolved task: what lm-eval loads (a YAML path) and what its results depend on (`digest`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field: str  # the config field it came from, for messages: benchmarks.tasks.<i>
    name: str  # lm-eval's task name; the report's key
    yaml: str  # absolute path of the YAML lm-eval loads (the registry's, the user's, or one ftstudy wrote)
    num_fewshot: int
    limit: int | None
    metric: str
    higher_is_better: bool
    output_type: str
    corpus: str | None  # "general": the task reads the study's general documents
    examples: int  # examples (documents) scored: after limit
    digest: str  # the task's config (its functions' source included) and the examples it reads

    @property
    def perplexity_like(self) -> bool:
        """A rolling log-likelihood task: its change is a % like ftstudy's perplexity, not points."""
        return self.output_type == ROLLING



# --- find and load tasks ------------------------------------------------------------------------------

def require_lm_eval() -> None:
    """BenchmarkError naming `benchmarks` when lm-eval is not installed."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise BenchmarkError(f"benchmarks: lm-evaluation-harness is not installed ({INSTALL}); or drop the "
                             "tasks (--set benchmarks=null)")


def _registry():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexes lm-eval's ~15k task YAMLs (about 10 s)


def registry_once() -> Callable[[], Any]:
    """lm-eval's task index, built at the first call and kept (for several `resolve` calls of one study)."""
    from functools import lru_cache

    return lru_cache(maxsize=1)(lambda: _registry())


def in_config_order(cfg: StudyConfig, *parts: list[TaskRef]) -> list[TaskRef]:
    """Tasks resolved in parts, in the order of cfg.benchmarks.tasks; BenchmarkError when two are the same task."""
    refs = sorted((r for part in parts for r in part), key=lambda r: int(r.field.rsplit(".", 1)[1]))
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise BenchmarkError(f"benchmarks.tasks: two entries are the same lm-eval task ({names})")
    return refs


class _PlainLoader(yaml.SafeLoader):
    """Reads a task YAML as data: `!function x.y` stays the string (to find data files, not to run code)."""


_PlainLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def read_task_yaml(path: Path, field: str) -> dict[str, Any]:
    """A task YAML file as a dict (functions unresolved). BenchmarkError naming the field and file when it
    does not exist or does not parse."""
    if path.is_dir():
        raise BenchmarkError(f"{field}: {path} is a folder; give the path of one task YAML file in it")
    if not path.is_file():
        raise BenchmarkError(f"{field}: task file {path} does not exist; give an lm-eval task name or the path of a "
                             "task YAML file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlainLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise BenchmarkError(f"{field}: task file {path} does not parse as YAML: {exc}") from None
    if not isinstance(data, dict) or not ("task" in data or "include" in data):
        raise BenchmarkError(f"{field}: task file {path} is not an lm-eval task config (a mapping with `task:`); see "
                             "lm-eval's docs/task_guide.md")
    return data


def merged_config(path: Path, field: str, depth: int = 0) -> dict[str, Any]:
    """A task YAML with its `include`s merged in (lm-eval's rule: the including file's keys win)."""
    data = read_task_yaml(path, field)
    includes = data.pop("include", None)
    if includes is None or depth > 8:
        return data
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        merged.update(merged_config((path.parent / inc) if not Path(inc).is_absolute() else Path(inc), field, depth + 1))
    return merged | data


def _absolute_data_files(data: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    """dataset_kwargs with relative data_files made absolute against the YAML's folder; None if none is relative."""
    kwargs = data.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is None:
        return None

    def fix(value):
        if isinstance(value, str):
            return value if Path(value).is_absolute() or "://" in value else str((folder / value).resolve())
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    fixed = fix(files)
    return None if fixed == files else {**kwargs, "data_files": fixed}


def _derived_yaml(base: Path, overrides: dict[str, Any], workdir: Path) -> Path:
    """A task YAML that includes `base` (lm-eval's `include:`) with `overrides`, content-addressed under workdir."""
    text = yaml.safe_dump({"include": str(base), **overrides}, sort_keys=True)
    path = workdir / hashlib.sha256(text.encode()).hexdigest()[:16] / f"{base.stem}.yaml"
    if not path.is_file():
        write_text(text, path)
    return path


def locate(spec: BenchmarkTask, field: str, registry: Callable[[], Any], workdir: Path) -> Path:
    """The YAML lm-eval should load for a configured task: the registry's for a name, the user's file (or a
    copy with its relative data files made absolute). BenchmarkError for an unknown name, naming near ones."""
    looks_like_file = spec.task.endswith((".yaml", ".yml")) or "/" in spec.task
    if looks_like_file:
        path = Path(spec.task).expanduser().resolve()
        data = read_task_yaml(path, field)
        if "dataset_kwargs" not in data and _absolute_data_files(merged_config(path, field), path.parent):
            # lm-eval would read them relative to the working directory: possibly another file of that name
            raise BenchmarkError(f"{field}: {path} takes relative data_files from a file it includes; give "
                                 "dataset_kwargs.data_files in this file itself (relative to its folder) or as "
                                 "absolute paths")
        fixed = _absolute_data_files(data, path.parent)
        return _derived_yaml(path, {"dataset_kwargs": fixed}, workdir) if fixed else path
    tm = registry()
    entry = tm.task_index.get(spec.task)
    if entry is None:
        near = difflib.get_close_matches(spec.task, tm.all_subtasks, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise BenchmarkError(f"{field}: {spec.task!r} is neither a task of lm-eval {_version()} nor a task YAML file"
                             f"{hint} (`lm-eval ls tasks` lists them)")
    if spec.task not in tm.all_subtasks or entry.yaml_path is None:
        raise BenchmarkError(f"{field}: {spec.task!r} is a group or tag of lm-eval tasks; name its tasks one by one "
                             "(each is scored and reported on its own)")
    return Path(entry.yaml_path)


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")


def load_task(yaml_path: str | Path, field: str = "benchmarks", shown: str | None = None):
    """The lm-eval Task a YAML defines, its data loaded. BenchmarkError naming `field` when it cannot load:
    data on the Hub that cannot be reached, a missing data file, a config lm-eval refuses. `shown` is what
    the message calls the task (the user's entry, not a YAML ftstudy derived from it)."""
    from lm_eval.tasks import TaskManager

    try:
        loaded = TaskManager(include_defaults=False).load([str(yaml_path)])
    except Exception as exc:  # noqa: BLE001 - every way lm-eval or datasets can fail, turned into one message
        raise BenchmarkError(f"{field}: lm-eval could not load task {shown or yaml_path}: {_why(exc)}") from None
    tasks = list(loaded["tasks"].values())
    if len(tasks) != 1:
        raise BenchmarkError(f"{field}: {yaml_path} defines {len(tasks)} tasks; give one task per entry")
    return tasks[0]


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    hub = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "Couldn't reach", "Name or service")
    if any(h in text for h in hub):
        return (f"its data is on the Hugging Face Hub, which cannot be reached from here ({text}). Run once where the "
                "Hub is reachable (datasets caches it), or use a task YAML file with local data (dataset_path: json, "
                "dataset_kwargs.data_files); a perplexity task such as wikitext can read the study's general "
                "documents instead (corpus: general)")
    return text


def choose_metric(task, wanted: str | None, field: str) -> tuple[str, bool]:
    """(metric, higher_is_better) the report compares; BenchmarkError when the task has no such metric."""
    better = task.higher_is_better()
    names = list(better)
    if wanted is not None:
        if wanted not in better:
            raise BenchmarkError(f"{field}.metric: task {task.config.task} has no metric {wanted!r}; its metrics are "
                                 f"{names}")
        return wanted, bool(better[wanted])
    name = next((m for m in PREFERRED if m in better), names[0] if names else None)
    if name is None:
        raise BenchmarkError(f"{field}: task {task.config.task} defines no metric")
    return name, bool(better[name])


def _jsonable(value: Any) -> Any:
    if callable(value):
        try:
            return inspect.getsource(value)
        except (OSError, TypeError):
            return getattr(value, "__qualname__", str(value))
    return str(value)


def task_digest(task, num_fewshot: int, limit: int | None) -> tuple[str, int]:
    """(sha256 of the task's config, its functions' source and the examples it scores and samples shots
    from, the number of examples scored)."""
    config = task.config.to_dict(keep_callable=True)
    # What the task reads, not where it lies: the YAML's path and the data files' paths are left out (the
    # examples themselves are hashed below), so a moved artifacts root or task folder stays cached.
    config.get("metadata", {}).pop("config_source", None)
    config.get("dataset_kwargs", {}).pop("data_files", None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=_jsonable).encode())
    docs = list(task.eval_docs)
    scored = docs[:limit] if limit else docs
    for doc in scored:
        h.update(json.dumps(doc, sort_keys=True, default=_jsonable).encode())
    if num_fewshot:
        h.update(b"shots")
        for doc in task.fewshot_docs() or []:
            h.update(json.dumps(doc, sort_keys=True, default=_jsonable).encode())
    return h.hexdigest(), len(scored)


def write_documents(documents: pd.DataFrame, workdir: Path) -> Path:
    """The study's general documents (columns doc, text, whole) as JSON lines lm-eval's perplexity tasks read:
    `page` (wikitext) and `text` (Pile-style tasks) hold the document, `ftstudy_doc` its index in the general
    corpus, `ftstudy_whole` whether ftstudy's general perplexity scored all of it."""
    lines = [json.dumps({"page": r.text, "text": r.text, "ftstudy_doc": int(r.doc), "ftstudy_whole": bool(r.whole)},
                        ensure_ascii=False) for r in documents.itertuples(index=False)]
    text = "\n".join(lines) + "\n"
    # Content-addressed: studies with other general documents on the same root never read these.
    path = workdir / f"general-{hashlib.sha256(text.encode()).hexdigest()[:16]}" / "documents.jsonl"
    return path if path.is_file() else write_text(text, path)


def on_general(base: Path, documents: Path, workdir: Path) -> Path:
    """A task YAML: the registered perplexity task `base` (its prompt, detokenizer and metrics) reading the
    study's general documents instead of its Hub dataset."""
    overrides = {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(documents)}},
                 "training_split": None, "validation_split": None, "test_split": "test",
                 "task": f"{read_task_yaml(base, 'benchmarks').get('task', base.stem)}_general"}
    return _derived_yaml(base, overrides, workdir)


def resolve(cfg: StudyConfig, workdir: Path, general_documents: Callable[[], pd.DataFrame] | None = None,
            registry: Callable[[], Any] | None = None, which: str = "all") -> list[TaskRef]:
    """Every task of cfg.benchmarks found, loaded and fingerprinted (before any training).

    `workdir` receives the YAMLs ftstudy writes (relative data files made absolute; a perplexity task on
    the general documents); `general_documents` returns the general documents the study scores (columns
    doc, text, whole; for `corpus: general`). `which`: "own" resolves only the tasks that read their own
    data (checkable before the model is fetched), "general" only those on the general documents, "all"
    both. Raises BenchmarkError naming the field.
    """
    if cfg.benchmarks is None:
        return []
    require_lm_eval()
    from functools import lru_cache

    registry = lru_cache(maxsize=1)(registry or _registry)
    refs = []
    for i, spec in enumerate(cfg.benchmarks.tasks):
        if which != "all" and (spec.corpus == "general") != (which == "general"):
            continue
        field = f"benchmarks.tasks.{i}"
        path = locate(spec, field, registry, workdir)
        if spec.corpus == "general":
            kind = merged_config(path, field).get("output_type", "generate_until")
            if kind != ROLLING:
                raise BenchmarkError(f"{field}.corpus: general fits perplexity tasks (output_type {ROLLING}, e.g. "
                                     f"wikitext); {spec.task} is {kind}")
            if general_documents is None:
                raise BenchmarkError(f"{field}.corpus: the general documents are not available here")
            path = on_general(path, write_documents(general_documents(), workdir), workdir)
        task = load_task(path, field, shown=spec.task)
        output_type = task.config.output_type
        if spec.num_fewshot and not (task.has_training_docs() or task.has_validation_docs()
                                     or (task.config.fewshot_split if hasattr(task.config, "fewshot_split") else None)):
            raise BenchmarkError(f"{field}.num_fewshot: task {task.config.task} has no training, validation or "
                                 "few-shot split to draw shots from (lm-eval would take them from the examples it "
                                 "scores); set num_fewshot: 0 or give the task a training_split")
        metric, higher = choose_metric(task, spec.metric, field)
        digest, examples = task_digest(task, spec.num_fewshot, spec.limit)
        if examples == 0:
            raise BenchmarkError(f"{field}: task {task.config.task} has no examples to score")
        refs.append(TaskRef(field=field, name=task.config.task, yaml=str(path), num_fewshot=spec.num_fewshot,
                            limit=spec.limit, metric=metric, higher_is_better=higher, output_type=output_type,
                            corpus=spec.corpus, examples=examples, digest=digest))
        log.info("benchmark %s: %d examples, metric %s, %d-shot (%s)", task.config.task, examples, metric,
                 spec.num_fewshot, path)
    names = [r.name for r in refs]
    if which == "all" and len(set(names)) != len(names):
        raise BenchmarkError(f"benchmarks.tasks: two entries are the same lm-eval task ({names})")
    return refs


# --- run one task on one model ------------------------------------------------------------------------

def _scored_lm(model, tokenizer, batch_size: int, max_length: int | None, label: str):
    """lm-eval's HFLM around a model already in memory, with fp32 log-probabilities (bf16 autocast logits are
    cast up, as ftstudy's perplexity does) and progress with an ETA in the log (requests of a log-likelihood
    task; tokens of a perplexity task)."""
    from lm_eval.models.huggingface import HFLM

    class ScoredLM(HFLM):
        progress = Progress(label, 1)

        def loglikelihood(self, requests, disable_tqdm=False):
            self.progress, self.unit = Progress(label, max(len(requests), 1), unit="requests"), "rows"
            return super().loglikelihood(requests, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            total = sum(len(self.tok_encode(r.args[0])) for r in requests)
            self.progress, self.unit = Progress(label, max(total, 1), unit="tokens"), "tokens"
            return super().loglikelihood_rolling(requests, disable_tqdm)

        def _model_call(self, inps, attn_mask=None, labels=None):
            logits = super()._model_call(inps, attn_mask, labels)
            done = int(inps.shape[0]) if getattr(self, "unit", "rows") == "rows" else int(inps.numel())
            self.progress.advance(max(0, min(done, self.progress.total - self.progress.done)))
            return logits.float()

    return ScoredLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def sample_table(samples: list[dict[str, Any]], ref: TaskRef) -> pd.DataFrame:
    """lm-eval's per-sample log as a table, one row per example: `example` (doc_id), `doc_hash`, and the
    compared metric (`value`), or for a perplexity task its parts: `loglikelihood` (nats, summed over the
    document), `bytes` and `words` (of the original document, as lm-eval counts them)."""
    rows = []
    first = samples[0].get("filter") if samples else None  # a task with several filters logs each example per filter
    for s in sorted((s for s in samples if s.get("filter") == first), key=lambda s: s["doc_id"]):
        row: dict[str, Any] = {"example": int(s["doc_id"]), "doc_hash": s.get("doc_hash", "")}
        if ref.perplexity_like:
            row["loglikelihood"] = float(s[ref.metric][0])
            row["bytes"] = int(s["bits_per_byte"][1]) if "bits_per_byte" in s else int(s["byte_perplexity"][1])
            if "word_perplexity" in s:
                row["words"] = int(s["word_perplexity"][1])
            if ref.corpus == "general":
                row["ftstudy_doc"] = int(s["doc"]["ftstudy_doc"])
                row["ftstudy_whole"] = bool(s["doc"]["ftstudy_whole"])
        else:
            row["value"] = float(s[ref.metric])
        rows.append(row)
    return pd.DataFrame(rows)


def metric_value(results: dict[str, Any], ref: TaskRef) -> float:
    """The task's aggregate score from lm-eval's results (its first filter, `none` for log-likelihood tasks)."""
    scores = results["results"][ref.name]
    first = (results.get("samples", {}).get(ref.name) or [{}])[0].get("filter")
    key = f"{ref.metric},{first}" if f"{ref.metric},{first}" in scores else next(
        (k for k in scores if k.split(",")[0] == ref.metric), None)
    if key is None:
        raise RuntimeError(f"lm-eval returned no {ref.metric} for task {ref.name} (it returned {sorted(scores)})")
    return float(scores[key])


def run_task(model, tokenizer, ref: TaskRef, batch_size: int, seed: int, autocast, label: str,
             max_length: int | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score one task on one model with lm-eval's simple_evaluate: (summary, per-example table).

    `autocast` is the evaluation's precision context (ftstudy.perplexity's). The summary holds
    `score` (the metric as lm-eval aggregates it), `examples`, and lm-eval's version; `max_length` is the
    context lm-eval gives the model (None: the model's own). Raises
    whatever lm-eval raises (the step fails alone; the report lists it).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = _scored_lm(model, tokenizer, batch_size, max_length, label)
    with autocast:
        out = lm_eval.simple_evaluate(model=lm, tasks=[ref.yaml], num_fewshot=ref.num_fewshot, limit=ref.limit,
                                      log_samples=True, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed,
                                      task_manager=TaskManager(include_defaults=False))
    table = sample_table(out["samples"][ref.name], ref)
    if table.empty or len(table) != ref.examples:
        raise RuntimeError(f"{ref.name}: lm-eval scored {len(table)} examples, {ref.examples} expected")
    summary = {"score": metric_value(out, ref), "examples": len(table), "lm_eval": out.get("lm_eval_version")}
    return summary, table


# --- analysis ------------------------------------------------------------------------------------------

def unit(ref: TaskRef) -> str:
    """How a task's change is given: "%" (relative, a perplexity task), "pts" (points of a share such as
    accuracy, which counts toward task forgetting) or "" (the metric's own units). The report's choice, kept
    off TaskRef so that rewording it scores no model again."""
    return "%" if ref.perplexity_like else ("pts" if ref.metric in SHARES else "")


def _scale(ref: TaskRef) -> float:
    return 100.0 if unit(ref) == "pts" else 1.0


def bits_per_byte(loglikelihood: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """lm-eval's bits_per_byte of summed log-likelihoods (nats) over bytes: -Σ ll / Σ bytes / ln 2."""
    return -loglikelihood / nbytes / math.log(2)


def _resampled(ref: TaskRef, tables: list[pd.DataFrame], weights: np.ndarray) -> np.ndarray:
    """The task's score of each model under each bootstrap resample of examples: [resamples x models]."""
    if ref.perplexity_like:
        ll = np.stack([t["loglikelihood"].to_numpy(float) for t in tables])
        nbytes = tables[0]["bytes"].to_numpy(float)
        if ref.metric == "bits_per_byte":
            return bits_per_byte(weights @ ll.T, (weights @ nbytes)[:, None])
        counts = tables[0]["words" if ref.metric == "word_perplexity" else "bytes"].to_numpy(float)
        return np.exp(-(weights @ ll.T) / (weights @ counts)[:, None])
    values = np.stack([t["value"].to_numpy(float) for t in tables])
    return (weights @ values.T) / weights.sum(axis=1, keepdims=True)


def _change(ref: TaskRef, arm: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Change against the base: % for a perplexity task, points (×100) for a share such as accuracy, else the
    difference in the metric's units."""
    if unit(ref) == "%":
        return 100 * (arm / base - 1)
    return _scale(ref) * (arm - base)


def analyse(results: list[dict[str, Any]], refs: list[TaskRef], order: list[str],
            resamples: int = stats.RESAMPLES) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-arm table, per-task long table) of the benchmark results.

    Per task and arm: the score (mean over seeds), its change against the base with the seed spread,
    a paired bootstrap interval over examples (every model resampled alike) and the noise mark; per
    arm, `task_forgetting_pts`, the mean change over the accuracy-like tasks, with its interval. A
    task whose base or some arm's seed has no result is left out of that arm's row. Raises
    ValueError when two models' examples differ (not paired).
    """
    by = {(r["arm"], r.get("seed"), r["task"]): r for r in results}
    long, forgetting = [], {}
    for t, ref in enumerate(refs):
        base = by.get(("base", None, ref.name))
        if base is None:
            continue
        base_table = pd.read_parquet(base["samples_path"])
        weights = stats.resample_weights(len(base_table), resamples, seed=t)
        long.append({"arm": "base", "task": ref.name, "metric": ref.metric, "score": base["score"] * _scale(ref), "unit": unit(ref),
                     "seeds": 0, "change": 0.0})
        for arm in order:
            runs = sorted((r for (a, _, name), r in by.items() if a == arm and name == ref.name),
                          key=lambda r: r["seed"])
            if not runs:
                continue
            tables = [pd.read_parquet(r["samples_path"]) for r in runs]
            for table in tables:
                if not np.array_equal(table["doc_hash"].to_numpy(), base_table["doc_hash"].to_numpy()):
                    raise ValueError(f"{ref.name}: {arm}'s examples differ from the base's; not paired")
            scores = _resampled(ref, [base_table, *tables], weights)
            samples = _change(ref, scores[:, 1:], scores[:, [0]]).mean(axis=1)
            per_seed = np.array([_change(ref, np.float64(r["score"]), np.float64(base["score"])) for r in runs])
            change, spread = float(per_seed.mean()), stats.seed_std(per_seed)
            ci = stats.interval(samples)
            long.append({"arm": arm, "task": ref.name, "metric": ref.metric,
                         "score": float(np.mean([r["score"] for r in runs])) * _scale(ref), "seeds": len(runs),
                         "change": change, "change_std": spread, "ci_low": ci[0], "ci_high": ci[1],
                         "within_noise": stats.within_noise(change, ci, spread),
                         "unit": unit(ref), **flips(base_table, tables)})
            if unit(ref) == "pts":
                forgetting.setdefault(arm, []).append((change, per_seed, samples))
    per_task = pd.DataFrame(long)
    rows = []
    for arm, parts in forgetting.items():
        change = float(np.mean([c for c, _, _ in parts]))
        seeds = [p for _, p, _ in parts]
        spread = stats.seed_std(np.mean(seeds, axis=0)) if len({len(s) for s in seeds}) == 1 else float("nan")
        ci = stats.interval(np.mean([s for _, _, s in parts], axis=0))
        rows.append({"arm": arm, "task_forgetting_pts": change, "task_forgetting_std": spread,
                     "task_forgetting_ci_low": ci[0], "task_forgetting_ci_high": ci[1],
                     "task_forgetting_within_noise": stats.within_noise(change, ci, spread),
                     "task_forgetting_tasks": len(parts)})
    wide = {r["arm"]: dict(r) for r in rows}
    for r in long:  # each task's score and change as columns of the arm's row
        row = wide.setdefault(r["arm"], {"arm": r["arm"]})
        row.update({f"task_{r['task']}_{k}": r[k] for k in ("score", "change", "change_std", "ci_low", "ci_high",
                                                           "within_noise") if k in r})
    return pd.DataFrame(list(wide.values())), per_task


# --- the report ----------------------------------------------------------------------------------------

def mcnemar(right_to_wrong: int, wrong_to_right: int) -> float:
    """Exact McNemar test of paired right/wrong outcomes: the two-sided binomial p of the discordant pairs
    (scipy.stats.binomtest, p = 0.5; McNemar 1947, exact form); 1.0 when no example changed."""
    from scipy.stats import binomtest

    n = right_to_wrong + wrong_to_right
    return float(binomtest(min(right_to_wrong, wrong_to_right), n, 0.5).pvalue) if n else 1.0


def flips(base: pd.DataFrame, arms: list[pd.DataFrame]) -> dict[str, Any]:
    """For a task scored right or wrong per example (values 0 and 1): per seed of an arm, the examples that went
    right -> wrong and wrong -> right against the base (paired by example), and McNemar's exact p; empty for
    other metrics. Several seeds: the mean counts and the largest p (every seed's p is at most it)."""
    right = base["value"].to_numpy() if "value" in base else None
    if right is None or not np.isin(right, (0.0, 1.0)).all():
        return {}
    counts = []
    for table in arms:
        arm = table["value"].to_numpy()
        counts.append((int(((right == 1) & (arm == 0)).sum()), int(((right == 0) & (arm == 1)).sum())))
    lost, gained = np.mean([c[0] for c in counts]), np.mean([c[1] for c in counts])
    return {"right_to_wrong": float(lost), "wrong_to_right": float(gained),
            "mcnemar_p": max(mcnemar(a, b) for a, b in counts)}


def _cell(r: pd.Series, unit: str) -> str:
    if r["arm"] == "base":
        return f"{r['score']:.2f}" if unit == "pts" else f"{r['score']:.4f}"
    score = f"{r['score']:.2f}" if unit == "pts" else f"{r['score']:.4f}"
    sign = f"{r['change']:+.1f}{' pts' if unit == 'pts' else unit}" if unit else f"{r['change']:+.4g}"
    if r["seeds"] > 1:
        sign += f" ± {r['change_std']:.1f}"
    sign += f" [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]"
    if pd.notna(r.get("mcnemar_p")):
        sign += f"; {r['right_to_wrong']:g} right→wrong, {r['wrong_to_right']:g} wrong→right, McNemar p {r['mcnemar_p']:.2g}"
    return f"{score} ({'≈ ' if r['within_noise'] else ''}{sign})"


def forgetting_cell(r: pd.Series) -> str:
    """The arm's task forgetting as a table cell: mean change in points ± seed std [95% CI]; — when not measured."""
    value = r.get("task_forgetting_pts")
    if value is None or pd.isna(value):
        return "—"
    text = f"{value:+.1f}"
    if not pd.isna(r.get("task_forgetting_std", float("nan"))):
        text += f" ± {r['task_forgetting_std']:.1f}"
    text += f" [{r['task_forgetting_ci_low']:+.1f}, {r['task_forgetting_ci_high']:+.1f}]"
    return ("≈ " if r["task_forgetting_within_noise"] else "") + text


def task_lines(per_task: pd.DataFrame, refs: list[TaskRef], failed: dict[str, str], order: list[str]) -> list[str]:
    """The report's table of tasks: one row per model, one column per task (score, then the change)."""
    lines = []
    if len(per_task):
        shown = [r for r in refs if r.name in set(per_task.task)]
        head = [f"{r.name} ({r.metric}, {r.num_fewshot}-shot, n={r.examples})" for r in shown]
        lines += ["| model | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(shown)]
        for arm in ["base", *order]:
            cells = []
            for r in shown:
                row = per_task[(per_task.arm == arm) & (per_task.task == r.name)]
                cells.append(_cell(row.iloc[0], unit(r)) if len(row) else "—")
            if any(c != "—" for c in cells):
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines += ["", "Scores are lm-eval's (accuracy and other shares in %, other metrics such as bits per byte as "
                  "lm-eval gives them); the change against the base is in points for a share, in % for a "
                  "perplexity task, in the metric's units otherwise; ± the standard deviation over seeds; [..] the "
                  f"95% paired bootstrap interval over examples ({stats.RESAMPLES} resamples). ≈ marks a change within "
                  "noise by the same rule as the perplexity table. Task forgetting in the table above is the mean "
                  "change over the accuracy tasks (Biderman et al. 2024 take the same mean over HellaSwag, "
                  "ARC-Challenge and WinoGrande). For a task scored right or wrong per example, the examples that "
                  "went right→wrong and wrong→right against the base (paired) and McNemar's exact test on them "
                  "(with several seeds: mean counts and the largest p)."]
    for what, why in failed.items():
        lines += ["", f"- FAILED {what}: {why}"]
    return lines


def whole_documents(documents: pd.DataFrame) -> pd.DataFrame:
    """Rows of a per-example table of a `corpus: general` task whose document ftstudy scored whole."""
    return documents[documents["ftstudy_whole"]]


def cross_check(results: list[dict[str, Any]], refs: list[TaskRef], evals: list[dict[str, Any]],
                max_length: int | None = None) -> list[str]:
    """For a perplexity task on the study's general documents: lm-eval's and ftstudy's bits per byte of each
    model on the same documents (those ftstudy's general perplexity scored whole), and their changes."""
    lines = []
    general = {(e["arm"], e.get("seed")): e for e in evals if e["set"] == "general"}
    for ref in (r for r in refs if r.corpus == "general" and r.perplexity_like):
        rows = []
        for res in (r for r in results if r["task"] == ref.name):
            ev = general.get((res["arm"], res.get("seed")))
            if ev is None:
                continue
            mine = whole_documents(pd.read_parquet(res["samples_path"]))
            ours = pd.read_parquet(ev["docs"]).set_index("doc").loc[mine["ftstudy_doc"]]
            theirs_bpb = float(bits_per_byte(mine["loglikelihood"].sum(), mine["bytes"].sum()))
            ours_bpb = float(ours["nll_sum"].sum() / ours["n_bytes"].sum() / math.log(2))
            rows.append({"model": res["label"], "docs": len(mine), "ftstudy": ours_bpb, "lm_eval": theirs_bpb})
        if not rows:
            continue
        base = next((r for r in rows if r["model"] == "base"), None)
        lines += ["", f"**Cross-check, {ref.name} on the study's general documents**: bits per byte of each model on the "
                  f"{rows[0]['docs']} documents ftstudy's general perplexity scored whole.", "",
                  "| model | ftstudy bits/byte | lm-eval bits/byte | lm-eval / ftstudy | Δ ftstudy | Δ lm-eval |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            d1 = f"{100 * (r['ftstudy'] / base['ftstudy'] - 1):+.2f}%" if base else "—"
            d2 = f"{100 * (r['lm_eval'] / base['lm_eval'] - 1):+.2f}%" if base else "—"
            lines.append(f"| {r['model']} | {r['ftstudy']:.4f} | {r['lm_eval']:.4f} | {r['lm_eval'] / r['ftstudy']:.4f} "
                         f"| {d1} | {d2} |")
        lines += ["", "The two differ by design, not by error: ftstudy scores the documents as one stream in windows of "
                  "chunk_len tokens without overlap (a token early in a window sees little context; text of the "
                  "previous document can be context) and counts the bytes of the text it scores, separators "
                  "included; lm-eval scores each document alone in rolling windows of "
                  f"{f'{max_length} tokens (benchmarks.max_length)' if max_length else 'the model’s full context'}, "
                  "predicts its first token from the end-of-text token, scores the detokenized page (wikitext's "
                  "detokenizer) but divides by the bytes of the original page. The changes against the base are "
                  "what the study compares; they should agree in sign and roughly in size."]
    return lines


def has_task_forgetting(bench: dict[str, Any] | None) -> bool:
    """Whether some arm has a task forgetting (an accuracy task scored on the base and on it): the report then
    draws the task frontier."""
    if not bench:
        return False
    accuracy = {t["name"] for t in bench["tasks"] if unit(TaskRef.model_validate(t)) == "pts"}
    on_base = {r["task"] for r in bench["results"] if r["arm"] == "base"} & accuracy
    return any(r["arm"] != "base" and r["task"] in on_base for r in bench["results"])


def write(bench: dict[str, Any] | None, evals: list[dict[str, Any]], root: Path, order: list[str],
          max_length: int | None = None) -> dict[str, Any] | None:
    """The benchmark part of the report: {"table": per-arm columns for table.parquet, "lines": the report
    section, "tasks": per task and model}; None when the study has no tasks."""
    if not bench or not bench.get("tasks"):
        return None
    refs = [TaskRef.model_validate(t) for t in bench["tasks"]]
    results = [{**r, "samples_path": root / r["samples"]} for r in bench["results"]]
    table, per_task = analyse(results, refs, order)
    lines = task_lines(per_task, refs, bench.get("failed") or {}, order)
    lines += cross_check(results, refs, [{**e, "docs": root / e["docs"]} if isinstance(e["docs"], str) else e
                                         for e in evals], max_length)
    return {"table": table, "lines": lines, "tasks": per_task}
