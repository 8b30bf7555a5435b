"""ftcore: the fine-tuning cost study as a plain library (no Prefect import anywhere in it)."""

import logging

# bitsandbytes (the QLoRA extra) warns at import, on CPUs with AVX512-BF16, that it could not download an
# optional faster kernel from the Hub; its own kernels work (and are what the tests use). Not actionable.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from ftcore.config import StudyConfig
from ftcore.config_files import load_config  # noqa: E402

__all__ = ["StudyConfig", "load_config"]
