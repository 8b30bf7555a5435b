"""One way to run a step: `Step` says where a result lives and how it is computed; `run_step` runs it.

A step's result lives in `<artifacts root>/<prefix>/<key>/` (its `dir`; ftcore.keys: the key hashes
what the step reads and the code that computes it). That directory is the one truth of "done": it
is done when its manifest (sizes and checksums of its files, written last) verifies, and then its
result.json is the result and nothing is computed again. `run_step` is the only function that
decides: it takes the directory's lock, returns the recorded result or computes, records and
returns it. Both runners call it: `InlineRunner` here (one process, no Prefect: notebooks, tests,
benchmarks) and the Prefect runner in tasks/ (each step a task run; arms in their own processes).

The steps themselves — what each reads, the code that computes it — are defined in ftcore.study.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from ftcore import keys
from ftcore.io import entries_digest, file_entries, step_lock, verify_manifest, write_json, write_manifest
from ftcore.plan import ArmPlan

log = logging.getLogger("ftcore.steps")
RESULT = "result.json"
TIMING = "timing.json"
R = TypeVar("R", bound=BaseModel)
# compute(directory, device) writes the step's files into the directory and returns its result's fields;
# device is where a model runs ("cuda:1"), None for the config's choice.
Compute = Callable[[Path, "str | None"], dict[str, Any]]


@dataclass(frozen=True)
class Step:
    """One step of the study, resolved: where its result lives and how it is computed.

    `kind` names its code and libraries in its key (ftcore.keys); `label` is what logs and the UI
    call it; `outputs` are the files later steps read (their checksums are the result's `digest`
    unless `compute` sets one), `extras` files kept and checked that change no digest (logs).
    `devices` is how many device slots it holds while it computes (0: none); `arm` is set for a
    training step, which a runner may run in its own process.
    """

    kind: str
    label: str
    dir: Path
    compute: Compute
    result: type[BaseModel]
    outputs: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    devices: int = 0
    arm: ArmPlan | None = field(default=None, repr=False)
    # Fields of the result that name it in this study (its label), not part of its content: they come from the
    # current study, also when the result was recorded by an earlier one (a seed added relabels "full" "full-s0").
    names: dict[str, Any] = field(default_factory=dict)
    resumable: bool = False  # what a failed run leaves (checkpoints) is where the next one resumes: kept

    @property
    def root(self) -> Path:
        """The artifacts root: every step lives at <root>/<prefix>/<key>."""
        return self.dir.parents[1]


def step_dir(root: str | Path, prefix: str, kind: str, reads: dict[str, Any], definition: Callable[..., Step],
             without: tuple[str, ...] = ()) -> Path:
    """Where a step's result lives: <root>/<prefix>/<key>, the key over what it reads and the code of its
    `definition` (ftcore.keys.step_key)."""
    return Path(root) / prefix / keys.step_key(kind, reads, (definition,), without)


def recorded(step: Step) -> Any:
    """The step's result (its `result` type) when its directory holds a finished, unmodified result; else None."""
    if not verify_manifest(step.dir):
        return None
    return step.result.model_validate(json.loads((step.dir / RESULT).read_text()) | step.names)


def run_step(step: Step, compute: Compute | None = None, device: str | None = None) -> Any:
    """The step's recorded result when its directory verifies, else compute it (with `compute` instead of the
    step's own when given: a runner's way to run the same computation elsewhere), record it and return it.

    A lock per directory makes concurrent runs of the same study wait for each other instead of
    writing the same files; the manifest, written last, makes an unfinished, edited or truncated
    result a miss, so it is recomputed and never read as whole. Outputs are hashed once, here.
    """
    out = step.dir
    with step_lock(out):
        if (done := recorded(step)) is not None:
            return done
        if out.exists() and step.resumable:  # an unfinished arm: its trainer says whether a checkpoint resumes it
            log.info("%s: not finished in %s: continuing it", step.label, out)
        elif out.exists():
            log.info("%s: no valid manifest in %s (unfinished, or changed on disk): computing it again", step.label, out)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            fields = (compute or step.compute)(out, device)
        except BaseException:
            if not step.resumable:  # nothing half-computed stays behind to be looked at as a result
                shutil.rmtree(out, ignore_errors=True)
            raise
        # The step's own compute time: what orchestration overhead is measured against (bench/flow.py).
        write_json({"seconds": round(time.perf_counter() - started, 3)}, out / TIMING)
        hashed = file_entries(out, list(step.outputs))
        fields.setdefault("digest", entries_digest(hashed))
        result = step.result.model_validate(fields | step.names)
        write_json(result.model_dump(mode="json"), out / RESULT)
        write_manifest(out, [*step.extras, TIMING, RESULT], known=hashed)
        return result


# --- runners -----------------------------------------------------------------------------------------

Define = Callable[..., Step]  # a step's definition: its inputs (results of earlier steps) -> the Step


class Runner(Protocol):
    """How the DAG's steps run. `run` waits for a step; `submit` may run it concurrently and returns a future.
    Arguments may be futures of earlier steps; `label` names the step before its inputs are known."""

    arms_in_process: bool  # whether arms train in this process (the in-process runner)

    def run(self, define: Define, *args: Any, label: str) -> Any: ...

    def submit(self, define: Define, *args: Any, label: str) -> Any: ...

    def outcome(self, future: Any) -> tuple[Any, str | None]:
        """(result, None) when the step finished, (None, why) when it failed."""


@dataclass
class Done:
    """A finished step of the InlineRunner: its result, or the error it failed with."""

    value: Any = None
    error: BaseException | None = None


class InlineRunner:
    """Every step in this process, one after another. A failing step's error is kept in its future, so
    the DAG decides (an arm fails alone); bad input (InputError) stops the study at once."""

    arms_in_process = True

    def run(self, define: Define, *args: Any, label: str) -> Any:
        return run_step(define(*args))

    def submit(self, define: Define, *args: Any, label: str) -> Done:
        from ftcore.config import InputError

        failed = next((a.error for a in args if isinstance(a, Done) and a.error is not None), None)
        if failed is not None:
            return Done(error=RuntimeError(f"{label}: an input failed ({failed})"))
        try:
            return Done(self.run(define, *(a.value if isinstance(a, Done) else a for a in args), label=label))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - the DAG reports it (a failed arm), the others go on
            log.exception("%s failed", label)
            return Done(error=exc)

    def outcome(self, future: Done) -> tuple[Any, str | None]:
        if future.error is None:
            return future.value, None
        return None, f"{type(future.error).__name__}: {future.error}"


class NotRecorded(Exception):
    """A step the RecordedRunner found without a recorded result: the study has work to do."""


class RecordedRunner(InlineRunner):
    """Recorded results only: the first step that would compute raises NotRecorded instead. A study whose every
    step is recorded is read back this way in under a second, without a Prefect server or any model loaded;
    a caller that gets NotRecorded runs the study with another runner (`ftstudy run` does). `arms_in_process`
    is that runner's, so the inputs checked for it are not checked again."""

    def __init__(self, arms_in_process: bool = True):
        self.arms_in_process = arms_in_process

    def run(self, define: Define, *args: Any, label: str) -> Any:
        if (done := recorded(define(*args))) is None:
            raise NotRecorded(label)
        return done

    def submit(self, define: Define, *args: Any, label: str) -> Done:
        return Done(self.run(define, *(a.value if isinstance(a, Done) else a for a in args), label=label))


def result(runner: Runner, future: Any) -> Any:
    """A step's result; raises when it failed."""
    value, error = runner.outcome(future)
    if error is not None:
        raise RuntimeError(error)
    return value

