"""Device slots: one lock file per accelerator, so model-running steps share devices safely.

A slot is held with `fcntl.flock`, which the kernel releases when the holder dies, so a killed
run never leaves a slot taken. Slots are per artifacts root and work across processes (two flow
runs on one machine) as well as across the threads of one flow run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


def device_count() -> int:
    """GPUs visible to this process, or 1 (the CPU) when there are none."""
    import torch

    return torch.cuda.device_count() or 1


@contextlib.contextmanager
def device_slot(root: str | Path, slots: int | None = None, poll: float = 0.5) -> Iterator[int]:
    """Block until one of `slots` device slots is free; yield its index while holding it."""
    slots = slots or device_count()
    lock_dir = Path(root) / ".device-slots"
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
