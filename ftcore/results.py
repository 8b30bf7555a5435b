"""What travels between steps: each step's result, small, frozen and typed.

Every result is what its step recorded in result.json: paths relative to the artifacts root (so a
moved or copied root stays valid) and `digest`, the content identity of the files later steps
read, which is what their keys hash — so a step that recomputes to the same bytes leaves
everything below it cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Result(_Frozen):
    digest: str  # content identity of the files later steps read


class Fingerprint(Result):
    """A corpus as the study reads it: the sha256 of its used fields' values (`digest`) and its documents."""

    documents: int


class ModelRef(Result):
    """The fetched base model: where it is and what it is (`digest`: the content of its files)."""

    source: str
    name: str
    revision: str | None = None  # the Hub commit the study resolved, for a Hub model
    base_model: str | None = None  # the Hub id a user loads this base by (a GGUF's original), for cards
    path: str  # relative to the artifacts root for a built model, absolute otherwise

    def locate(self, root: str | Path) -> Path:
        """The model's directory on this machine: under `root`, where it was, or (Hub) this machine's cache.

        Raises ModelError when it cannot be found.
        """
        from ftcore import sources

        path = Path(root) / self.path  # an absolute self.path stays as it is
        if path.is_dir():
            return path
        if self.source == "hub":
            return sources.hub_snapshot(self.name, self.revision)
        raise sources.ModelError(f"model: {path} does not exist on this machine; the study fetched "
                                 f"{self.source} model {self.name!r} there")


class DomainRows(Result):
    """The domain corpus tokenized: training and held-out rows (parquet), and what tokenizing cut."""

    train: str
    test: str
    stats: dict[str, dict[str, int]]


class Generated(Result):
    """Replay text the base model wrote (replay.source self): a jsonl corpus (`digest`: its checksum) and how it
    was generated."""

    path: str  # replay.jsonl, relative to the artifacts root
    samples: int
    tokens: int  # generated tokens, end markers not counted
    seconds: float
    tokens_per_s: float | None


class Stream(Result):
    """The general or the replay corpus as one token stream in chunk_len rows, and each document's title."""

    path: str
    docs: str
    stats: dict[str, int]


class Scored(_Frozen):
    """A model that evaluations and tasks score: the base, the base in 4-bit NF4, or a trained arm."""

    label: str  # the arm with its seed when the study has several ("lora-s1"), "base", "base-nf4"
    arm: str  # the arm's name, "base" or "base-nf4"
    method: Literal["base", "nf4", "full", "lora", "qlora"]
    seed: int | None = None
    digest: str | None = None  # the trained weights' content; None for the base
    dir: str | None = None  # the trained arm's directory, relative to the artifacts root

    @property
    def is_base(self) -> bool:
        return self.method == "base"


BASE = Scored(label="base", arm="base", method="base")
# The base model in 4-bit NF4, scored like an arm when a study has QLoRA arms: the quantization's own cost.
QUANTIZED_BASE = Scored(label="base-nf4", arm="base-nf4", method="nf4", seed=0, digest="nf4")


class TrainedArm(Scored):
    """A finished arm: its weights (or adapter) in `dir`, the trainer's summary, its curve if measured."""

    digest: str
    dir: str
    key: str
    summary: dict[str, Any]
    curves: str | None = None  # curves.parquet, relative to the artifacts root


class Evaluation(Result):
    """Perplexity and bits per byte of one model on one set, with its per-row and per-document scores."""

    label: str
    arm: str
    seed: int | None
    set: Literal["domain", "general"]
    scores: str
    docs: str
    titles: str | None = None  # the general documents' titles (docs.parquet of the stream)
    ppl: float
    nll: float
    bpb: float
    tokens: int
    bytes: int
    rows: int
    kl: float | None = None  # mean KL(base ‖ model) per token, nats
    reference: str | None = None  # the base's top-k log-probabilities (eval.kl_top_k)
    hidden: str | None = None  # the base's last hidden states per batch, for the exact KL (models.StoredHidden)

    def record(self, root: str | Path) -> dict[str, Any]:
        """As a record of the report's tables: every field, `docs` as a path on this machine."""
        return self.model_dump() | {"docs": Path(root) / self.docs}


class TaskScore(Result):
    """One lm-eval task on one model: its score and per-example table (samples.parquet)."""

    label: str
    arm: str
    seed: int | None
    task: str
    metric: str
    score: float
    examples: int
    lm_eval: str | None = None
    samples: str


class Report(Result):
    """The report's files, relative to the artifacts root."""

    table: str
    runs: str
    general_docs: str
    report: str
    config: str
    perplexity: str
    frontier: str
    loss: str | None = None
    curves: str | None = None
    path: str | None = None
    tasks: str | None = None
    task_frontier: str | None = None
    matched_gain: str | None = None  # the arms' general change at equal domain gain (ftcore.matched_gain)
    headline: str | None = None  # the report's first sentence(s): that comparison in words

    def files(self) -> dict[str, str]:
        return self.model_dump(exclude={"digest"}, exclude_none=True)
