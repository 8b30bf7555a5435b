"""Imported once by the arm fork server (tasks.arm_process): the libraries an arm's process needs, so that
each arm forked from it starts in a fraction of a second instead of importing them again (about 7 s of
torch, transformers, TRL, peft and datasets on a 2-core CPU; BENCHMARKS.md §14).

bitsandbytes is hidden first, as in every non-QLoRA arm's process (tasks.arm_worker.hide_unused_libraries):
QLoRA arms are started afresh instead. The warnings raised while importing are kept, for each forked arm
to report through its own log as an arm started afresh does.
"""

import sys
import warnings

sys.modules.setdefault("bitsandbytes", None)
with warnings.catch_warnings(record=True) as IMPORT_WARNINGS:
    warnings.simplefilter("always")
    import ftcore.training  # noqa: F401
