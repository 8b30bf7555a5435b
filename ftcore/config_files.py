"""Config files, `--set` overrides and presets merged into one StudyConfig; the reference of every field.

`load_config` builds the config (defaults < preset < file < overrides), `config_yaml` writes a
commented config file (`ftstudy init`), `config_reference` the table of fields in the docs, and
`describe_error` turns pydantic's errors into one line per field for the command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ftcore import presets
from ftcore.config import ArmSpec, BenchmarksSpec, BenchmarkTask, ConfigError, StudyConfig
from ftcore.presets import deep_merge


def parse_override(item: str) -> dict[str, Any]:
    """`train.learning_rate=1e-4` -> {"train": {"learning_rate": 1e-4}}; values are JSON when they parse as JSON."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form field=value (e.g. train.max_steps=10)")
    path, raw = item.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        if raw.strip()[:1] in ("[", "{"):  # meant as a list or mapping (the shell may have eaten its quotes)
            raise ConfigError(f"override {item!r}: {raw} looks like a JSON list or object but does not parse "
                              f"({exc.msg}); quote its strings and the whole argument, e.g. "
                              """--set 'lora.target_modules=["q_proj","v_proj"]'""") from None
        value = raw
    parts = path.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty field name")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file (YAML, or JSON, which is YAML) as a dict of fields; ConfigError naming the file and line."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist; write one with `ftstudy init > {file.name}`")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {file} is not UTF-8 text") from None
    if file.suffix.lower() == ".json":  # strict JSON: YAML would accept what JSON tools reject (a trailing comma)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid JSON at line {exc.lineno}, column {exc.colno}: "
                              f"{exc.msg}") from None
        return _mapping(data, file)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {file} is not valid YAML or JSON{where}: {getattr(exc, 'problem', exc)}") from None
    return _mapping(data, file)


def _mapping(data: Any, file: Path) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file}: the top level must be a mapping of config fields (name: ..., "
                          f"domain: ...), not a {type(data).__name__}")
    return data


def load_config(preset: str | None = "smoke", overrides: list[str] | tuple[str, ...] = (),
                config_file: str | Path | None = None, **fields: Any) -> StudyConfig:
    """Build a StudyConfig; later sources override earlier ones, field by field (nested fields merge):

    the defaults < the preset (if any) < the config file (if any) < `field=value` overrides < `fields`.

    Raises ConfigError for an unknown preset, an unreadable config file or a malformed override, and
    pydantic.ValidationError, naming the field, for an invalid value.
    """
    data: dict[str, Any] = {}
    if preset is not None:
        try:
            data = presets.preset(preset)
        except presets.MissingDataError as exc:
            raise ConfigError(str(exc.args[0])) from None
        except KeyError:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(presets.PRESETS)}") from None
    if config_file is not None:
        data = deep_merge(data, read_config_file(config_file))
    for item in overrides:
        data = deep_merge(data, parse_override(item))
    data = deep_merge(data, fields)
    return StudyConfig.model_validate(data)


def describe_error(exc: ValidationError) -> str:
    """One line per invalid field, `field.path: message`, for command-line output, with the likely field
    for a misspelt one and how to pass a number as text."""
    lines = []
    errors = exc.errors()
    union = {e["loc"][:-1] for e in errors if e["loc"] and _member(e["loc"][-1])}
    for err in errors:
        deeper = [e for e in errors if len(e["loc"]) > len(err["loc"]) and e["loc"][:len(err["loc"])] == err["loc"]]
        if err["type"] == "too_short" and deeper:
            continue  # "arms: at least 1 item" only because its one entry is invalid: that error says why
        field = tuple(p for p in err["loc"] if not _member(p))
        if field in union and err["loc"] and _member(err["loc"][-1]) and err["loc"][-1] != _first_member(errors, field):
            continue  # one line per field of a union (a number or a list): its first member's message
        loc = ".".join(str(p) for p in field) or "config"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            near = _close_field(err["loc"])
            message = "not a field" + (f"; did you mean {near!r}?" if near else "") + " (`ftstudy init` lists them all)"
        elif err["type"] in ("tuple_type", "list_type") and isinstance(err.get("input"), str) and field == err["loc"]:
            message += f" (a list: --set '{loc}=[\"{err['input']}\"]', or in a file {loc}: [{err['input']}])"
        elif err["type"] == "string_type" and isinstance(err.get("input"), (int, float)):
            message += (f" (got the number {err['input']!r}: a --set value is read as JSON, so quote it, "
                        f"e.g. --set '{loc}=\"{err['input']}\"')")
        lines.append(f"{loc}: {message}")
    return "\n".join(lines)


def _member(part: Any) -> bool:
    """Whether a part of an error's location names a member of a union type (constrained-float, tuple[...]),
    which pydantic adds to the location, rather than a field."""
    return isinstance(part, str) and not part.isidentifier()


def _first_member(errors: list[dict[str, Any]], field: tuple) -> Any:
    return next(e["loc"][-1] for e in errors if e["loc"] and tuple(p for p in e["loc"] if not _member(p)) == field)


def _close_field(loc: tuple) -> str | None:
    """The dotted name of the config field closest to a misspelt one at `loc`, if one is close."""
    import difflib

    model: type[BaseModel] | None = StudyConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        model = _submodel(field.annotation) if field else None
    if model is None:
        return None
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    if match:
        return ".".join([*map(str, loc[:-1]), match[0]])
    # a nested field given at the wrong level (learning_rate for train.learning_rate)
    paths = [row.split("`")[1] for row in config_reference().splitlines()[2:]]
    return next((path for path in paths if path.split(".")[-1] == str(loc[-1])), None)


def config_reference() -> str:
    """Markdown table of every config field (dotted path, type, default, description), from the model itself."""
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            sub = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
            if sub is not None:
                walk(sub, path + ".")
                continue
            default = "required" if field.is_required() else json.dumps(
                field.get_default(call_default_factory=True), default=str)
            ann = field.annotation
            kind = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            if path == "arms":  # the annotation's repr names a validator function and its address
                kind = "list of arm specs (or full / replay / lora)"
            if path == "benchmarks.tasks":
                kind = "list of task specs (or task names / YAML paths)"
            kind = kind.replace("ftcore.config.", "").replace("CorpusSpec", "corpus (fields as for domain)")
            kind = kind.replace("LoraOverride", "lora (fields as for lora)").replace("|", "\\|")
            rows.append(f"| `{path}` | {kind} | `{default}` | {(field.description or '').replace('|', '/')} |")
            if path == "benchmarks":  # optional (None = no tasks): its fields, and those of each task
                walk(BenchmarksSpec, "benchmarks.")
                walk(BenchmarkTask, "benchmarks.tasks[].")

    walk(StudyConfig, "")
    walk(ArmSpec, "arms[].")
    return "\n".join(rows)


# --- a commented config file (`ftstudy init`) ------------------------------------------------------

# What `ftstudy init` writes for the corpora when no preset gives them: values to replace.
EXAMPLE_CORPORA = {
    "domain": {"source": "file", "path": "my-domain-corpus.csv", "text_fields": ["title", "abstract"]},
    "general": {"source": "hub", "path": "Salesforce/wikitext", "subset": "wikitext-2-raw-v1", "split": "test"},
    "replay": {"source": "hub", "path": "Salesforce/wikitext", "subset": "wikitext-103-raw-v1", "max_docs": 20000},
}


def config_yaml(cfg: StudyConfig | None = None, header: str = "") -> str:
    """Every field of the config as a YAML file, each under its description as a comment.

    Values are `cfg`'s (a preset, say) or, without one, the defaults with example corpora to replace.
    The file validates back to the same config (`load_config(None, config_file=...)`).
    """
    import yaml

    cfg = cfg or StudyConfig.model_validate(EXAMPLE_CORPORA)
    values = cfg.model_dump(mode="json")
    values["arms"] = [{"name": a.name} | a.model_dump(mode="json", exclude_defaults=True) for a in cfg.arms]

    def scalar(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, allow_unicode=True, width=10_000).strip().removesuffix("...").strip()

    def walk(model: type[BaseModel], data: dict[str, Any], indent: str) -> list[str]:
        lines = []
        for name, field in model.model_fields.items():
            for line in _wrap(field.description or ""):
                lines.append(f"{indent}# {line}")
            sub = _submodel(field.annotation)
            value = data.get(name)
            if sub is not None and isinstance(value, dict):
                lines.append(f"{indent}{name}:")
                lines += walk(sub, value, indent + "  ")
            elif name == "arms":
                lines.append(f"{indent}{name}:")
                lines += [f"{indent}  - {scalar(arm)}" for arm in value]
            else:
                lines.append(f"{indent}{name}: {scalar(value)}")
        return lines

    head = [f"# {line}" for line in header.splitlines()] if header else []
    return "\n".join(head + walk(StudyConfig, values, "")) + "\n"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (also inside `X | None`), if any."""
    import typing

    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _wrap(text: str, width: int = 98) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or []
