"""The study's steps: for each, where its result lives (`*_dir`) and how it is computed.

A step writes under `<artifacts root>/<step>/<key>/` (ftcore.keys: the key hashes what the step
reads and the code that computes it). The directory is the one truth of "is this step done": it is
done when its manifest (checksums of its files, written last) verifies; then `recorded` returns
its result.json and nothing is computed again. Every other cache (Prefect's Cached state in
tasks/) is derived from that.

Results are small JSON dicts. Paths in them are relative to the artifacts root, and every result
carries `digest`, the content identity of the files later steps read, which is what their keys
hash — so a step that recomputes to the same bytes leaves everything below it cached.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ftcore import benchmarks, cards, chunking, corpora, curves, forgetting, models, perplexity, report, sources, training
from ftcore.config import InputError, StudyConfig, config_yaml
from ftcore.io import (atomic_path, entries_digest, file_entries, hash_dir, step_lock, verify_manifest, write_json,
                       write_manifest, write_parquet, write_text)
from ftcore.keys import step_key
from ftcore.plan import ArmPlan, ModelRef

log = logging.getLogger("ftcore.steps")
RESULT = "result.json"
TIMING = "timing.json"
# Config fields that say where a study runs and stores things, not what it measures.
WHERE = ("artifacts_dir", "executor", "train_deployment", "report_to")


class StudyError(InputError):
    """Input the study cannot run with, found by a step; raised before expensive work."""


@dataclass(frozen=True)
class Step:
    """A step: its name, where the result of given inputs lives, and how it is computed.

    `where` and `run` take the same arguments; `where` is cheap (no model, no data is loaded).
    """

    name: str
    where: Callable[..., Path]
    run: Callable[..., dict[str, Any]]


# --- run a step once per key ---------------------------------------------------------------------

def recorded(out: str | Path) -> dict[str, Any] | None:
    """The step's result when its directory holds a finished, unmodified result; None otherwise."""
    out = Path(out)
    if not verify_manifest(out):
        return None
    return json.loads((out / RESULT).read_text())


def run_once(out: Path, compute: Callable[[], dict[str, Any]], outputs: Sequence[str],
             extras: Sequence[str] = ()) -> dict[str, Any]:
    """Return the step's recorded result when its directory verifies, else compute and record it.

    `outputs` are the files later steps read (their checksums make the result's `digest`, unless
    `compute` sets one); `extras` are kept and checked but do not change the digest (logs, stats).
    A lock per directory makes concurrent runs of the same study wait for each other instead of
    writing the same files; the manifest, written last, makes an unfinished, edited or truncated
    artifact a miss, so it is recomputed and never read as whole.
    """
    with step_lock(out):
        if (done := recorded(out)) is not None:
            return done
        if out.exists():
            log.info("%s: no valid manifest (unfinished, or changed on disk): computing it again", out)
        started = time.perf_counter()
        result = compute()
        # The step's own compute time: what orchestration overhead is measured against (bench/flow.py).
        write_json({"seconds": round(time.perf_counter() - started, 3)}, out / TIMING)
        hashed = file_entries(out, list(outputs))
        result.setdefault("digest", entries_digest(hashed))
        write_json(result, out / RESULT)
        write_manifest(out, [*extras, TIMING, RESULT], known=hashed)
        return result


def root_of(cfg: StudyConfig) -> Path:
    return Path(cfg.artifacts_dir)


def relative(cfg: StudyConfig, path: Path) -> str:
    """A path under the artifacts root as stored in results: relative to the root."""
    return str(Path(path).relative_to(root_of(cfg)))


# --- fingerprint a corpus ------------------------------------------------------------------------

def fingerprint_dir(cfg: StudyConfig, role: str) -> Path:
    spec = getattr(cfg, role)
    reads = {"corpus": spec.model_dump(mode="json"), "source": corpora.source_version(spec, role),
             "format": cfg.format.model_dump(mode="json") if role == "domain" else None}
    return root_of(cfg) / f"fingerprint-{role}" / step_key("fingerprint", reads, (fingerprint_corpus,))


def fingerprint_corpus(cfg: StudyConfig, role: str) -> dict[str, Any]:
    """Content fingerprint (`digest`) and document count of one corpus (domain, general, replay) as the
    study reads it. Raises CorpusError for a missing, unreadable or empty corpus."""
    def compute() -> dict[str, Any]:
        corpus = corpora.load_corpus(getattr(cfg, role), role, cfg.format if role == "domain" else None)
        return {"digest": corpus.fingerprint, "documents": len(corpus)}

    return run_once(fingerprint_dir(cfg, role), compute, outputs=[])


# --- fetch the base model --------------------------------------------------------------------------

def fetch_dir(cfg: StudyConfig) -> Path:
    reads = {"model": cfg.model.model_dump(mode="json"), "source": sources.source_version(cfg.model)}
    return root_of(cfg) / "fetch-model" / step_key("fetch-model", reads, (fetch_model,))


def fetch_model(cfg: StudyConfig) -> dict[str, Any]:
    """The base model as a ModelRef (dict): a built model inside this step's directory, a Hub or local
    model where it is; `digest` is the content of its files. Raises ModelError for a bad source."""
    out = fetch_dir(cfg)
    spec = cfg.model
    built = spec.source in sources.BUILT

    def compute() -> dict[str, Any]:
        revision = sources.hub_commit(spec.name, spec.revision, "model", "model.name") if spec.source == "hub" else None
        if built:  # written into this step's directory; run_once adds the digest of its files
            with atomic_path(out / "model") as tmp:
                sources.fetch_model(spec, tmp)
            return {"source": spec.source, "name": spec.name, "revision": None, "path": relative(cfg, out / "model"),
                    "base_model": sources.base_model_id(spec) if spec.source != "tiny-random" else None}
        path = sources.fetch_model(spec, out, revision)
        return ModelRef(source=spec.source, name=spec.name, revision=revision, path=str(path.resolve()),
                        digest=hash_dir(path), base_model=spec.name if spec.source == "hub" else None).model_dump()

    return run_once(out, compute, outputs=["model"] if built else [])


# --- tokenize ------------------------------------------------------------------------------------

def tokenize_domain_dir(cfg: StudyConfig, model: ModelRef, corpus: dict[str, Any]) -> Path:
    reads = {"corpus": corpus["digest"], "text_fields": cfg.domain.text_fields, "format": cfg.format.model_dump(mode="json"),
             "test_docs": cfg.test_docs, "split_seed": cfg.split_seed, "chunk_len": cfg.chunk_len,
             "separator": cfg.general_separator, "model": model.digest}
    return root_of(cfg) / "tokenize-domain" / step_key("tokenize", reads, (tokenize_domain,))


def tokenize_domain(cfg: StudyConfig, model: ModelRef, corpus: dict[str, Any]) -> dict[str, Any]:
    """The domain corpus split into training and held-out rows (train.parquet, test.parquet).

    Raises StudyError when no row has a completion token within chunk_len.
    """
    out = tokenize_domain_dir(cfg, model, corpus)

    def compute() -> dict[str, Any]:
        tokenizer = models.load_tokenizer(model.locate(root_of(cfg)))
        whole = corpora.load_corpus(cfg.domain, "domain", cfg.format)
        train, test = corpora.split_train_test(whole, cfg.test_docs, cfg.split_seed)
        stats = {}
        for name, part in (("train", train), ("test", test)):
            if cfg.format.kind == "instruction":
                df, st = chunking.tokenize_instruction(part.records, cfg.format, tokenizer, cfg.chunk_len)
            else:
                texts = corpora.document_texts(part, cfg.domain.text_fields)
                df, st = chunking.tokenize_lm(texts, tokenizer, cfg.chunk_len, cfg.general_separator)
            if df.empty:
                raise StudyError(f"domain: no {name} example left after tokenizing: all {st.skipped} have no completion "
                                 "token within chunk_len; raise chunk_len or shorten format.prompt_template")
            write_parquet(df, out / f"{name}.parquet")
            stats[name] = st.as_dict()
            log.info("tokenize-domain %s: %s", name, st.as_dict())
            if note := report.truncation_note(f"domain {name}", stats[name], cfg.chunk_len):
                log.warning(note)
            if st.merged_boundary:
                log.warning("tokenize-domain %s: in %d examples the prompt's tokens are not a prefix of prompt + "
                            "completion's; their completion starts where the two diverge (as in TRL)", name,
                            st.merged_boundary)
        write_json(stats, out / "stats.json")
        return {"train": relative(cfg, out / "train.parquet"), "test": relative(cfg, out / "test.parquet"),
                "stats": stats}

    return run_once(out, compute, outputs=["train.parquet", "test.parquet"], extras=["stats.json"])


def tokenize_stream_dir(cfg: StudyConfig, role: str, model: ModelRef, corpus: dict[str, Any]) -> Path:
    reads = {"corpus": corpus["digest"], "text_fields": getattr(cfg, role).text_fields, "chunk_len": cfg.chunk_len,
             "separator": cfg.general_separator, "model": model.digest}
    return root_of(cfg) / f"tokenize-{role}" / step_key("tokenize", reads, (tokenize_stream,))


def tokenize_stream(cfg: StudyConfig, role: str, model: ModelRef, corpus: dict[str, Any]) -> dict[str, Any]:
    """The general benchmark or the replay corpus as one token stream in chunk_len rows (chunks.parquet),
    with each document's title (docs.parquet). Raises StudyError when nothing is left to score."""
    out = tokenize_stream_dir(cfg, role, model, corpus)

    def compute() -> dict[str, Any]:
        spec = getattr(cfg, role)
        whole = corpora.load_corpus(spec, role)
        texts = corpora.document_texts(whole, spec.text_fields)
        tokenizer = models.load_tokenizer(model.locate(root_of(cfg)))
        df, st = chunking.tokenize_lm(texts, tokenizer, cfg.chunk_len, cfg.general_separator)
        if df.empty:
            raise StudyError(f"{role}: nothing left after tokenizing ({st.skipped} documents under 2 tokens)")
        write_parquet(df, out / "chunks.parquet")
        titles = corpora.document_titles(whole, spec.text_fields)
        write_parquet(pd.DataFrame({"doc": range(len(titles)), "title": titles}), out / "docs.parquet")
        log.info("tokenize-%s: %s", role, st.as_dict())
        return {"path": relative(cfg, out / "chunks.parquet"), "docs": relative(cfg, out / "docs.parquet"),
                "stats": st.as_dict()}

    return run_once(out, compute, outputs=["chunks.parquet", "docs.parquet"])


# --- train an arm --------------------------------------------------------------------------------

def train_dir(plan: ArmPlan, root: str | Path) -> Path:
    return Path(root) / plan.dir


def train_arm(plan: ArmPlan, root: str | Path, callbacks: list | None = None,
              on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the planned arm in its directory under `root` (resuming from a checkpoint); return where it is.

    Checkpoints stay out of the manifest: they are resume points, not results.
    """
    def compute() -> dict[str, Any]:
        summary = training.train_arm(plan, root, callbacks=callbacks, on_progress=on_progress)
        return {"key": plan.key, "arm": plan.name, "label": plan.label, "seed": plan.seed, "method": plan.method,
                "dir": plan.dir, "summary": summary,
                "curves": f"{plan.dir}/{curves.FRAME}" if plan.curve else None}

    if not training.is_main_process():
        # The arm's other processes (torchrun, train.devices_per_arm > 1) train beside the first, which
        # alone takes the step's lock and records its result.
        return recorded(train_dir(plan, root)) or compute()
    curve_files = [curves.LOG, curves.FRAME] if plan.curve else []
    return run_once(train_dir(plan, root), compute, outputs=plan.outputs(),
                    extras=["train_log.jsonl", training.SUMMARY, *curve_files])


# --- evaluate ------------------------------------------------------------------------------------

def evaluate_dir(cfg: StudyConfig, model: ModelRef, data: dict[str, Any], which: str,
                 arm: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> Path:
    reads = {"eval": cfg.eval.model_dump(mode="json"), "chunk_len": cfg.chunk_len, "set": which,
             "model": model.digest, "arm": arm["digest"] if arm else None, "data": data["digest"],
             "base": base["digest"] if base and base.get("reference") else None}
    name = arm["arm"] if arm else "base"
    return root_of(cfg) / f"eval-{name}-{which}" / step_key("evaluate", reads, (evaluate,))


def evaluate(cfg: StudyConfig, model: ModelRef, data: dict[str, Any], which: str,
             arm: dict[str, Any] | None = None, base: dict[str, Any] | None = None,
             device: str | None = None) -> dict[str, Any]:
    """Perplexity and bits per byte of the base model (arm=None) or a trained arm on `which` (domain or
    general), with per-row (scores.parquet) and per-document (docs.parquet) NLL.

    On the general set with eval.kl_top_k > 0, the base's evaluation also stores its top-k
    log-probabilities per token (reference.npz), and an arm's, given that evaluation as `base`, adds
    `kl`: the mean KL(base ‖ arm) per token in nats (per document in docs.parquet).
    """
    out = evaluate_dir(cfg, model, data, which, arm, base)
    label = arm["label"] if arm else "base"

    def compute() -> dict[str, Any]:
        root = root_of(cfg)
        frame = pd.read_parquet(root / (data["test"] if which == "domain" else data["path"]))
        if which == "domain":
            rows = perplexity.domain_rows(frame)
            # Instruction rows are one document each; lm rows are chunks of a stream, split by token.
            token_docs = (list(zip(map(np.asarray, frame["token_docs"]), map(np.asarray, frame["token_bytes"])))
                          if "token_docs" in frame else None)
        else:
            window = (cfg.chunk_len, cfg.eval.stride, cfg.eval.max_general_tokens)
            rows = perplexity.stream_windows(frame, *window)
            token_docs = perplexity.stream_token_docs(frame, *window)
        where = device or training.resolve_device(cfg.device)
        base_dir = model.locate(root)
        net = model_to_score(arm, base_dir, root, where)
        tokenizer = models.load_tokenizer(base_dir)
        keeps_reference = which == "general" and arm is None and bool(cfg.eval.kl_top_k)
        reference = read_reference(root / base["reference"]) if base and base.get("reference") and arm else None
        exact = which == "general" and arm is not None and cfg.eval.kl_top_k is None
        scores = perplexity.score_rows(net, rows, cfg.eval.batch_size, tokenizer.pad_token_id, cfg.eval.precision,
                                       label=f"eval-{label}-{which}", keep_tokens=token_docs is not None,
                                       top_k=cfg.eval.kl_top_k if keeps_reference else 0, reference=reference,
                                       reference_logits=base_logits(arm, net, base_dir, where) if exact else None)
        del net
        if keeps_reference:
            write_reference(perplexity.top_k_reference(scores), out / "reference.npz")
            scores = scores.drop(columns=["topk_ids", "topk_logp"])
        docs = perplexity.document_scores(scores, token_docs=token_docs,
                                          row_docs=None if token_docs is not None else frame["doc"])
        write_parquet(scores, out / "scores.parquet")
        write_parquet(docs, out / "docs.parquet")
        summary = perplexity.summarize(scores)
        write_json(summary, out / "summary.json")
        log.info("eval-%s-%s: ppl %.3f, bits/byte %.4f over %d tokens", label, which, summary["ppl"], summary["bpb"],
                 summary["tokens"])
        return {"arm": arm["arm"] if arm else "base", "label": label, "seed": arm["seed"] if arm else None,
                "set": which, "scores": relative(cfg, out / "scores.parquet"), "docs": relative(cfg, out / "docs.parquet"),
                "titles": data.get("docs"), **summary,
                "reference": relative(cfg, out / "reference.npz") if keeps_reference else None}

    outputs = ["scores.parquet", "docs.parquet", "summary.json"]
    if which == "general" and arm is None and cfg.eval.kl_top_k:
        outputs.append("reference.npz")
    return run_once(out, compute, outputs=outputs)


def base_logits(arm: dict[str, Any], net, base_dir: Path, device: str):
    """The base model's logits on a batch, for the exact KL beside the arm being scored: a LoRA arm's own
    model with its adapter switched off (the base's weights, no second model in memory); for a full
    arm, a QLoRA arm (whose adapter-free model is the 4-bit base) and the 4-bit base, the base loaded
    beside it."""
    if arm["method"] == "lora":
        def logits(input_ids, attention_mask):
            with net.disable_adapter():
                return net(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits
    base = models.load_model(base_dir, device=device).eval()
    return lambda input_ids, attention_mask: base(input_ids=input_ids, attention_mask=attention_mask).logits


def write_reference(reference: perplexity.TopK, path: Path) -> Path:
    """Per-row top-k ids and log-probabilities as one npz: rows concatenated, `offsets` where each starts."""
    lengths = [len(ids) for ids, _ in reference]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=np.concatenate([ids for ids, _ in reference]),
                     logp=np.concatenate([lp for _, lp in reference]), offsets=np.cumsum([0, *lengths]))
    return path


def read_reference(path: Path) -> perplexity.TopK:
    with np.load(path) as z:
        ids, logp, offsets = z["ids"], z["logp"], z["offsets"]
    return [(ids[a:b], logp[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


# The base model in 4-bit NF4, scored like an arm when a study has QLoRA arms: the quantization's own cost.
QUANTIZED_BASE = {"arm": "base-nf4", "label": "base-nf4", "seed": 0, "method": "nf4", "digest": "nf4", "dir": None}


def model_to_score(arm: dict[str, Any] | None, base_dir: Path, root: Path, device: str):
    """The model an evaluation scores: the base, the base in 4-bit NF4, or a trained arm as it was trained."""
    if arm is None:
        return models.load_model(base_dir, device=device)
    if arm["method"] == "nf4":
        return models.load_quantized(base_dir, device)
    return models.load_trained(root / arm["dir"], base_dir, device, quantized=arm["method"] == "qlora")


# --- benchmark tasks (lm-evaluation-harness) --------------------------------------------------------

def benchmark_dir(cfg: StudyConfig, model: ModelRef, task: benchmarks.TaskRef, arm: dict[str, Any] | None = None) -> Path:
    spec = cfg.benchmarks
    reads = {"task": task.digest, "metric": task.metric, "num_fewshot": task.num_fewshot, "limit": task.limit,
             "batch_size": spec.batch_size, "max_length": spec.max_length, "seed": spec.seed,
             "precision": cfg.eval.precision, "model": model.digest, "arm": arm["digest"] if arm else None}
    name = arm["arm"] if arm else "base"
    return root_of(cfg) / f"bench-{name}-{task.name}" / step_key("benchmark", reads, (benchmark,))


def benchmark(cfg: StudyConfig, model: ModelRef, task: benchmarks.TaskRef, arm: dict[str, Any] | None = None,
              device: str | None = None) -> dict[str, Any]:
    """One lm-eval task on the base (arm=None), the 4-bit base or a trained arm as it trained (a LoRA arm as
    its adapter on the base): its score and per-example table (samples.parquet)."""
    out = benchmark_dir(cfg, model, task, arm)
    label = arm["label"] if arm else "base"

    def compute() -> dict[str, Any]:
        root = root_of(cfg)
        where = device or training.resolve_device(cfg.device)
        base_dir = model.locate(root)
        net = model_to_score(arm, base_dir, root, where).eval()
        summary, table = benchmarks.run_task(net, models.load_tokenizer(base_dir), task, cfg.benchmarks.batch_size,
                                             cfg.benchmarks.seed, perplexity._autocast(cfg.eval.precision, where),
                                             label=f"bench-{label}-{task.name}", max_length=cfg.benchmarks.max_length)
        write_parquet(table, out / "samples.parquet")
        log.info("bench-%s-%s: %s %.4f over %d examples", label, task.name, task.metric, summary["score"],
                 summary["examples"])
        return {"arm": arm["arm"] if arm else "base", "label": label, "seed": arm["seed"] if arm else None,
                "task": task.name, "metric": task.metric, **summary, "samples": relative(cfg, out / "samples.parquet")}

    return run_once(out, compute, outputs=["samples.parquet"])


# --- the report ------------------------------------------------------------------------------------

def report_dir(cfg: StudyConfig, evals: list[dict[str, Any]], arms: list[dict[str, Any]],
               failed: dict[str, str], data: dict[str, Any] | None = None, model: ModelRef | None = None,
               bench: dict[str, Any] | None = None) -> Path:
    # The report states the whole effective config (config.yaml), so it depends on all of it but
    # the places things run and are stored, which change no number.
    reads = {"config": cfg.model_dump(mode="json", exclude=set(WHERE)), "reference": cfg.reference,
             "evals": sorted([e["label"], e["set"], e["digest"]] for e in evals),
             "trained": sorted(a["dir"] for a in arms), "failed": failed, "data": data,
             "model": model.digest if model else None,
             "bench": {"results": sorted([r["label"], r["task"], r["digest"]] for r in bench["results"]),
                       "failed": bench["failed"]} if bench else None}
    return root_of(cfg) / "report" / step_key("report", reads, (write_results,))


def write_results(cfg: StudyConfig, evals: list[dict[str, Any]], arms: list[dict[str, Any]],
                  failed: dict[str, str], data: dict[str, Any] | None = None,
                  model: ModelRef | None = None, bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """The table, report, plots and a model card per trained arm, from every evaluation.

    `failed` maps an arm run (label) that did not finish to its error, which the report lists
    instead of a row; `data` holds the tokenizing statistics per set (what chunk_len cut); `model`
    is the base model (its license goes into the cards); `bench` the benchmark tasks ({"tasks": TaskRefs,
    "results": BENCHMARK results, "failed": "label/task" -> error}). Each card is also written next to its
    arm's weights (model/ or adapter/README.md).
    """
    out = report_dir(cfg, evals, arms, failed, data, model, bench)
    files = ["table.parquet", "runs.parquet", "general_docs.parquet", "table.md", "report.md", "perplexity.png",
             "frontier.png", "config.yaml"] + (["loss.png", "cards"] if arms else [])
    files += ["curves.png", "path.png"] if any(a.get("curves") for a in arms) else []
    files += ["tasks.parquet"] if bench and bench["results"] else []
    files += ["task_frontier.png"] if benchmarks.has_task_forgetting(bench) else []

    def compute() -> dict[str, Any]:
        root = root_of(cfg)
        logs = {a["label"]: root / a["dir"] / "train_log.jsonl" for a in arms}
        details = {"config": cfg.name, "seeds": ", ".join(map(str, cfg.run_seeds)), "base model": base_line(cfg, model),
                   **{f"model ({a['label']})": a["dir"] for a in arms}}
        details.update({f"FAILED arm {label}": why for label, why in failed.items()})
        titles = next((e.get("titles") for e in evals if e["set"] == "general" and e.get("titles")), None)
        # Only arms whose every seed finished are compared: a partial arm would mix seeds unevenly.
        broken = {a for a in cfg.arm_names for seed in cfg.run_seeds if cfg.run_label(a, seed) in failed}
        done = [{**e, "docs": root / e["docs"]} for e in evals if e["arm"] not in broken]
        # Tokens actually scored (general: after eval.max_general_tokens), from the base model's evaluations.
        base = {e["set"]: e["tokens"] for e in evals if e["arm"] == "base"}
        scored = {"domain test": base.get("domain"), "general": base.get("general")}
        data_seen = {name: {**st, "scored": scored[name]} if scored.get(name) is not None else st
                     for name, st in (data or {}).items()}
        along = forgetting.write(arms, root, out, cfg.forgetting_budget_pct, whole=cfg.eval.curve_tokens is None)
        order = ["base-nf4", *[a for a in cfg.arm_names if a not in broken]]
        tasks = benchmarks.write(bench, done, root, order, cfg.benchmarks.max_length if cfg.benchmarks else None)
        sections = {"Forgetting along training": along["lines"]} if along else {}
        if tasks:
            sections["Benchmark tasks (lm-evaluation-harness)"] = tasks["lines"]
            write_parquet(tasks["tasks"], out / "tasks.parquet")
        paths = report.write_report(done, out, cfg.name, logs, details, order=["base-nf4", *cfg.arm_names],
                                    methods={a.name: a.method for a in cfg.arms} | {"base-nf4": "nf4"},
                                    reference=cfg.reference,
                                    titles=pd.read_parquet(root / titles) if titles else None, data=data_seen,
                                    chunk_len=cfg.chunk_len,
                                    sections=sections or None, more_plots=along.get("plots"),
                                    task_table=tasks["table"] if tasks else None)
        header = ("The effective config of this study (ftstudy run --config config.yaml reruns it); artifacts_dir,\n"
                  "executor, train_deployment and report_to, which change no number, are left at their defaults.")
        where = StudyConfig.model_fields
        write_text(config_yaml(cfg.model_copy(update={k: where[k].default for k in WHERE}), header), out / "config.yaml")
        write_cards(cfg, arms, out, model)
        return {**{name: relative(cfg, Path(path)) for name, path in paths.items()},
                "config": relative(cfg, out / "config.yaml"),
                **({"tasks": relative(cfg, out / "tasks.parquet")} if tasks else {})}

    return run_once(out, compute, outputs=files)


def base_line(cfg: StudyConfig, model: ModelRef | None) -> str:
    """The report's line on the base model: what it is and, where known, its license (a GGUF's terms travel
    with the wheels, not with a model card, so the report names them)."""
    name = (model.base_model if model else None) or (sources.base_model_id(cfg.model) if cfg.model.source == "gguf-wheels"
                                                       else cfg.model.name)
    license_ = cards.base_license(cfg.model, model.locate(root_of(cfg)) if model else None)
    source = f"{cfg.model.source}: {cfg.model.name}"
    if cfg.model.source == "gguf-wheels":
        gguf = sources.gguf_wheels(cfg.model)
        return f"{name} ({source}, dequantized GGUF; license: {gguf.license_name or gguf.license or 'not stated'})"
    if cfg.model.source == "local":
        source = "a local model"
    return f"{name} ({source}{f'; license: {license_}' if license_ else ''})"


def write_cards(cfg: StudyConfig, arms: list[dict[str, Any]], out: Path, model: ModelRef | None) -> None:
    """A model card per finished arm: in the report (cards/<label>.md) and as README.md beside its weights."""
    table, runs = pd.read_parquet(out / "table.parquet"), pd.read_parquet(out / "runs.parquet")
    root = root_of(cfg)
    base_dir = model.locate(root) if model else None
    license_ = cards.base_license(cfg.model, base_dir)
    for arm in arms:
        if arm["arm"] not in set(table.arm):
            continue  # an arm with a failed seed is not in the table
        text = cards.model_card(cfg, arm, table, runs, license_)
        write_text(text, out / "cards" / f"{arm['label']}.md")
        weights = root / arm["dir"] / ("model" if arm["method"] == "full" else "adapter")
        write_text(text, weights / "README.md")


FINGERPRINT = Step("fingerprint", fingerprint_dir, fingerprint_corpus)
FETCH_MODEL = Step("fetch-model", lambda cfg: fetch_dir(cfg), fetch_model)
TOKENIZE_DOMAIN = Step("tokenize-domain", tokenize_domain_dir, tokenize_domain)
TOKENIZE_STREAM = Step("tokenize-stream", tokenize_stream_dir, tokenize_stream)
TRAIN = Step("train", lambda plan, root, *_: train_dir(plan, root), train_arm)
EVALUATE = Step("evaluate", lambda cfg, model, data, which, arm=None, base=None, *_:
                evaluate_dir(cfg, model, data, which, arm, base), evaluate)
BENCHMARK = Step("benchmark", lambda cfg, model, task, arm=None, *_: benchmark_dir(cfg, model, task, arm), benchmark)
REPORT = Step("report", report_dir, write_results)
