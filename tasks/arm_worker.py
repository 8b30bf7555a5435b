"""Entry point of an arm's own process: `python -m tasks.arm_worker ROOT`, the ArmPlan as JSON on stdin
(or, for an arm on several devices started by torchrun, in the environment variable FTSTUDY_ARM_PLAN), or
`forked_main` in a process forked from the arm fork server (tasks.arm_process), the same in every other way.

Training runs in a child process so that a crash or an out-of-memory kill takes down that arm
alone, and so the arm sees only its own device (CUDA_VISIBLE_DEVICES set by the parent). Every
log record (ftcore's, the libraries', Python warnings) and every progress update goes to stdout as
one JSON object per line, which tasks.arm_process reads; the arm's files are its step directory, which the
parent records.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterable
from typing import Any

from ftcore.hardware import resolve_device
from ftcore.plan import ArmPlan
from tasks.heap import frozen_imports, give_back_when_short, keep_freed_memory


class JsonLines(logging.Handler):
    """One JSON object per log record on stdout."""

    def emit(self, record: logging.LogRecord) -> None:
        event: dict[str, Any] = {"log": record.levelname, "name": record.name, "msg": record.getMessage()}
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            event["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            event["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        emit(event)


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def setup_logging() -> logging.Logger:
    """Everything that logs or warns reaches the JSON handler: ftcore at INFO, libraries at WARNING."""
    root = logging.getLogger()
    root.handlers[:] = [JsonLines()]
    root.setLevel(logging.WARNING)
    logging.getLogger("ftcore").setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each distinct warning once per place, not silenced
    # Raised by torch itself when transformers imports (torch.jit.script_method): nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method.* is deprecated", category=DeprecationWarning)
    # Raised inside transformers when TRL wraps a LoRA arm's model with peft (the trainer's construction, outside
    # ftcore.models.quiet_library_deprecations, which covers training): nothing a user can act on either.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # One line per warning: where and what, without the echoed source line.
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: (
        f"{category.__name__}: {message} ({filename}:{lineno})")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    except ImportError:
        pass
    return logging.getLogger("ftcore.arm")


PLAN_ENV = "FTSTUDY_ARM_PLAN"
PR_SET_NAME = 15


def hide_unused_libraries(methods: Iterable[str]) -> None:
    """In a process that trains or studies only these arms' `methods`, before the training libraries are imported:
    bitsandbytes absent unless one is QLoRA. peft and transformers import it whenever it is installed, and it imports
    torch's compiler and a kernel hub (which warns, offline, that it cannot check a publisher): 1.5-4 s of every such
    process's start (BENCHMARKS.md §14). None in sys.modules makes a module absent (importlib.util.find_spec returns
    None, an import raises ImportError) for the rest of the process: a process that may run a QLoRA arm later must
    not call this."""
    if "qlora" not in set(methods):
        sys.modules.setdefault("bitsandbytes", None)


def main(root: str, plan_json: str | None = None) -> int:
    log = setup_logging()
    first = int(os.environ.get("RANK", "0")) == 0
    if not first:  # the arm's other processes: their errors only, the first reports the rest
        logging.getLogger("ftcore").setLevel(logging.ERROR)
        logging.getLogger().setLevel(logging.ERROR)
    try:
        plan = ArmPlan.model_validate_json(plan_json or os.environ.get(PLAN_ENV) or sys.stdin.read())
        hide_unused_libraries([plan.method])
        with frozen_imports():  # as in the fork server (tasks.arm_libraries); a forked arm has them already
            from ftcore import training
        # On a CPU, each step reuses the last one's pages, given back only when the machine runs short (tasks.heap).
        kept = keep_freed_memory(resolve_device(plan.device))

        # Training only: the parent holds the step's lock and records the result (ftcore.steps.run_step).
        training.train_arm(plan, root, callbacks=[give_back_when_short()] if kept else None,
                           on_progress=(lambda p: emit({"progress": p})) if first else None)
    except KeyboardInterrupt:
        end_by_sigint()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the arm with it
        log.error("arm failed: %s: %s", type(exc).__name__, exc, exc_info=True)
        return 1
    return 0


def end_by_sigint() -> None:
    """End this process by SIGINT itself, its default action. A terminal's Ctrl-C signals the whole process
    group, the arm included: Python turns it into KeyboardInterrupt, which, caught as an error, would end the arm
    with exit code 1 (reported as a failure, with a traceback) whenever it arrives before the study's own stop
    (SIGTERM). Ended by the signal, the study reports a stopped arm either way (tasks.arm_process)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    signal.pause()  # not reached: the signal ends the process once the call returns


def die_with(lifeline: Any) -> None:
    """SIGKILL this process when `lifeline`'s other end closes: the study's process ended, even by SIGKILL, and
    a killed run leaves no orphan training. (PR_SET_PDEATHSIG would watch the fork server, our parent.)"""

    def watch() -> None:
        try:
            lifeline.recv_bytes()
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="arm-lifeline", daemon=True).start()


def name_process(name: bytes) -> None:
    """The name ps, top and psutil show for this process (a forked arm's command line is the fork server's)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_NAME, name)
    except OSError:
        pass


def forked_main(plan_json: str, root: str, env: dict[str, str], cwd: str, out: Any, lifeline: Any) -> None:
    """In a process forked from the arm fork server, whose libraries are imported (tasks.arm_libraries): become
    the process `python -m tasks.arm_worker ROOT` would be (the arm's environment and working directory, stdout
    and stderr into `out`, the write end of the study's pipe) and train; killed when the study's process ends
    (`lifeline`: a pipe only it writes to). Exits with main's code, or by the signal that stopped it."""
    die_with(lifeline)
    name_process(b"ftstudy-arm")
    # multiprocessing's default start method, as in a fresh process: forkserver (inherited) would make every lock a
    # library creates (tqdm's, say) a named semaphore, left to the study's resource tracker when the arm is stopped.
    multiprocessing.set_start_method(None, force=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    setup_logging()
    # As an arm started afresh reports them. Absent where the server's import failed (it ignores that): main then
    # imports the libraries itself and reports the error as an arm started afresh does.
    preloaded = sys.modules.get("tasks.arm_libraries")
    for caught in getattr(preloaded, "IMPORT_WARNINGS", []):
        warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
    sys.exit(main(root, plan_json))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
