"""Presets: named overrides of StudyConfig's defaults (which are the seed recipe's training settings).

Each preset lists only what differs from the defaults; `ftcore.config.load_config` merges it under
`--set` overrides. A preset is data, not code: no path here is resolved against the working
directory, and editing a preset changes no step's cache key except through the values it sets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# WikiText marks an article by a top-level heading line " = Title = " (sections are " = = Sub = = ").
WIKITEXT_ARTICLE = r"^\s*= [^=].* =\s*$"
# Where the smoke and demo presets read their offline corpora: $FTSTUDY_DATA, else ../shared/data
# beside a source checkout. Read when a preset is loaded, so setting FTSTUDY_DATA later takes effect.
CHECKOUT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DATA_FILES = ("arxiv-cs/arxiv_cs_abstracts_1k.csv", "wikitext-2-raw/wiki.test.raw", "sotu/sotu.jsonl")
SHARED = "{data}"  # stands for the data directory in the presets below


def data_dir() -> Path:
    """The offline corpora's directory: FTSTUDY_DATA, else ../shared/data beside the source checkout."""
    return Path(os.environ.get("FTSTUDY_DATA") or CHECKOUT_DATA).expanduser()


def _shared(rel: str) -> str:
    return f"{SHARED}/{rel}"


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, nested dicts merged key by key (what a preset, --set and a config file do)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


ARXIV_FIELDS = {"prompt_field": "titles", "completion_field": "summaries"}

# The reference recipe on a GPU: gpt2-medium, 10k arXiv CS abstracts from the Hub (1k held out),
# WikiText-2 test as the general text, WikiText-103 train as replay. The training defaults are its own.
SEED: dict[str, Any] = {
    "name": "seed",
    "domain": {"source": "hub", "path": "CShorten/ML-ArXiv-Papers", "text_fields": ["title", "abstract"],
               "max_docs": 10000},
    "general": {"source": "hub", "path": "Salesforce/wikitext", "subset": "wikitext-2-raw-v1", "split": "test",
                "doc_start": WIKITEXT_ARTICLE},
    "replay": {"source": "hub", "path": "Salesforce/wikitext", "subset": "wikitext-103-raw-v1", "max_docs": 20000},
    # Forgetting on tasks as Biderman et al. 2024 measure it: HellaSwag, ARC-Challenge, WinoGrande, 0-shot,
    # acc_norm where the task defines it (lm-evaluation-harness; data from the Hub).
    "benchmarks": {"tasks": ["hellaswag", "arc_challenge", "winogrande"], "batch_size": 16},
}

# Without the Hub on 2 CPU cores: SmolLM2-135M-Instruct from its PyPI wheel and ../shared/data. Sizes are cut
# for a CPU (30 steps of 8 x <=256 tokens, about half an epoch): 19 minutes on 2 cores (README) with the
# curves, the exact KL and the lm-eval cross-check (docs/results.md). The lr is
# raised because at the seed's 5e-5 (and at 3e-4 for 40 steps, measured here) this short run lowers
# general perplexity too: the base is an instruction-tuned, 4-bit-dequantized model that plain text
# first repairs (../shared/data/README.md). The report states whichever way general perplexity moves.
DEMO: dict[str, Any] = {
    "name": "demo",
    "model": {"source": "gguf-wheels", "name": "SmolLM2-135M-Instruct"},
    "domain": {"source": "file", "path": _shared("arxiv-cs/arxiv_cs_abstracts_1k.csv"),
               "text_fields": ["titles", "summaries"], "max_docs": 600},
    "general": {"source": "file", "path": _shared("wikitext-2-raw/wiki.test.raw"), "file_format": "text",
                "doc_start": WIKITEXT_ARTICLE},
    "replay": {"source": "file", "path": _shared("sotu/sotu.jsonl")},
    "test_docs": 100,
    "format": ARXIV_FIELDS,
    "chunk_len": 256,
    "train": {"batch_size": 8, "grad_accum": 1, "learning_rate": 6e-4, "max_steps": 30, "logging_steps": 5,
              "save_steps": 10, "warmup_ratio": 0.1},
    "lora": {"learning_rate": 1e-3},
    # Evaluation in bf16 where the CPU computes it natively (2.5x faster than fp32 there, +0.1% perplexity for
    # every model alike, BENCHMARKS.md), else fp32 (precision auto); curves at steps 10, 20, 30 on about 1.5k tokens
    # of each set (their cost: BENCHMARKS.md §9).
    "eval": {"batch_size": 8, "max_general_tokens": 16384, "every_steps": 10, "curve_tokens": 1536,
             "precision": "auto"},
    # lm-eval's wikitext task (document-level rolling log-likelihood, its detokenizer and bits per byte) on
    # the general documents the study scores: a cross-check of ftstudy's own general perplexity, offline.
    # Windows of chunk_len tokens like ftstudy's (lm-eval's default, the model's 8192, took 3.6 min per
    # model here: attention over 8k tokens on a CPU), so the two differ only where their protocols do.
    "benchmarks": {"tasks": [{"task": "wikitext", "corpus": "general"}], "batch_size": 4, "max_length": 256},
    # Training under bf16 autocast where the CPU computes bf16 natively (AVX512-BF16, AMX: about 2.5x faster
    # than fp32), else fp32: an AVX2-only CPU emulates bf16 about 7x slower than fp32 (bench/precision.py).
    # The report's config says which ran; the two give slightly different numbers (docs/results.md).
    "precision": "auto",
    "device": "cpu",
}

# The seed's experiment as far as 2 CPU cores allow: a pretrained *base* model (gemma-3-270m, from its GGUF
# in PyPI wheels, offline), the seed's learning rate 5e-5 and warm-up 3%, LoRA at its usual 2e-4 (r 16,
# alpha 32), on the demo's data and sizes. Departures from the seed, each for CPU time: 40 steps of 8 x 256
# tokens (the seed: 2 epochs of 32 x 512 over 9k abstracts), 497 training abstracts (500 less 3 duplicates),
# the demo's precision (bf16 where native; Gemma 3 was trained in bf16), no lm-eval cross-check (the demo has it). Its time: docs/results.md.
DEMO_BASE: dict[str, Any] = deep_merge(DEMO, {
    "name": "demo-base",
    "model": {"source": "gguf-wheels", "name": "gemma-3-270m"},
    # 40 steps, not the demo's 30 (issue 30): a third more training tokens, what the main job's speed-ups bought
    # within 25 minutes from a fresh clone on a 2-core Zen 5 (BENCHMARKS.md §12).
    "train": {"learning_rate": 5e-5, "warmup_ratio": 0.03, "max_steps": 40},
    "lora": {"learning_rate": 2e-4},
    # Curves every 5 steps on ~2k tokens of each set (about 10 held-out abstracts, and 8 general windows spread
    # over the 4 scored articles): the points the comparison at equal domain gain reads off (docs/results.md:
    # what they cost).
    "eval": {"every_steps": 5, "curve_tokens": 2048},
})
DEMO_BASE["benchmarks"] = None

# The demo-base study as a sweep, for the comparison at equal domain gain with each method at its best learning
# rate: full fine-tuning at 3 rates around the seed's 5e-5, LoRA at 3 rates around its usual 10x (LoRA Without
# Regret, Thinking Machines 2025, finds LoRA's best rate about 10x full fine-tuning's), and replay at 1% and 10%
# (Bethune et al. 2025 report 1% of pretraining data is enough) at the seed's rate: 8 arms. Replay of the base
# model's own text (`replay_source: self`) is compared with the speeches on demo-base instead (docs/results.md),
# which keeps this sweep near two hours on 2 CPU cores. Not part of the quickstart: its time is in docs/results.md.
# It keeps demo-base's earlier 30 steps: its measured results (docs/results.md) are of 30 steps, and 8 arms of 40
# would take a third longer.
DEMO_FRONTIER: dict[str, Any] = deep_merge(DEMO_BASE, {
    "name": "demo-frontier",
    "train": {"max_steps": 30},
    "arms": [{"name": "full", "learning_rate": [1.5e-5, 5e-5, 1.5e-4]},
             {"name": "lora", "method": "lora", "learning_rate": [1e-4, 3e-4, 1e-3]},
             {"name": "replay", "replay_ratio": [0.01, 0.1]}],
    "reference_arm": "full-lr5e-5",
})

# The demo's corpora from the Hub, for an install without ../shared/data (SOTU is not on the Hub
# under a known name; WikiText-103 train is general text disjoint from WikiText-2).
DEMO_FROM_HUB: dict[str, Any] = {
    "domain": {"source": "hub", "path": "CShorten/ML-ArXiv-Papers", "text_fields": ["title", "abstract"],
               "max_docs": 600},
    "general": SEED["general"],
    "replay": {"source": "hub", "path": "Salesforce/wikitext", "subset": "wikitext-103-raw-v1", "max_docs": 5000},
    "format": {"prompt_field": "title", "completion_field": "abstract"},
}

# The demo as a sweep: six arms (replay at 10% and 25%, LoRA at rank 16 and 4, LoRA with replay) x two
# seeds, trained exactly as the demo's arms (its full, replay and lora at seed 0 train as the demo's;
# their curves score other tokens, so they are not cache hits of the demo's), in the demo's precision (bf16 where
# native), with 40k tokens of WikiText-2 scored per model for the per-article view (9 articles). It took under an hour on a 2-core CPU with native bf16 when
# the demo still trained in bf16 (docs/results.md).
DEMO_SWEEP: dict[str, Any] = deep_merge(DEMO, {
    "name": "demo-sweep",
    "arms": ["full", "replay", {"name": "replay-25", "replay_ratio": 0.25},
             "lora", {"name": "lora-r4", "method": "lora", "lora": {"r": 4, "alpha": 8}},
             {"name": "lora+replay", "method": "lora", "replay_ratio": 0.1}],
    "seeds": [0, 1],
    "eval": {"max_general_tokens": 40960},
})

# Seconds on a CPU: a tiny random Llama and slices of the offline corpora.
SMOKE: dict[str, Any] = {
    "name": "smoke",
    "model": {"source": "tiny-random", "name": "tiny-llama"},
    "domain": {**DEMO["domain"], "max_docs": 40},
    "general": {"source": "file", "path": _shared("wikitext-2-raw/wiki.test.raw"), "file_format": "text",
                "max_docs": 60},
    "replay": {"source": "file", "path": _shared("sotu/sotu.jsonl"), "max_docs": 2},
    "test_docs": 8,
    "format": ARXIV_FIELDS,
    "chunk_len": 192,
    "train": {"batch_size": 4, "grad_accum": 1, "learning_rate": 1e-3, "max_steps": 6, "logging_steps": 1,
              "save_steps": 3, "warmup_ratio": 0.0},
    "lora": {"r": 4, "alpha": 8, "learning_rate": 1e-2},
    # Curves at 3 points (steps 0, 3, 6) on small subsamples: seconds stay seconds.
    "eval": {"batch_size": 8, "max_general_tokens": 2048, "every_steps": 3, "curve_tokens": 512},
    "precision": "fp32",
    "device": "cpu",
}

PRESETS: dict[str, dict[str, Any]] = {"seed": SEED, "demo": DEMO, "demo-base": DEMO_BASE, "demo-sweep": DEMO_SWEEP,
                                      "demo-frontier": DEMO_FRONTIER, "smoke": SMOKE}


# What each preset is for, and how long it took (2-core CPU with native bf16, from a fresh clone where said):
# what `ftstudy run --help` lists.
ABOUT: dict[str, str] = {
    "demo-base": "the main job: the seed's experiment on a pretrained base (gemma-3-270m, offline), compared at equal "
                 "domain gain, 40 steps (24 min on a 2-core Zen 5 from a fresh clone, installing included; longer on "
                 "slower CPUs: BENCHMARKS.md §12)",
    "demo": "the fast tour of every feature (SmolLM2-135M-Instruct at a raised lr, offline; 19 min on 2 CPU cores with native bf16)",
    "demo-frontier": "demo-base at 30 steps with each method at three learning rates and replay at 1% and 10% (8 arms to demo-base's 3; 2 h 21 min on 2 CPU cores, docs/results.md)",
    "demo-sweep": "six arms x two seeds on the demo's data (under an hour)",
    "smoke": "a tiny random model on slices of the offline data (about a minute)",
    "seed": "the reference recipe: gpt2-medium, Hub data, a GPU (hours)",
}


class MissingDataError(KeyError):
    """A preset reads the offline corpora and their directory is not there."""


def preset(name: str) -> dict[str, Any]:
    """The overrides of preset `name`, its data paths under data_dir(). Raises KeyError if there is no such
    preset, MissingDataError when the smoke preset's offline corpora are missing; the demo's corpora
    then come from the Hub instead."""
    data = PRESETS[name]
    root = data_dir()
    present = all((root / f).is_file() for f in DATA_FILES)
    if name in ("demo", "demo-base", "demo-sweep", "demo-frontier") and not present:
        data = {**data, **DEMO_FROM_HUB}
    elif name == "smoke" and not present:
        raise MissingDataError(f"the smoke preset reads the offline corpora {', '.join(DATA_FILES)} from {root}, which "
                               "does not hold them; set FTSTUDY_DATA to the directory that does (in a source checkout "
                               "it is ../shared/data)")
    return _with_data_dir(data, str(root))


def _with_data_dir(value: Any, root: str) -> Any:
    if isinstance(value, dict):
        return {k: _with_data_dir(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_data_dir(v, root) for v in value]
    return value.replace(SHARED, root) if isinstance(value, str) and value.startswith(SHARED) else value
