"""Heavy imports with Python's cyclic garbage collector paused, their objects then frozen out of it.

Importing torch, transformers, TRL and peft creates about 580k objects that live as long as the process. While the
heap grows, the collector runs a full collection each time it has grown by a quarter, scanning everything imported so
far: about 1 s of one core of an arm process's 5.2 s of imports (2-core Zen 4 EPYC). Frozen afterwards (gc.freeze),
they are skipped by every later collection, which then scans only the process's own objects: transformers' Trainer
calls gc.collect() when an arm's training ends (0.31 s with them, about 0 without), and an arm forked from the fork
server leaves the pages it shares with the server untouched (Python's docs, gc.freeze). Cyclic garbage made during
the imports is frozen with them (kept, not collected): a few module-level objects, once per process.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


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
