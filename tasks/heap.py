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
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Iterator

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
