"""One line to the terminal when its reader may be gone.

`ftstudy run ... | tee log` (or `ftstudy serve | tee`) and Ctrl-C: the terminal's SIGINT ends tee too, so every
later write to the pipe fails. The commands still have lines to say while they stop (what was stopped, how to
resume), and must still stop everything and exit with their own code. And `ftstudy show | head` ends the reader
before the command has printed everything: the command stops there, without a traceback.
"""

from __future__ import annotations

import os
import select
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
        silence()


def silence() -> None:
    """Point stdout and stderr at /dev/null: their reader is gone, and the interpreter's own flush at exit would
    print an error too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for out in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, out.fileno())
        except (OSError, ValueError):
            pass
    os.close(devnull)


def reader_gone(stream: TextIO) -> bool:
    """Whether `stream` is a pipe whose reading end is closed (`ftstudy show | head -1` after head exited): poll(2)
    reports POLLERR on such a pipe's writing end. False for a terminal, a file, or a stream without a descriptor."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), 0)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False
