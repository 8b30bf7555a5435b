"""Step keys: a hash of exactly what one step's result depends on.

A key covers three things and nothing else:
- what the step reads: the config values it uses and the *content digests* of its inputs (never
  their paths), so the same corpus or model under another path is the same input, and an upstream
  step that recomputes to identical bytes leaves everything below it cached;
- the code that computes the result: the source of the step's definition and of every ftcore
  function, class and constant it reaches through its calls, found by reading the code (`code_of`),
  so a helper cannot be missed and an unrelated function in the same module is not covered;
- the versions of the libraries that compute it (LIBRARIES).

The modules in NOT_CODE are never followed: the config schema (the values a step reads are in its
key; a field's description is not), the step machinery and the checks at the door. So rewording the
report re-renders the report only, an edit to the trainer retrains the arms (and their evaluations
run again only if the weights changed), and an edit to a preset, an input check or the orchestration
(tasks/, flows/) changes no key.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

FTCORE = Path(__file__).resolve().parent
# Modules whose code computes no step's result: followed by no key.
NOT_CODE = frozenset({"__init__", "config", "config_files", "presets", "keys", "steps", "inputs"})
# Libraries whose version can change a step's result.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "fingerprint": ("pandas", "pyarrow"),
    "fetch-model": ("torch", "transformers", "tokenizers", "gguf"),
    "tokenize": ("transformers", "tokenizers", "trl", "pyarrow"),
    "train": ("torch", "transformers", "trl", "peft", "accelerate", "datasets"),
    "evaluate": ("torch", "transformers", "peft"),
    "generate": ("torch", "transformers", "tokenizers"),
    "task": ("torch", "transformers", "peft", "lm_eval", "datasets"),
    "report": ("numpy", "pandas", "matplotlib", "huggingface_hub", "scipy"),
}


@dataclass(frozen=True)
class _Module:
    defs: dict[str, ast.AST]  # module-level name -> its definition (function, class, assignment)
    lines: list[str]  # the source's lines with their ends, as ast.get_source_segment splits them
    imports: dict[str, tuple[str, str | None]]  # local name -> (ftcore module, name in it or None for the module)
    memo: dict[str, tuple[str, frozenset[tuple[str, str]]]] = field(default_factory=dict)  # _definition's


def _module(path: Path) -> _Module:
    source = path.read_text()
    tree = ast.parse(source)
    defs: dict[str, ast.AST] = {}
    imports: dict[str, tuple[str, str | None]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defs[name.id] = node
    for node in ast.walk(tree):  # imports anywhere, also inside functions (deferred imports)
        if isinstance(node, ast.ImportFrom) and node.module == "ftcore":
            for alias in node.names:
                imports[alias.asname or alias.name] = (alias.name, None)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ftcore."):
            for alias in node.names:
                imports[alias.asname or alias.name] = (node.module.split(".", 1)[1], alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ftcore.") and alias.asname:
                    imports[alias.asname] = (alias.name.split(".", 1)[1], None)
    return _Module(defs, source.splitlines(keepends=True), imports)


@lru_cache(maxsize=None)
def _package(package_dir: str) -> dict[str, _Module]:
    return {p.stem: _module(p) for p in sorted(Path(package_dir).glob("*.py"))}


def _from_ftcore(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] == "ftcore"
    return any(a.name.split(".")[0] == "ftcore" for a in node.names)


def _locals(node: ast.AST) -> set[str]:
    """Names a function or class binds itself (parameters, assignments, loop and `as` targets, imports, nested
    functions): where it uses them it does not mean the module-level definition of the same name."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return set()
    bound: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg):
            bound.add(sub.arg)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            bound.add(sub.id)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)) and not _from_ftcore(sub):  # ftcore's: _module maps them
            bound.update((a.asname or a.name).split(".")[0] for a in sub.names)
        elif isinstance(sub, ast.ExceptHandler) and sub.name:
            bound.add(sub.name)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub is not node:
            if not isinstance(node, ast.ClassDef):  # a method's name is reached through self, never bare
                bound.add(sub.name)
        elif isinstance(sub, ast.Global):
            bound.difference_update(sub.names)
    return bound


def _references(module: str, node: ast.AST, package: dict[str, _Module]) -> set[tuple[str, str]]:
    """The ftcore definitions (module, name) one definition names: its own module's names, names imported from
    ftcore, and `module.name` of an imported ftcore module (names it binds itself excepted)."""
    own = package[module]
    local = _locals(node)
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in local:
            continue
        if isinstance(sub, ast.Name):
            if sub.id in own.defs:
                found.add((module, sub.id))
            elif sub.id in own.imports and own.imports[sub.id][1] is not None:
                found.add(own.imports[sub.id])
        elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
            target = own.imports.get(sub.value.id)
            if target is not None and target[1] is None:
                found.add((target[0], sub.attr))
    return found


def code_of(roots: Iterable[Callable[..., Any]], without: Iterable[str] = (),
            package_dir: Path | None = None) -> dict[str, str]:
    """The code a step runs: `module.name` -> source, for the roots (top-level functions of ftcore) and every
    ftcore definition they reach, transitively; modules in NOT_CODE and `without` are not followed.

    `package_dir` is where the ftcore sources are read (default FTCORE; tests point it at an edited copy).
    Raises KeyError for a root that is not a top-level definition of an ftcore module.
    """
    package = _package(str(package_dir or FTCORE))
    skip = NOT_CODE | set(without)
    todo = [(fn.__module__.split(".", 1)[1], fn.__qualname__) for fn in roots]
    seen: dict[str, str] = {}
    while todo:
        module, name = todo.pop()
        if module in skip or module not in package:
            continue
        if name not in package[module].defs:  # a name the module imported from another (re-exported)
            target = package[module].imports.get(name)
            if target is not None and target[1] is not None:
                todo.append(target)
            continue
        qualified = f"{module}.{name}"
        if qualified in seen:
            continue
        seen[qualified], references = _definition(package, module, name)
        todo.extend(references)
    return dict(sorted(seen.items()))


def _definition(package: dict[str, _Module], module: str, name: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """One definition's source and the ftcore definitions it names, read once per package read (a study computes
    dozens of keys over the same definitions)."""
    memo = package[module].memo
    if name not in memo:
        node = package[module].defs[name]
        memo[name] = _segment(package[module].lines, node), frozenset(_references(module, node, package))
    return memo[name]


def _segment(lines: list[str], node: ast.AST) -> str:
    """ast.get_source_segment(source, node) from the source's lines split once (it splits the whole module
    again on every call: seconds per study)."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset:node.end_col_offset].decode()
    head = lines[first].encode()[node.col_offset:].decode()
    tail = lines[last].encode()[:node.end_col_offset].decode()
    return "".join([head, *lines[first + 1:last], tail])


@lru_cache(maxsize=None)
def _library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def code_digest(kind: str, roots: Iterable[Callable[..., Any]], without: Iterable[str] = (),
                package_dir: Path | None = None) -> str:
    """sha256 of the code a step of `kind` runs (`code_of`) and its libraries' versions (LIBRARIES).

    Raises KeyError for a kind that is not in LIBRARIES.
    """
    h = hashlib.sha256(kind.encode())
    for name, source in code_of(roots, without, package_dir).items():
        h.update(f"{name}:{len(source)}:".encode() + source.encode())
    for lib in LIBRARIES[kind]:
        h.update(f"{lib}=={_library_version(lib)}".encode())
    return h.hexdigest()


def step_key(kind: str, reads: dict[str, Any], roots: Iterable[Callable[..., Any]], without: Iterable[str] = ()) -> str:
    """20 hex digits of sha256 over the step's kind, what it reads (`reads`, JSON) and its code digest."""
    data = {"step": kind, "reads": reads, "code": code_digest(kind, roots, without)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]
