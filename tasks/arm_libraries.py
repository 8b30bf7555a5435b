"""Imported once by the arm fork server (tasks.arm_process): the libraries an arm's process needs, so that
each arm forked from it starts in a fraction of a second instead of importing them again (about 7 s of
torch, transformers, TRL, peft and datasets on a 2-core CPU; BENCHMARKS.md §14).

bitsandbytes is hidden first, as in every non-QLoRA arm's process (tasks.arm_worker.hide_unused_libraries):
QLoRA arms are started afresh instead. The warnings raised while importing are kept, for each forked arm
to report through its own log as an arm started afresh does.
"""

import signal
import sys
import threading
import warnings

from tasks.heap import frozen_imports

sys.modules.setdefault("bitsandbytes", None)
# The server is in the terminal's process group, and Python's forkserver ignores SIGINT only after this import: a
# Ctrl-C during these seconds killed it with a traceback and failed the arm waiting for it (EOFError) instead of
# stopping it. The handler before is restored, and forkserver gives it back to every arm it forks.
_main = threading.current_thread() is threading.main_thread()  # signal.signal works only there
_interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main else None
try:
    # The collector paused while importing, the objects then frozen (tasks.heap): every arm forked from here inherits
    # them frozen, so its collections skip them and leave the pages it shares with this server untouched.
    with warnings.catch_warnings(record=True) as IMPORT_WARNINGS, frozen_imports():
        warnings.simplefilter("always")
        import ftcore.training  # noqa: F401
finally:
    if _main:
        signal.signal(signal.SIGINT, _interrupt)
