"""The process's heap: heavy imports with Python's garbage collector paused and their objects frozen; glibc's malloc
told to keep and reuse what a step frees.

Imports. Importing torch, transformers, TRL and peft creates about 580k objects that live as long as the process.
While the heap grows, the collector runs a full collection each time it has grown by a quarter, scanning everything
imported so far: about 1 s of one core of an arm process's 5.2 s of imports (2-core Zen 4 EPYC). Frozen afterwards
(gc.freeze), they are skipped by every later collection, which then scans only the process's own objects:
transformers' Trainer calls gc.collect() when an arm's training ends (0.31 s with them, about 0 without), and an arm
forked from the fork server leaves the pages it shares with the server untouched (Python's docs, gc.freeze). Cyclic
garbage made during the imports is frozen with them (kept, not collected): a few module-level objects, once per
process.

Freed memory. glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages from the
kernel and hands them back on free: an arm's activations, gradients and the training loss's buffers were page-faulted
in afresh at every step, a fault per 4 KiB. With mmap off and the heap's top kept, a freed tensor's pages are reused by
the next: in demo-base on a 2-core Xeon, an arm's steps ran 1.24x as fast (the whole study 22:40 against 24:22, where
runs drift by about 5%), with the same numbers (BENCHMARKS.md §12). Only in the main thread: a thread's malloc arena maps every block over its
64-MiB heap whatever mallopt says, which is why the study's evaluations (Prefect tasks, in threads) reuse a buffer
of their own for the logits instead (ftcore.models.ReusedLogits). Transparent huge pages for torch's allocations
(THP_MEM_ALLOC_ENABLE) were slower there: 0.70x training, 0.80x evaluation.

Given back when short. Kept freed memory only grows: the blocks a step frees are split by allocations of other
sizes, and a later step's large block no longer fits any free one and extends the heap. demo-base's replay arm, a
steady 4.9 GB in use, held 3.9 GB free after its first curve point and 10.0 GB after 20 steps, all of it resident
(bench.arm_memory, a 2-core Zen 4); in a whole study its process reached 21.5 GB and was killed for memory beside the
study's own. So an arm gives its freed pages back (malloc_trim) whenever less than an eighth of the machine's memory,
or of its cgroup's limit, is available (give_back_when_short): on a machine with room nothing changes; when short,
the next steps fault their pages in again (one give-back: about 15 s over the next five steps there) instead of the
arm being killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import TrainerCallback

# mallopt(3)'s parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


@contextlib.contextmanager
def frozen_imports() -> Iterator[None]:
    """Run the block (imports) with automatic garbage collection paused; then freeze every object the process holds
    (gc.freeze) and restore the collector as it was. Raises what the block raises (the collector is restored)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        if enabled:
            gc.enable()


def keep_freed_memory(device: str) -> bool:
    """Where the process computes on the CPU (`device`, resolved: "cpu" or "cuda"), tell glibc's malloc to serve
    every allocation from its heap (mallopt M_MMAP_MAX 0: no mmap) and to keep freed memory at the heap's top
    (M_TRIM_THRESHOLD at its largest, 2 GiB less a byte), for the rest of this process and the processes it forks:
    what a step frees in the main thread is reused instead of returned to the kernel and faulted in again (a thread's
    arena still maps every block over 64 MiB). Returns whether glibc
    accepted both; False, with nothing changed, for another device (its tensors are not in this heap, and the host
    memory a large model's weights held before they moved to the GPU is better given back) or where the C library
    is not glibc (no mallopt: musl, macOS). Raises nothing."""
    if device != "cpu":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def give_back_freed_memory() -> bool:
    """Hand the pages of every free block in glibc's heaps back to the kernel (malloc_trim(0): madvise DONTNEED on
    each free block's whole pages, the heap's top cut). The blocks stay the heap's, so the next allocation there
    faults its pages in afresh. Returns whether any memory was given back; False where the C library is not glibc.
    Raises nothing."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return bool(trim(0))


# Freed pages are given back when less memory than this share of the machine's (or the cgroup's limit) is
# available: more than the largest burst between two checks (in bench.arm_memory the heap's free part grew by at most
# 1.9 GB in a step, its step 2; a curve point's logits reuse the heap's free blocks).
SHORT_SHARE = 1 / 8


def available_memory(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """(available, total) in bytes for this process: the kernel's MemAvailable and MemTotal, or the headroom under a
    cgroup memory limit and that limit where one is set lower, on the process's cgroup or any above it (a systemd
    slice's or a pod's limit; cgroup v2 memory.max and memory.current, v1 memory.limit_in_bytes and
    memory.usage_in_bytes, each less the inactive file cache), the level with the least headroom. None where
    /proc/meminfo cannot be read (not Linux). Raises nothing."""
    try:
        info = dict(line.split(":", 1) for line in (proc / "meminfo").read_text().splitlines() if ":" in line)
        available, total = (int(info[k].split()[0]) * 1024 for k in ("MemAvailable", "MemTotal"))
    except (OSError, KeyError, ValueError, IndexError, UnicodeDecodeError):
        return None
    limited = [(limit, used) for limit, used in _cgroup_memory(proc, cgroups) if limit < total]
    if not limited:
        return available, total
    limit, used = min(limited, key=lambda level: level[0] - level[1])
    return min(available, max(limit - used, 0)), limit


def _cgroup_memory(proc: Path, cgroups: Path) -> Iterator[tuple[int, int]]:
    """(limit, working set) in bytes of the process's memory cgroup and of each above it up to the mount's top (v2,
    v1), where they can be read (an unlimited v2 level, "max", is skipped). The working set is the usage less the
    inactive file cache (memory.stat), which the kernel reclaims before it kills anything (the container runtimes'
    and Kubernetes' measure); cache read from the model's files would otherwise count."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        v2 = controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        top = cgroups if v2 else cgroups / "memory"
        files = ("memory.max", "memory.current") if v2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        where = top / path.lstrip("/")
        for level in (where, *where.parents):
            try:
                limit, usage = (int((level / name).read_text().strip()) for name in files)  # v2 "max": ValueError
            except (OSError, ValueError, UnicodeDecodeError):
                pass
            else:
                cache = _inactive_file(level / "memory.stat", "inactive_file" if v2 else "total_inactive_file")
                yield limit, usage - cache
            if level == top:
                break


def _inactive_file(stat: Path, key: str) -> int:
    """The cgroup's inactive file cache in bytes (0 where memory.stat cannot be read)."""
    try:
        fields = dict(line.split() for line in stat.read_text().splitlines() if len(line.split()) == 2)
        return int(fields.get(key, 0))
    except (OSError, ValueError, UnicodeDecodeError):
        return 0


def give_back_when_short(share: float = SHORT_SHARE,
                         memory: Callable[[], tuple[int, int] | None] = available_memory,
                         give_back: Callable[[], bool] = give_back_freed_memory) -> TrainerCallback:
    """A trainer callback for an arm whose process keeps freed memory (keep_freed_memory): whenever less than
    `share` of the machine's memory is `memory()`'s available (after each optimizer step, before the step's curve
    point; after it; after each checkpoint), the freed pages are given back (`give_back`); the first time and, when
    training ends, how often are logged (ftcore.arm, INFO). Kept freed memory only grows: the blocks a step frees are
    split by blocks of other sizes and the next step takes fresh ones (demo-base's replay arm: 3.9 GB free after its
    first curve point, 10.0 GB after 20 steps, bench.arm_memory), so on a machine that runs short an arm would be
    killed for memory; given back, the next steps fault their pages in again (about 15 s over five demo-base steps),
    so only when short. Raises nothing."""
    from transformers import TrainerCallback

    class GiveBackWhenShort(TrainerCallback):
        given = 0

        def check(self) -> None:
            found = memory()
            if found is None or found[0] >= share * found[1]:
                return
            give_back()
            self.given += 1
            if self.given == 1:
                logging.getLogger("ftcore.arm").info(
                    "memory short (%.1f of %.1f GB available): the arm gives its freed memory back each time memory "
                    "is short, and the steps after are slower (tasks.heap)", found[0] / 1e9, found[1] / 1e9)

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.check()

        def on_step_end(self, args, state, control, **kwargs):
            self.check()

        def on_save(self, args, state, control, **kwargs):
            self.check()

        def on_train_end(self, args, state, control, **kwargs):
            if self.given:  # how often: each time cost the next steps their page faults
                logging.getLogger("ftcore.arm").info(
                    "memory was short %d time(s) by step %d; each time the arm gave its freed memory back "
                    "(tasks.heap)", self.given, state.global_step)
            self.given = 0

    return GiveBackWhenShort()
