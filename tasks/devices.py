"""Device slots: one lock file per accelerator of this machine, so model-running steps share devices safely.

A slot is held with `fcntl.flock`, which the kernel releases when the holder dies, so a killed
run never leaves a slot taken. Slots belong to the machine, not to a study: two flow runs, two
studies or two work-pool runs on one GPU box never put two arms on one GPU. The holder writes who
it is into the lock file, so a step that waits can say for whom. The lock files live in
`$FTSTUDY_SLOTS_DIR` (default: a per-user directory under the system temp dir).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import itertools
import json
import os
import runpy
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def has_cuda() -> bool:
    """Whether torch sees a CUDA (or ROCm) GPU: torch.cuda.is_available(), asked only of a torch built for one.
    A CPU build (torch/version.py, read without importing torch) never sees one, so its caller skips torch's
    import (about 1.6 s of one core): a work-pool arm's run starts its arm fork server that much sooner."""
    if "torch" not in sys.modules and not _torch_built_for_gpus():
        return False
    import torch

    return torch.cuda.is_available()


def _torch_built_for_gpus() -> bool:
    """torch.version.cuda or .hip, read from the installed torch's version.py without importing torch; True when
    that file cannot be read (then torch itself is asked)."""
    spec = importlib.util.find_spec("torch")
    try:
        version = Path(next(iter(spec.submodule_search_locations or ()))) / "version.py"
        built = runpy.run_path(str(version))
    except (AttributeError, StopIteration, OSError, SyntaxError):
        return True
    return bool(built.get("cuda") or built.get("hip"))


def device_count() -> int:
    """GPUs visible to this process, or 1 (the CPU) when there are none (known without torch's import for a CPU
    build of torch: has_cuda)."""
    if not has_cuda():
        return 1
    import torch

    return torch.cuda.device_count() or 1


def visible_gpu(slot: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry for a slot: the slot-th GPU this process may use.

    A worker restricted to GPUs "4,5" (job variable env) gets slots 0 and 1, which are GPUs 4 and 5.
    """
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[slot] if slot < len(visible) else str(slot)


def slots_dir() -> Path:
    default = Path(tempfile.gettempdir()) / f"ftstudy-device-slots-{os.getuid()}"
    return Path(os.environ.get("FTSTUDY_SLOTS_DIR", default))


def holders(slots: int) -> list[str]:
    """Who holds each slot, as written by its holder ('slot 0: train-full (pid 123 on host) for 75 s')."""
    out = []
    for index in range(slots):
        try:
            info = json.loads((slots_dir() / f"slot-{index}.lock").read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            info = {}
        if info:
            held = time.time() - info.get("since", time.time())
            out.append(f"slot {index}: {info.get('label', '?')} (pid {info.get('pid')} on {info.get('host')}) "
                       f"for {held:.0f} s")
    return out


class StoppedError(RuntimeError):
    """A step that waited for a device slot while its study was stopped (Ctrl-C, SIGTERM, a cancellation)."""


# Which of this process's waiting steps goes first when a slot comes free: an evaluation (0) before an arm's training
# (1), then the step that began waiting first. A study's base is scored before any arm trains, and each arm's numbers
# follow its training instead of waiting behind the other arms (seen: the base's general evaluation waited 36 minutes
# behind three arms on a CPU's one slot); the total time is the same. Steps of other processes are not ordered.
EVALUATION, TRAINING = 0, 1
_waiting: set[tuple[int, int]] = set()  # (priority, ticket) of this process's steps waiting for slots
_waiting_lock = threading.Lock()
_tickets = itertools.count()


@contextlib.contextmanager
def _in_line(priority: int) -> Iterator[tuple[int, int]]:
    place = (priority, next(_tickets))
    with _waiting_lock:
        _waiting.add(place)
    try:
        yield place
    finally:
        with _waiting_lock:
            _waiting.discard(place)


def _may_try(place: tuple[int, int], slots: int) -> bool:
    """Whether a waiter may try the locks now: fewer of this process's waiters are before it than there are slots."""
    with _waiting_lock:
        return sum(other < place for other in _waiting) < slots


@contextlib.contextmanager
def device_slot(slots: int | None = None, label: str = "", log: Callable[[str], None] | None = None,
                poll: float = 0.5, report_every: float = 30.0, priority: int = EVALUATION) -> Iterator[int]:
    """Block until one of `slots` device slots is free; yield its index while holding it.

    While it waits it calls `log` at once and then every `report_every` seconds, naming the holders.
    """
    with device_slots(1, slots, label, log, poll, report_every, priority=priority) as held:
        yield held[0]


@contextlib.contextmanager
def device_slots(count: int, slots: int | None = None, label: str = "", log: Callable[[str], None] | None = None,
                 poll: float = 0.5, report_every: float = 30.0, stop: threading.Event | None = None,
                 priority: int = EVALUATION) -> Iterator[list[int]]:
    """Block until `count` of the machine's `slots` device slots are free together; yield their indices. Raises
    StoppedError when `stop` is set before the slots are taken (the study was stopped: a waiting step starts
    nothing, also one whose slot comes free as the study stops). Of this process's waiting steps, only the first
    `slots` in line try the locks: lower `priority` first (EVALUATION before TRAINING), then the one that began waiting
    earlier. On one slot that is a strict order; on N slots the first N race as before.

    All or nothing: a holder of some slots that cannot get the rest lets them go and tries again, so
    two arms that each need two GPUs never hold one each and wait forever. Raises ValueError when the
    machine has fewer than `count` slots.
    """
    slots = slots or device_count()
    if count > slots:
        raise ValueError(f"{label}: needs {count} devices (train.devices_per_arm) and this machine has {slots}; run "
                         "the arm on a worker with as many GPUs or lower train.devices_per_arm")
    lock_dir = slots_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    with _in_line(priority) as place:
        held = _wait_for_slots(place, lock_dir, slots, count, label, log, poll, report_every, stop)
    try:
        for _, fd in held:
            _write_holder(fd, label)
        yield [index for index, _ in held]
    finally:
        _release(held)


def _wait_for_slots(place: tuple[int, int], lock_dir: Path, slots: int, count: int, label: str,
                    log: Callable[[str], None] | None, poll: float, report_every: float,
                    stop: threading.Event | None) -> list[tuple[int, int]]:
    started = time.monotonic()
    next_report = started
    while True:
        if stop is not None and stop.is_set():  # also when the slot just came free: a stopped study starts nothing
            raise StoppedError(f"{label}: not started: the study is stopping")
        held = _lock_free(lock_dir, slots, count) if _may_try(place, slots) else []
        if len(held) == count:
            if log and time.monotonic() - started > poll:
                log(f"{label}: got device slot{'s' * (count > 1)} {', '.join(str(i) for i, _ in held)} after "
                    f"{time.monotonic() - started:.0f} s")
            return held
        _release(held)
        if log and time.monotonic() >= next_report:
            taken = "; ".join(holders(slots)) or "holders unknown"
            wanted = "a device slot" if count == 1 else f"{count} device slots together"
            log(f"{label}: waiting for {wanted} ({slots} on this machine, taken: {taken})")
            next_report = time.monotonic() + report_every
        time.sleep(poll)


def _lock_free(lock_dir: Path, slots: int, count: int) -> list[tuple[int, int]]:
    """Lock up to `count` free slots without waiting; (index, fd) of those locked."""
    held = []
    for index in range(slots):
        if len(held) == count:
            break
        fd = os.open(lock_dir / f"slot-{index}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held.append((index, fd))
    return held


def _release(held: list[tuple[int, int]]) -> None:
    for _, fd in held:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _write_holder(fd: int, label: str) -> None:
    info = json.dumps({"label": label, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
