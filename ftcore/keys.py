"""Step keys: a hash of exactly what one step's result depends on.

A key covers three things and nothing else:
- the values the step reads: the config fields it uses and the *content digests* of its inputs
  (never their paths), so the same corpus or model under another path is the same input, and an
  upstream step that recomputes to identical bytes leaves everything below it cached;
- the code that computes the result: the ftcore modules listed for the step in CODE, and the
  source of the step's own functions (its glue in ftcore.study);
- the versions of the libraries listed for the step in LIBRARIES.

So an edit to report.py re-renders the report only, an edit to training.py retrains the arms (and
their evaluations run again only if the trained weights changed), and an edit to a preset or to
the orchestration (tasks/, flows/) changes no key at all.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

FTCORE = Path(__file__).resolve().parent

# ftcore modules whose source computes each step's result.
CODE: dict[str, tuple[str, ...]] = {
    "fingerprint": ("corpora",),
    "fetch-model": ("sources",),
    "tokenize": ("corpora", "chunking", "models"),
    "train": ("plan", "training", "curves", "models"),  # + perplexity when the arm measures curves (ftcore.plan)
    "evaluate": ("perplexity", "models"),
    "benchmark": ("benchmarks", "models"),
    "report": ("report", "stats", "cards", "forgetting", "benchmarks"),
}
# Libraries whose version can change a step's result.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "fingerprint": ("pandas", "pyarrow"),
    "fetch-model": ("torch", "transformers", "tokenizers", "gguf"),
    "tokenize": ("transformers", "tokenizers", "trl", "pyarrow"),
    "train": ("torch", "transformers", "trl", "peft", "accelerate", "datasets"),
    "evaluate": ("torch", "transformers", "peft"),
    "benchmark": ("torch", "transformers", "peft", "lm_eval", "datasets"),
    "report": ("numpy", "pandas", "matplotlib", "huggingface_hub", "scipy"),
}


@lru_cache(maxsize=None)
def _module_digest(name: str, package_dir: str) -> str:
    return hashlib.sha256((Path(package_dir) / f"{name}.py").read_bytes()).hexdigest()


@lru_cache(maxsize=None)
def _library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def module_digest(name: str) -> str:
    """sha256 of one ftcore module's source (read from FTCORE)."""
    return _module_digest(name, str(FTCORE))


def code_digest(step: str, functions: Iterable[Callable[..., Any]] = (), package_dir: Path | None = None) -> str:
    """sha256 of the step's modules (CODE), its functions' source and its libraries' versions (LIBRARIES).

    `package_dir` is where the ftcore sources are read from (default FTCORE; tests point it at an
    edited copy). Raises KeyError for a step that is not in CODE.
    """
    h = hashlib.sha256(step.encode())
    for module in CODE[step]:
        h.update(f"{module}:{_module_digest(module, str(package_dir or FTCORE))}".encode())
    for fn in functions:
        h.update(inspect.getsource(fn).encode())
    for lib in LIBRARIES[step]:
        h.update(f"{lib}=={_library_version(lib)}".encode())
    return h.hexdigest()


def step_key(step: str, payload: dict[str, Any], functions: Iterable[Callable[..., Any]] = ()) -> str:
    """20 hex digits of sha256 over the step's name, what it reads (`payload`, JSON) and its code digest."""
    data = {"step": step, "reads": payload, "code": code_digest(step, functions)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]
