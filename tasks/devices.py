"""Device slots: one lock file per accelerator of this machine, so model-running steps share devices safely.

A slot is held with `fcntl.flock`, which the kernel releases when the holder dies, so a killed
run never leaves a slot taken. Slots belong to the machine, not to a study: two flow runs, two
studies or two work-pool runs on one GPU box never put two arms on one GPU. The lock files live in
`$FTSTUDY_SLOTS_DIR` (default: a per-user directory under the system temp dir).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def device_count() -> int:
    """GPUs visible to this process, or 1 (the CPU) when there are none."""
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


@contextlib.contextmanager
def device_slot(slots: int | None = None, poll: float = 0.5) -> Iterator[int]:
    """Block until one of `slots` device slots is free; yield its index while holding it."""
    slots = slots or device_count()
    lock_dir = slots_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(slots):
            fd = os.open(lock_dir / f"slot-{index}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield index
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        time.sleep(poll)
