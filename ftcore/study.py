"""The study's steps as plain functions: paths and fingerprints in, small dicts out.

Each step writes under `<artifacts_dir>/<step>/<key>/`, where the key hashes what the step depends
on: content fingerprints of its inputs, the config fields it reads and the code version. The same
key is the Prefect cache key (tasks/), so a cached result always points at an artifact made from
the same inputs, and a changed input lands in a new directory instead of overwriting.
`run_study` chains the steps without Prefect.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ftcore import chunking, corpora, models, perplexity, report, training
from ftcore.config import StudyConfig
from ftcore.io import step_lock, verify_manifest, write_json, write_manifest, write_parquet

log = logging.getLogger("ftcore.study")
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "tokenizers")


class StudyError(ValueError):
    """Input the study cannot run with; raised before expensive work."""


# --- keys --------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of ftcore's source and the versions of the libraries that compute results."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for lib in LIBRARIES:
        h.update(f"{lib}=={importlib.metadata.version(lib)}".encode())
    return h.hexdigest()[:16]


def step_key(step: str, cfg: StudyConfig, fields: tuple[str, ...], **inputs: Any) -> str:
    """Key of a step: its name, the config fields it reads, its inputs' keys, the code version."""
    payload = {"step": step, "fields": cfg.fingerprint_fields(*fields), "inputs": inputs, "code": code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def step_dir(cfg: StudyConfig, step: str, key: str) -> Path:
    return Path(cfg.artifacts_dir).expanduser() / step / key


# --- run a step once per key ---------------------------------------------------------------------

RESULT = "result.json"
TIMING = "timing.json"


def run_once(out: Path, files: list[str], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Return the step's recorded result when its directory verifies, else compute it.

    A lock per directory makes concurrent runs of the same study wait for each other instead of
    writing the same files; the manifest (checksums, written last) makes an unfinished, edited or
    truncated artifact a miss, so it is recomputed and never read as whole.
    """
    with step_lock(out):
        if verify_manifest(out):
            return json.loads((out / RESULT).read_text())
        if out.exists():
            log.info("%s: no valid manifest (unfinished, or changed on disk): computing it again", out)
        started = time.perf_counter()
        result = compute()
        # The step's own compute time: what orchestration overhead is measured against (bench/flow.py).
        write_json({"seconds": round(time.perf_counter() - started, 3)}, out / TIMING)
        write_json(result, out / RESULT)
        write_manifest(out, [*files, TIMING, RESULT])
        return result


def is_done(out: str | Path) -> bool:
    """Whether a step directory holds a finished, unmodified result."""
    return verify_manifest(out)


# --- checks before any expensive work ----------------------------------------------------------

def check_artifacts_dir(cfg: StudyConfig) -> Path:
    root = Path(cfg.artifacts_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise StudyError(f"artifacts_dir: {root} is not writable ({exc.strerror}); choose a writable directory") from None
    return root


def check_model_fits(cfg: StudyConfig, model_dir: str | Path) -> None:
    limit = models.max_context(model_dir)
    if limit is not None and cfg.chunk_len > limit:
        raise StudyError(f"chunk_len: {cfg.chunk_len} tokens exceed the model's context of {limit}; lower chunk_len")


def check_replay_budget(cfg: StudyConfig, domain: dict[str, Any], replay: dict[str, Any] | None) -> None:
    """Enough replay tokens for every arm's replay_ratio, checked before any training starts."""
    replaying = [a for a in cfg.arm_specs if a.replay_ratio > 0]
    if not replaying or replay is None:
        return
    greediest = max(replaying, key=lambda a: a.replay_ratio)  # the largest ratio needs the most replay tokens
    try:
        training.build_training_mix(pd.read_parquet(domain["train"], columns=["input_ids", "completion_mask"]),
                                    pd.read_parquet(replay["path"], columns=["input_ids", "completion_mask"]),
                                    greediest.replay_ratio, cfg.train.seed)
    except training.ReplayBudgetError as exc:
        raise training.ReplayBudgetError(f"arm {greediest.name}: {exc}") from None


# --- steps -------------------------------------------------------------------------------------

def fetch_model(cfg: StudyConfig) -> dict[str, str]:
    """Local model directory and its content fingerprint."""
    path = models.fetch_model(cfg.model, check_artifacts_dir(cfg))
    return {"path": str(path), "fingerprint": models.model_fingerprint(path)}


def _corpus(cfg: StudyConfig, role: str) -> corpora.Corpus:
    spec = getattr(cfg, role)
    return corpora.load_corpus(spec, role, cfg.format if role == "domain" else None)


def fingerprint_corpus(cfg: StudyConfig, role: str) -> str:
    """Content fingerprint of one corpus (domain, general, replay) as the study would use it."""
    corpus = _corpus(cfg, role)
    if role == "domain":
        corpora.split_train_test(corpus, cfg.test_docs, cfg.split_seed)  # fail early on a too-large split
    return corpus.fingerprint


def domain_key(cfg: StudyConfig, model: dict[str, str], corpus_fp: str) -> str:
    return step_key("tokenize-domain", cfg, ("domain", "test_docs", "split_seed", "format", "chunk_len"),
                    model=model["fingerprint"], corpus=corpus_fp)


def tokenize_domain(cfg: StudyConfig, model: dict[str, str], corpus_fp: str) -> dict[str, Any]:
    key = domain_key(cfg, model, corpus_fp)
    out = step_dir(cfg, "tokenize-domain", key)
    return run_once(out, ["train.parquet", "test.parquet", "stats.json"],
                    lambda: _tokenize_domain(cfg, model, key, out))


def _tokenize_domain(cfg: StudyConfig, model: dict[str, str], key: str, out: Path) -> dict[str, Any]:
    tokenizer = models.load_tokenizer(model["path"])
    train, test = corpora.split_train_test(_corpus(cfg, "domain"), cfg.test_docs, cfg.split_seed)
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
    write_json(stats, out / "stats.json")
    return {"key": key, "train": str(out / "train.parquet"), "test": str(out / "test.parquet"), "stats": stats}


def stream_key(cfg: StudyConfig, role: str, model: dict[str, str], corpus_fp: str) -> str:
    return step_key(f"tokenize-{role}", cfg, (role, "chunk_len", "general_separator"),
                    model=model["fingerprint"], corpus=corpus_fp)


def tokenize_stream(cfg: StudyConfig, role: str, model: dict[str, str], corpus_fp: str) -> dict[str, Any]:
    """The general benchmark or the replay corpus as language-modelling chunks."""
    key = stream_key(cfg, role, model, corpus_fp)
    out = step_dir(cfg, f"tokenize-{role}", key)
    return run_once(out, ["chunks.parquet", "docs.parquet"], lambda: _tokenize_stream(cfg, role, model, key, out / "chunks.parquet"))


def _tokenize_stream(cfg: StudyConfig, role: str, model: dict[str, str], key: str, out: Path) -> dict[str, Any]:
    corpus = _corpus(cfg, role)
    texts = corpora.document_texts(corpus, getattr(cfg, role).text_fields)
    df, st = chunking.tokenize_lm(texts, models.load_tokenizer(model["path"]), cfg.chunk_len, cfg.general_separator)
    if df.empty:
        raise StudyError(f"{role}: nothing left after tokenizing ({st.skipped} documents under 2 tokens)")
    write_parquet(df, out)
    titles = corpora.document_titles(corpus, getattr(cfg, role).text_fields)
    write_parquet(pd.DataFrame({"doc": range(len(titles)), "title": titles}), out.with_name("docs.parquet"))
    log.info("tokenize-%s: %s", role, st.as_dict())
    return {"key": key, "path": str(out), "docs": str(out.with_name("docs.parquet")), "stats": st.as_dict()}


def arm_key(cfg: StudyConfig, arm: str, model: dict[str, str], domain: dict[str, Any],
            replay: dict[str, Any] | None) -> str:
    """Key of one arm at cfg.train.seed: the arm's own spec (LoRA settings resolved), never the other arms."""
    spec = cfg.arm(arm)
    return step_key(f"train-{arm}", cfg, ("train", "chunk_len", "precision"), arm=cfg.resolved_arm(spec), model=model["fingerprint"],
                    domain=domain["key"], replay=replay["key"] if spec.replay_ratio > 0 and replay else None)


def train_arm(cfg: StudyConfig, arm: str, model: dict[str, str], domain: dict[str, Any],
              replay: dict[str, Any] | None, callbacks: list | None = None, key: str | None = None) -> dict[str, Any]:
    """Train one arm at cfg.train.seed in its keyed directory (`key` as computed by the caller, e.g. a parent process)."""
    spec = cfg.arm(arm)
    key = key or arm_key(cfg, arm, model, domain, replay)
    out = step_dir(cfg, f"train-{arm}", key)
    seed = cfg.train.seed

    def compute() -> dict[str, Any]:
        summary = training.train_arm(cfg, arm, model["path"], domain["train"], out, callbacks=callbacks,
                                     replay_path=replay["path"] if spec.replay_ratio > 0 and replay else None)
        return {"key": key, "arm": arm, "seed": seed, "dir": str(out), "summary": summary}

    # Checkpoints stay out of the manifest: they are resume points, not results.
    lora = spec.method == "lora"
    files = ["adapter" if lora else "model", "train_log.jsonl", training.SUMMARY]
    if lora and cfg.lora_of(spec).merge:
        files.append("model")
    return run_once(out, files, compute)


def eval_key(cfg: StudyConfig, model: dict[str, str], data: dict[str, Any], which: str,
             arm: dict[str, Any] | None = None) -> str:
    name = arm["arm"] if arm else "base"
    return step_key(f"eval-{name}-{which}", cfg, ("eval", "chunk_len"), model=model["fingerprint"],
                    arm=arm["key"] if arm else None, data=data["key"])


def evaluate(cfg: StudyConfig, model: dict[str, str], data: dict[str, Any], which: str,
             arm: dict[str, Any] | None = None, device: str | None = None) -> dict[str, Any]:
    """Perplexity of the base model (arm=None) or a trained arm on `which` (domain or general)."""
    name = arm["arm"] if arm else "base"
    key = eval_key(cfg, model, data, which, arm)
    out = step_dir(cfg, f"eval-{name}-{which}", key)
    return run_once(out, ["scores.parquet", "docs.parquet", "summary.json"],
                    lambda: _evaluate(cfg, model, data, which, arm, device, key, out))


def _evaluate(cfg: StudyConfig, model: dict[str, str], data: dict[str, Any], which: str,
              arm: dict[str, Any] | None, device: str | None, key: str, out: Path) -> dict[str, Any]:
    name = arm["arm"] if arm else "base"
    device = device or training.resolve_device(cfg.device)
    frame = pd.read_parquet(data["test"] if which == "domain" else data["path"])
    if which == "domain":
        rows = perplexity.domain_rows(frame)
        # Instruction rows are one document each; lm rows are chunks of a stream, split by token.
        token_docs = (list(zip(map(np.asarray, frame["token_docs"]), map(np.asarray, frame["token_bytes"])))
                      if "token_docs" in frame else None)
    else:
        window = (cfg.chunk_len, cfg.eval.stride, cfg.eval.max_general_tokens)
        rows = perplexity.stream_windows(frame, *window)
        token_docs = perplexity.stream_token_docs(frame, *window)
    net = training.load_arm_model(arm["dir"], model["path"], device) if arm else models.load_model(model["path"], device=device)
    tokenizer = models.load_tokenizer(model["path"])
    scores = perplexity.score_rows(net, rows, cfg.eval.batch_size, tokenizer.pad_token_id, cfg.eval.precision,
                                   label=f"eval-{name}-{which}", keep_tokens=token_docs is not None)
    del net
    docs = perplexity.document_scores(scores, token_docs=token_docs,
                                      row_docs=None if token_docs is not None else frame["doc"])
    write_parquet(scores, out / "scores.parquet")
    write_parquet(docs, out / "docs.parquet")
    summary = perplexity.summarize(scores)
    write_json(summary, out / "summary.json")
    log.info("eval-%s-%s: ppl %.3f, bits/byte %.4f over %d tokens", name, which, summary["ppl"], summary["bpb"], summary["tokens"])
    return {"key": key, "arm": name, "seed": arm["seed"] if arm else None, "set": which,
            "scores": str(out / "scores.parquet"), "docs": str(out / "docs.parquet"),
            "titles": data.get("docs"), **summary}


def report_key(cfg: StudyConfig, evals: list[dict[str, Any]], failed: dict[str, str] | None = None) -> str:
    # arms: their order and methods shape the report (rows, the LoRA checks), not only the evaluations.
    return step_key("report", cfg, ("name", "arms"), evals=sorted(e["key"] for e in evals), failed=failed or {})


def write_results(cfg: StudyConfig, evals: list[dict[str, Any]], arms: list[dict[str, Any]],
                  failed: dict[str, str] | None = None) -> dict[str, Any]:
    """The table, report and plots from every evaluation; keyed by the evaluations it joins.

    `failed` maps an arm that did not finish to its error; the report lists it instead of a row.
    """
    key = report_key(cfg, evals, failed)
    out = step_dir(cfg, "report", key)
    files = ["table.parquet", "runs.parquet", "general_docs.parquet", "table.md", "report.md", "perplexity.png",
             "frontier.png"] + (["loss.png"] if arms else [])
    return run_once(out, files, lambda: _write_results(cfg, evals, arms, failed, key, out))


def _write_results(cfg: StudyConfig, evals: list[dict[str, Any]], arms: list[dict[str, Any]],
                   failed: dict[str, str] | None, key: str, out: Path) -> dict[str, Any]:
    logs = {cfg.run_label(a["arm"], a["seed"]): Path(a["dir"]) / "train_log.jsonl" for a in arms}
    details = {"config": cfg.name, "artifacts": str(Path(cfg.artifacts_dir).resolve()),
               "seeds": ", ".join(map(str, cfg.run_seeds)),
               **{f"model ({cfg.run_label(a['arm'], a['seed'])})": a["dir"] for a in arms}}
    details.update({f"FAILED arm {arm}": why for arm, why in (failed or {}).items()})
    titles = next((e.get("titles") for e in evals if e["set"] == "general" and e.get("titles")), None)
    # Only arms whose every seed finished are compared: a partial arm would mix seeds unevenly.
    broken = {a for a in cfg.arm_names for seed in cfg.run_seeds if cfg.run_label(a, seed) in (failed or {})}
    done = [e for e in evals if e["arm"] not in broken]
    paths = report.write_report(done, out, cfg.name, logs, details, order=cfg.arm_names,
                                methods={a.name: a.method for a in cfg.arm_specs},
                                titles=pd.read_parquet(titles) if titles else None)
    return {"key": key, **paths}


def mark_latest(cfg: StudyConfig, results: dict[str, Any]) -> Path:
    """Record the newest report of this artifacts root (what `ftstudy show` prints)."""
    return write_json(results, Path(cfg.artifacts_dir).expanduser() / "latest.json")


# --- corpus change detection (what a scheduled check compares) -------------------------------------

def corpus_roles(cfg: StudyConfig) -> list[str]:
    """The corpora this study reads: domain, general, and replay when an arm mixes replay text in."""
    return ["domain", "general"] + (["replay"] if any(a.replay_ratio > 0 for a in cfg.arm_specs) else [])


def corpus_versions(cfg: StudyConfig) -> dict[str, str]:
    """Cheap identity of every corpus source now: a file's sha256 or a Hub dataset's commit."""
    return {role: corpora.source_version(getattr(cfg, role), role) for role in corpus_roles(cfg)}


def _corpus_state_path(cfg: StudyConfig) -> Path:
    # One record per set of corpus sources, so studies sharing an artifacts root do not mix.
    specs = {role: getattr(cfg, role).model_dump(mode="json") for role in corpus_roles(cfg)}
    digest = hashlib.sha256(json.dumps(specs, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.artifacts_dir).expanduser() / "corpus-state" / f"{cfg.name}-{digest}.json"


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


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Every step in order, without Prefect: fetch, tokenize, baseline, arms, final evals, report."""
    check_artifacts_dir(cfg)
    versions = corpus_versions(cfg)
    fps = {role: fingerprint_corpus(cfg, role) for role in corpus_roles(cfg)}
    model = fetch_model(cfg)
    check_model_fits(cfg, model["path"])
    domain = tokenize_domain(cfg, model, fps["domain"])
    general = tokenize_stream(cfg, "general", model, fps["general"])
    replay = tokenize_stream(cfg, "replay", model, fps["replay"]) if "replay" in corpus_roles(cfg) else None
    check_replay_budget(cfg, domain, replay)
    evals = [evaluate(cfg, model, domain, "domain"), evaluate(cfg, model, general, "general")]
    arms = [train_arm(cfg.with_seed(seed), arm, model, domain, replay) for seed in cfg.run_seeds for arm in cfg.arm_names]
    for arm in arms:
        evals += [evaluate(cfg, model, domain, "domain", arm), evaluate(cfg, model, general, "general", arm)]
    results = write_results(cfg, evals, arms)
    mark_latest(cfg, results)
    record_corpus_versions(cfg, versions)
    return results
