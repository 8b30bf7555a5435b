"""ftcore: the fine-tuning cost study as a plain library (no Prefect import anywhere in it)."""

from ftcore.config import StudyConfig, load_config

__all__ = ["StudyConfig", "load_config"]
