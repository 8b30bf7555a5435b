"""ftcore: the fine-tuning cost study as a plain library (no Prefect import anywhere in it)."""

import importlib
import logging

# bitsandbytes (the QLoRA extra) warns at import, on CPUs with AVX512-BF16, that it could not download an
# optional faster kernel from the Hub; its own kernels work (and are what the tests use). Not actionable.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from ftcore.config import StudyConfig
from ftcore.config_files import load_config  # noqa: E402

__all__ = ["StudyConfig", "load_config"]

# The modules that import torch, transformers, TRL, peft or matplotlib at their top. `from ftcore import models`
# gives a stand-in until one of the module's names is used, so a study whose steps are all recorded is read back,
# and bad input refused, without the seconds those imports take. Code that computes imports them at first use.
HEAVY = frozenset({"chunked_loss", "chunking", "curves", "models", "perplexity", "plots", "training"})


class _Deferred:
    """An ftcore module not imported yet: imports it when one of its attributes is read or set, then forwards.
    (Kept out of sys.modules: tools that scan it, e.g. torch's source lookup, must not trigger the import.) No
    `__dict__` of its own (slots): reading it gives the module's, so pytest's monkeypatch, which restores what it
    finds there, puts a patched name back instead of deleting it."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)

    def __setattr__(self, attr: str, value) -> None:
        setattr(importlib.import_module(self._name), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported at first use>"


def __getattr__(name: str):
    """PEP 562: `from ftcore import <heavy module>` before that module is imported (once it is, the package
    attribute is the module itself)."""
    if name in HEAVY:
        return _Deferred(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
