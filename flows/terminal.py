"""One line to the terminal when its reader may be gone.

`ftstudy run ... | tee log` (or `ftstudy serve | tee`) and Ctrl-C: the terminal's SIGINT ends tee too, so every
later write to the pipe fails. The commands still have lines to say while they stop (what was stopped, how to
resume), and must still stop everything and exit with their own code.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO


def say(line: str, stream: TextIO | None = None) -> None:
    """Print `line` to `stream` (default stderr) and flush. Where the reader is gone (BrokenPipeError, or any other
    OSError of the write), nothing is printed and stdout and stderr are pointed at /dev/null, so that no later line
    and no flush at the interpreter's exit fails either (Python's docs, "Note on SIGPIPE"). Never raises."""
    try:
        print(line, file=stream or sys.stderr, flush=True)
        sys.stdout.flush()
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for out in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, out.fileno())
            except (OSError, ValueError):
                pass
        os.close(devnull)
