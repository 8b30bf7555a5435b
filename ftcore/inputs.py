"""The door: a study's input checked once, before any work, into a frozen `Inputs`; what the steps start from.

`check_inputs` resolves every path once, checks what can be checked without a model (the artifacts
root, the trackers, every corpus and model source, the multi-device rules) and computes the
sources' versions once: later code trusts the Inputs instead of asking again. The checks that need
the fetched model or the tokenized data (the split, the context, LoRA targets, the replay budget)
are here too; ftcore.study runs them as soon as it can.
The corpus versions of the last successful study are recorded here for the scheduled corpus check.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftcore import hardware
from ftcore.config import InputError, LoraSpec, StudyConfig, check_devices_per_arm
from ftcore.io import write_json
from ftcore.results import DomainRows, Fingerprint, ModelRef, Stream

log = logging.getLogger("ftcore.inputs")


class StudyError(InputError):
    """Input the study cannot run with, found by a check; raised before expensive work."""


@dataclass(frozen=True)
class Inputs:
    """A study's input, checked: the config with every path absolute, and its sources' versions."""

    cfg: StudyConfig
    versions: dict[str, str]  # corpus role -> a file's sha256 or a Hub dataset's commit
    model_version: str  # the model source's identity (ftcore.sources.source_version)
    arms_in_process: bool = False  # checked for arms trained in this process (the in-process runner)

    @property
    def root(self) -> Path:
        return Path(self.cfg.artifacts_dir)


# An Inputs checked by the command line before Prefect starts, for the flow it starts in the same process.
_handed_over: list[Inputs] = []


def hand_over(inputs: Inputs) -> None:
    """Keep `inputs` for the next check_inputs of the same config in this process (the flow the CLI starts)."""
    _handed_over[:] = [inputs]


def check_inputs(cfg: StudyConfig, arms_in_process: bool = False) -> Inputs:
    """Everything that can be checked before any model is loaded, and the sources' versions, once.

    Raises InputError (naming the field or file) for an unwritable artifacts root, a tracker that is
    not installed, a corpus or model source that does not exist or cannot be resolved, and an arm on
    more devices than it can have.
    """
    cfg = resolve_precisions(resolve_paths(cfg))
    if _handed_over and _handed_over[0].cfg == cfg and _handed_over[0].arms_in_process == arms_in_process:
        return _handed_over.pop()
    from ftcore import sources

    check_trackers(cfg)
    warn_slow_bf16(cfg)
    here = cfg.executor == "subprocess"  # the arms train on this machine: its devices decide
    device = hardware.resolve_device(cfg.device) if here else None
    check_devices_per_arm(cfg.train, full=any(a.method == "full" for a in cfg.arms), curves=cfg.eval.every_steps != 0,
                          device=device, processes=1 if arms_in_process else None,
                          gpus=_cuda_devices() if device == "cuda" else None)
    root = Path(cfg.artifacts_dir)
    made = _first_missing(root)
    check_artifacts_dir(cfg)  # the first check that writes: after every one that can refuse without writing
    try:
        versions = corpus_versions(cfg)  # every corpus source exists (or its Hub revision resolves)
        model_version = sources.source_version(cfg.model)
    except BaseException:
        _remove_empty(root, made)  # a refused study leaves no empty root behind
        raise
    return Inputs(cfg, versions, model_version, arms_in_process)


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (what mkdir(parents=True) would create), or None
    (also where a directory on the path may not be searched: check_artifacts_dir then refuses, creating nothing)."""
    missing = None
    for p in (path, *path.parents):
        try:
            if p.exists():
                break
        except OSError:
            return None
        missing = p
    return missing


def _remove_empty(path: Path, made: Path | None) -> None:
    """Remove `path` and its parents up to `made` (the directories check_artifacts_dir created) while empty."""
    if made is None:
        return
    for p in (path, *path.parents):
        try:
            p.rmdir()
        except OSError:  # not empty (something else wrote there meanwhile) or gone: leave it
            return
        if p == made:
            return


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


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


def resolve_precisions(cfg: StudyConfig) -> StudyConfig:
    """`cfg` with precision 'auto' decided for this machine (ftcore.hardware.resolve_precision), so the keys, the
    plans and the recorded config say what ran: eval.precision always (evaluation runs here), the training
    precision when the arms train here (executor subprocess; a work pool's worker decides its own)."""
    device = hardware.resolve_device(cfg.device)
    update: dict[str, Any] = {}
    if cfg.eval.precision == "auto":
        update["eval"] = cfg.eval.model_copy(update={"precision": hardware.resolve_precision("auto", device)})
    if cfg.precision == "auto" and cfg.executor == "subprocess":
        update["precision"] = hardware.resolve_precision("auto", device)
    return cfg.model_copy(update=update) if update else cfg


def check_artifacts_dir(cfg: StudyConfig) -> Path:
    """The artifacts root, created; StudyError naming artifacts_dir when it cannot be written."""
    root = Path(cfg.artifacts_dir).expanduser()
    try:
        existing = next((p for p in (root, *root.parents) if p.exists()), None)
    except OSError:  # a directory on the path that may not be searched: the write below names the error
        existing = None
    if existing is not None and not existing.is_dir():
        where = f"{root}" if existing == root else f"{root}: {existing}"
        raise StudyError(f"artifacts_dir: {where} is a file, not a directory; choose a directory (a missing one is "
                         "created)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise StudyError(f"artifacts_dir: {root} is not writable ({exc.strerror}); choose a writable directory") from None
    return root


# What each tracker of report_to needs installed, and how to install it.
TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "mlflow": ("mlflow", "pip install 'ftstudy[mlflow]'"),
            "wandb": ("wandb", "pip install wandb")}


def check_trackers(cfg: StudyConfig) -> None:
    """Every tracker in report_to is installed; StudyError naming report_to otherwise (an asked-for tracker that
    silently logs nothing, or fails every arm after the base evaluations, is worse than a refusal)."""
    for tracker in cfg.report_to:
        module, install = TRACKERS[tracker]
        if importlib.util.find_spec(module) is None:
            raise StudyError(f"report_to: {tracker} is not installed ({install}); or drop it from report_to")


def warn_slow_bf16(cfg: StudyConfig) -> None:
    """A warning (not an error: the numbers are right, only slow) for bf16 on a CPU that emulates it."""
    if hardware.resolve_device(cfg.device) != "cpu" or hardware.cpu_has_native_bf16():
        return
    slow = [name for name, value in (("precision", cfg.precision), ("eval.precision", cfg.eval.precision))
            if value == "bf16"]
    if slow:
        log.warning("%s: bf16 on this CPU, which has no native bf16 (AVX512-BF16 or AMX), is emulated and runs "
                    "several times slower than fp32 (6x measured on an AVX2-only CPU); set %s to fp32 unless "
                    "you need bf16's numbers", " and ".join(slow), " and ".join(slow))


# --- what the arms start from, and the checks that need it ------------------------------------------------

def check_split(cfg: StudyConfig, domain: Fingerprint) -> None:
    from ftcore import corpora

    if cfg.test_docs >= domain.documents:
        raise corpora.CorpusError(f"test_docs ({cfg.test_docs}) must be smaller than the {domain.documents} usable "
                                  "documents of domain; lower test_docs or raise domain.max_docs")


def max_context(model_dir: str | Path) -> int | None:
    """The longest sequence the model's position embeddings allow, if its config says."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if key in config:
            return int(config[key])
    return None


def check_model(cfg: StudyConfig, model: ModelRef, root: Path) -> None:
    """What the fetched model must allow: chunk_len within its context, and every LoRA arm's targets."""
    model_dir = model.locate(root)
    limit = max_context(model_dir)
    if limit is not None and cfg.chunk_len > limit:
        raise StudyError(f"chunk_len: {cfg.chunk_len} tokens exceed the model's context of {limit}; lower chunk_len")
    for arm in cfg.arms:  # LoRA targets the study cannot train or evaluate faithfully, before any work
        if arm.method == "qlora":
            check_qlora(model_dir, arm.name, cfg.device)
        if arm.method != "full":
            check_lora_once(cfg.lora_of(arm), model, root, arm.name)


def check_lora_once(lora: LoraSpec, model: ModelRef, root: Path, arm: str) -> None:
    """check_lora, unless these LoRA settings passed it on this model before (`passed_once`). Raises InputError
    as check_lora does."""
    passed_once(root, "lora", {"lora": lora.model_dump(mode="json"), "model": model.digest}, ("inputs", "training"),
                ("peft", "transformers"), lambda: check_lora(lora, model.locate(root), arm))


def passed_once(root: Path, check: str, facts: dict[str, Any], modules: tuple[str, ...], libraries: tuple[str, ...],
                run: Callable[[], None]) -> None:
    """Run a check at the door (`run`, which raises when it fails) unless it passed before on the same facts
    (content digests and the settings it reads), the same code (the sources of the ftcore `modules` it runs) and
    the same `libraries`. Each pass is recorded as root/checked/<check>-<digest>.json; a failure records nothing.
    These checks import torch, peft or TRL, or read every training token: most of a recorded rerun's time."""
    code = hashlib.sha256(b"".join((Path(__file__).parent / f"{m}.py").read_bytes() for m in modules)).hexdigest()
    passed = {"check": check, "facts": facts, "code": code,
              **{lib: importlib.metadata.version(lib) for lib in libraries}}
    record = root / "checked" / f"{check}-{hashlib.sha256(json.dumps(passed, sort_keys=True).encode()).hexdigest()[:20]}.json"
    if record.is_file():
        return
    run()
    write_json(passed, record)


def check_lora(lora: LoraSpec, model_dir: str | Path, arm: str) -> None:
    """Refuse, before any work, LoRA settings this study cannot train or evaluate faithfully on the model.

    The adapter is applied with peft to the model's skeleton on the meta device (no weights, well
    under a second), so the same matching rules decide. Raises InputError naming lora.target_modules
    when no module matches, when the output layer (lm_head) is targeted (TRL computes the loss from
    lm_head.weight directly, so such an adapter would never train), and when lora.merge is set and an
    adapted weight is tied to another (merging would change the tied layer too, so the merged model
    would not be the trained one).
    """
    import torch
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftcore import models
    from ftcore.training import peft_config

    field = f"arm {arm}: lora.target_modules {lora.target_modules!r}"
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        with models.quiet_library_deprecations():
            adapted = get_peft_model(skeleton, peft_config(lora))
    except ValueError as exc:  # peft's NoMatchingPeftModuleError is a ValueError
        raise InputError(f"{field}: {str(exc).splitlines()[0]}; name modules of this model (e.g. q_proj, c_attn) "
                         "or use 'all-linear'") from None
    if isinstance(adapted.get_output_embeddings(), BaseTunerLayer):
        raise InputError(f"{field}: adapts the output layer (lm_head), which TRL's loss reads as lm_head.weight directly, "
                         "so the adapter would never train; drop it from lora.target_modules")
    tied = getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False)
    if lora.merge and tied and isinstance(adapted.get_input_embeddings(), BaseTunerLayer):
        raise InputError(f"{field}: adapts the input embedding, which this model ties to its output layer "
                         "(tie_word_embeddings); merging the adapter would change the output layer too, so the merged "
                         "model would not be the trained one. Set lora.merge=false (the arm is evaluated as its "
                         "adapter) or drop the embedding from lora.target_modules")


def check_qlora(model_dir: str | Path, arm: str, device: str) -> None:
    """Refuse a QLoRA arm before any work when this machine cannot train it: bitsandbytes missing, or its
    CPU kernels and a model whose layer widths are not multiples of their block size (64).

    Raises InputError naming the arm and the method.
    """
    from ftcore.hardware import resolve_device

    field = f"arm {arm}: method qlora"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"{field} loads the base in 4-bit with bitsandbytes, which is not installed: "
                         "pip install 'ftstudy[qlora]'")
    if resolve_device(device) != "cpu":
        return
    config = json.loads((Path(model_dir) / "config.json").read_text())
    widths = {k: config[k] for k in ("hidden_size", "n_embd", "intermediate_size", "n_inner") if config.get(k)}
    odd = {k: v for k, v in widths.items() if v % 64}
    if odd:
        raise InputError(f"{field}: bitsandbytes' 4-bit CPU kernels need layer widths that are multiples of 64, and "
                         f"this model has {odd}; train it on a GPU (device=cuda) or use method lora")


def check_contamination(cfg: StudyConfig, domain: DomainRows, general: Stream, replays: dict[str, Stream]) -> None:
    """_check_contamination, unless it passed before on the same corpora and general set (`passed_once`)."""
    facts = {"domain": domain.digest, "general": general.digest, "max_general_tokens": cfg.eval.max_general_tokens,
             "replays": {field: stream.digest for field, stream in replays.items()}}
    passed_once(Path(cfg.artifacts_dir), "contamination", facts, ("inputs", "contamination", "perplexity"),
                ("numpy", "pandas", "pyarrow"), lambda: _check_contamination(cfg, domain, general, replays))


def _check_contamination(cfg: StudyConfig, domain: DomainRows, general: Stream, replays: dict[str, Stream]) -> None:
    """Refuse, before any training, training text that is a benchmark (ftcore.contamination): more than 1% (and
    more than two runs' worth) of the general set's scored tokens (within eval.max_general_tokens) in runs of 32
    tokens that the domain training rows or a replay stream (`replays`: the config field that names it -> its
    stream) also hold, or of the held-out domain rows' scored tokens in runs a replay stream holds. The arms would
    be scored on text they trained on: forgetting would look smaller, and the domain gain larger, than they are.

    Raises StudyError naming the training field, the benchmark's field and the share.
    """
    import pandas as pd

    from ftcore import contamination, perplexity

    root = Path(cfg.artifacts_dir)
    scored = perplexity.read_stream(pd.read_parquet(root / general.path), cfg.eval.max_general_tokens).ids
    sources = {"domain.path": lambda: list(pd.read_parquet(root / domain.train, columns=["input_ids"])["input_ids"])}
    for field, stream in replays.items():
        sources[field] = lambda stream=stream: [perplexity.read_stream(pd.read_parquet(root / stream.path)).ids]
    for field, rows in sources.items():
        theirs = contamination.hashes_of([np.asarray(r) for r in rows()])
        share = float(contamination.shared_mask(scored, theirs).mean()) if len(scored) else 0.0
        log.info("%s: %.3f%% of the general set's scored tokens lie in runs of %d tokens it shares with general.path",
                 field, 100 * share, contamination.RUN)
        if contamination.too_much(share, len(scored)):
            _refuse_overlap(field, "general.path", "the general set's scored tokens", share)
        if field.startswith("replay"):  # replay must not hold the held-out domain text either
            test = pd.read_parquet(root / domain.test, columns=["input_ids", "labels"])
            counts = contamination.scored_shared(list(zip(test["input_ids"], test["labels"])), theirs)
            tokens = sum(t for _, t in counts)
            held = sum(n for n, _ in counts) / tokens if tokens else 0.0
            if contamination.too_much(held, tokens):
                _refuse_overlap(field, "domain.path", "the held-out domain rows' scored tokens", held)


def _refuse_overlap(field: str, benchmark: str, what: str, share: float) -> None:
    from ftcore import contamination

    role = field.split(".")[0]
    raise StudyError(
        f"{field} and {benchmark} overlap: {100 * share:.1f}% of {what} lie in runs of {contamination.RUN} tokens that "
        f"the {role} {'training rows' if role == 'domain' else 'corpus'} also holds (at most "
        f"{100 * contamination.TOLERANCE:.0f}% is accepted); the arms would be scored on text they trained on. {role} "
        f"must be disjoint from {benchmark.split('.')[0]}: point {field} at other text, or {benchmark} at another "
        "benchmark")


def check_replay_budget(cfg: StudyConfig, domain: DomainRows, replay: Stream | None,
                        own: Stream | None = None) -> None:
    """_check_replay_budget, unless it passed before on the same rows and ratios (`passed_once`)."""
    facts = {"domain": domain.digest, "replay": replay.digest if replay else None, "own": own.digest if own else None,
             "seed": cfg.train.seed, "ratios": sorted({(a.replay_ratio, cfg.replays_self(a)) for a in cfg.arms})}
    passed_once(Path(cfg.artifacts_dir), "replay-budget", facts, ("inputs", "training"), ("numpy", "pandas"),
                lambda: _check_replay_budget(cfg, domain, replay, own))


def _check_replay_budget(cfg: StudyConfig, domain: DomainRows, replay: Stream | None,
                         own: Stream | None = None) -> None:
    """Enough replay tokens for every arm's replay_ratio, checked before any training starts: the arms that replay
    the study's corpus against `replay`, those that replay the model's own text against `own`. Raises
    ReplayBudgetError naming the arm."""
    import pandas as pd

    from ftcore import training

    for stream, mine in ((replay, False), (own, True)):
        replaying = [a for a in cfg.arms if a.replay_ratio > 0 and cfg.replays_self(a) == mine]
        if not replaying or stream is None:
            continue
        greediest = max(replaying, key=lambda a: a.replay_ratio)  # the largest ratio needs the most replay tokens
        root = Path(cfg.artifacts_dir)
        try:
            training.build_training_mix(pd.read_parquet(root / domain.train, columns=["input_ids", "completion_mask"]),
                                        pd.read_parquet(root / stream.path, columns=["input_ids", "completion_mask"]),
                                        greediest.replay_ratio, cfg.train.seed)
        except training.ReplayBudgetError as exc:
            raise training.ReplayBudgetError(f"arm {greediest.name}: {exc}") from None


# --- corpus change detection (what the scheduled check compares) -----------------------------------

def corpus_roles(cfg: StudyConfig) -> list[str]:
    """The corpora this study reads: domain, general, replay when an arm mixes in the replay corpus (read from a
    file or the Hub, or written by the model with replay.source self), and self-replay when an arm with
    replay_source self mixes in the model's own text beside it."""
    study_self = cfg.replay is not None and cfg.replay.source == "self"
    corpus = any(a.replay_ratio > 0 and (study_self or a.replay_source == "study") for a in cfg.arms)
    own = cfg.self_replay is not None and not study_self
    return ["domain", "general"] + (["replay"] if corpus else []) + (["self-replay"] if own else [])


def corpus_versions(cfg: StudyConfig) -> dict[str, str]:
    """Cheap identity of every corpus source now: a file's sha256 or a Hub dataset's commit."""
    from ftcore import corpora

    return {role: corpora.source_version(cfg.corpus(role), "replay" if role == "self-replay" else role)
            for role in corpus_roles(cfg)}


def _corpus_state_path(cfg: StudyConfig) -> Path:
    # One record per set of corpus sources, so studies sharing an artifacts root do not mix.
    specs = {role: cfg.corpus(role).model_dump(mode="json") for role in corpus_roles(cfg)}
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
