"""Train one arm in its own process on a free device slot, and tell the user what happened there.

The child (`python -m tasks.arm_worker ROOT`, the plan as JSON on stdin; or, for one arm process on
the CPU, the same forked from a server that imported the libraries once: `start_arm`) writes one JSON
event per line to stdout: log records (ftcore's progress, and every library's warnings and errors, Python
warnings included), training progress, and on failure the error with its traceback. This side
forwards them to `log` (ftcore INFO lines, every WARNING and ERROR, each distinct warning once),
progress to `on_progress`, and raises with the child's own error line when it fails. The trainer's
summary is then read from the arm's directory; the caller records the step (ftcore.steps.run_step).

Every path the child sees is absolute (the artifacts root is resolved once, in the parent) and the
child runs in the caller's working directory, so where the study writes never depends on where
ftstudy is installed.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftcore.config import InputError, StudyConfig
from ftcore.plan import ArmPlan
from ftcore.plan import TRAIN_SUMMARY as SUMMARY
from tasks.devices import has_cuda

PR_SET_PDEATHSIG = 1
# The directory that holds the `tasks` package: the child imports it from there, wherever it runs.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

Log = Callable[[int, str], None]


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the parent dies, so a killed run leaves no orphan training."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def child_env(gpu: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


# The arm processes this process runs now, so an interrupted study can stop them (stop_arms).
LIVE: set[subprocess.Popen] = set()
# Set by stop_arms: a task thread that gets its device slot after the study was stopped starts nothing.
STOPPING = threading.Event()


class ArmStopped(RuntimeError):
    """An arm's process ended by SIGINT or SIGTERM (a terminal's Ctrl-C reaches it too, or the study stopped it)."""


def stop_arms() -> int:
    """Terminate every arm process this process started and that still runs, and start no new one in this
    process; return how many were stopped. Their checkpoints stay: a rerun resumes them. (Called on Ctrl-C /
    SIGTERM: Prefect waits for its task threads before it returns, and those wait for their arm, which
    would otherwise train on; a task still waiting for a device slot would start its arm when it got one.)"""
    STOPPING.set()
    running = [p for p in list(LIVE) if p.poll() is None]
    for proc in running:
        proc.terminate()
    return len(running)


def arm_command(plan: ArmPlan, root: Path) -> list[str]:
    """The arm's command: its worker module, under torchrun (one process per device, on this machine) when
    train.devices_per_arm > 1."""
    processes = plan.train.devices_per_arm
    if processes == 1:
        return [sys.executable, "-m", "tasks.arm_worker", str(root)]
    # --standalone: a rendezvous on this machine at a free port, so arms on one worker never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "--module", "tasks.arm_worker", str(root)]


def start_arm(plan: ArmPlan, root: Path, gpu: str | None) -> subprocess.Popen | ForkedArm:
    """The arm's process, started: forked from the arm fork server when it can be (`forkable`), else afresh
    (`arm_command`), the plan on its stdin (every process of a torchrun arm reads it from the environment)."""
    env = child_env(gpu)
    if forkable(plan, gpu):
        return ForkedArm(plan, root, env)
    if plan.train.devices_per_arm > 1:  # every process reads the plan; stdin reaches only one
        env["FTSTUDY_ARM_PLAN"] = plan.model_dump_json()
    proc = subprocess.Popen(arm_command(plan, root), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=_die_with_parent)
    assert proc.stdin is not None
    proc.stdin.write(plan.model_dump_json())
    proc.stdin.close()
    return proc


# The arm fork server (multiprocessing's forkserver, its libraries imported once: tasks.arm_libraries) and the
# environment it was started in, which its imports read (huggingface_hub's and datasets' settings, say).
_FORK_LOCK = threading.Lock()
_fork_environ: dict[str, str] | None = None
# Variables no library reads at import: ftstudy's own and Prefect's are read when used (the forked arm gets this
# process's environment as it is), pytest sets PYTEST_CURRENT_TEST anew for every test, and torch's inductor
# writes its default cache directory into TORCHINDUCTOR_CACHE_DIR the first time any code asks for it (in a study's
# process, between its start and its first arm: seen restarting a server started at the study's start).
READ_WHEN_USED = ("FTSTUDY_", "PREFECT_", "PYTEST_", "TORCHINDUCTOR_CACHE_DIR")


def _import_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(READ_WHEN_USED)}


FORK_ARMS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def fork_arms_enabled() -> bool:
    """FTSTUDY_FORK_ARMS (default on). Raises InputError (a ValueError) naming the variable for a value it does not
    know: a study checks it at its door (flows.cli, flows.study), before any step."""
    value = os.environ.get("FTSTUDY_FORK_ARMS", "").strip().lower() or "1"  # set but empty: the default, as unset
    if value not in FORK_ARMS:
        raise InputError(f"FTSTUDY_FORK_ARMS={os.environ['FTSTUDY_FORK_ARMS']!r}: set it to 0 (every arm's process "
                         "starts afresh; or false, no, off) or 1 (forked from the arm fork server where it can be; "
                         "or true, yes, on), or unset it (1, the default)")
    return FORK_ARMS[value]


def forkable(plan: ArmPlan, gpu: str | None) -> bool:
    """Whether the arm's process can be forked from the arm fork server: one process on the CPU (CUDA cannot be
    used in a forked process once its parent used it; an arm on GPUs runs long enough for a fresh start not to
    matter), not QLoRA (the server hides bitsandbytes), and the server's environment, but for READ_WHEN_USED,
    this process's (the libraries' import-time settings are a fresh process's): where it changed, the server is
    stopped for the next fork to start one anew, or, while a forked arm still runs, this arm starts afresh.
    FTSTUDY_FORK_ARMS=0 starts every arm afresh."""
    return _forkable(plan.method, plan.train.devices_per_arm, gpu)


def _forkable(method: str, devices_per_arm: int, gpu: str | None) -> bool:
    global _fork_environ
    if gpu is not None or devices_per_arm > 1 or method == "qlora":
        return False
    if not fork_arms_enabled():
        return False
    with _FORK_LOCK:
        now = _import_environ()
        before = now if _fork_environ is None else _fork_environ
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:  # names only: a value may be a secret
            logging.getLogger(__name__).info("%s changed since the arm fork server started", ", ".join(changed))
        if _fork_environ is None or (changed and _stop_fork_server()):
            multiprocessing.get_context("forkserver").set_forkserver_preload(["tasks.arm_libraries"])
            _fork_environ = now
        return _fork_environ == now


def prestart_fork_server(plan: ArmPlan, gpu: str | None) -> bool:
    """Start the arm fork server now where the arm's process will be forked from it (`forkable`), so that its
    imports (about 5 s of one core) overlap what comes before the fork: the wait for a device slot, a work-pool
    run's bookkeeping. Returns whether it runs. Raises InputError for an unknown FTSTUDY_FORK_ARMS."""
    if not forkable(plan, gpu):
        return False
    multiprocessing.forkserver.ensure_running()  # spawns it and returns; a fork waits for its imports
    return True


def prestart_for_study(cfg: StudyConfig) -> bool:
    """At a study's start, where its arms' processes will be forked here (the subprocess executor, no CUDA, an arm
    that `forkable` allows): start the arm fork server now, so that its imports (about 4 s of one core) overlap the
    study's first steps (fetch, tokenize, the base's evaluations) instead of following them: the first arm got its
    device slot, then waited that long for the server. Returns whether it runs. A study whose arms are all recorded
    starts it for nothing (a process that exits with the study)."""
    if cfg.executor != "subprocess" or not any(_forkable(a.method, cfg.train.devices_per_arm, None) for a in cfg.arms):
        return False
    if has_cuda():  # the arms get GPUs, and a process on a GPU is never forked
        return False
    multiprocessing.forkserver.ensure_running()
    return True


def _live_forked_arms() -> bool:
    return any(isinstance(p, ForkedArm) and p.poll() is None for p in LIVE)


def _stop_fork_server() -> bool:
    """Stop the fork server (the next fork starts a new one), unless a forked arm still runs (its process holds
    the server open) or this Python lacks multiprocessing's ForkServer._stop (private; Python 3.8 to 3.14)."""
    if _live_forked_arms():
        return False
    stop = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_stop", None)
    if stop is None:
        return False
    stop()
    return True


class ForkedArm:
    """An arm's process forked from the arm fork server (tasks.arm_worker.forked_main), with the part of
    subprocess.Popen's interface this module uses: stdout (its stdout and stderr, text), poll, wait, terminate."""

    def __init__(self, plan: ArmPlan, root: Path, env: dict[str, str]):
        from tasks.arm_worker import forked_main

        ctx = multiprocessing.get_context("forkserver")
        read, write = ctx.Pipe(duplex=False)  # the child's stdout and stderr
        watch, self._lifeline = ctx.Pipe(duplex=False)  # only this process writes: EOF in the child when it ends
        self._process = ctx.Process(target=forked_main, name=f"arm {plan.label}", daemon=False,
                                    args=(plan.model_dump_json(), str(root), env, os.getcwd(), write, watch))
        try:
            self._process.start()
        finally:
            write.close()
            watch.close()
        self.stdout = open(os.dup(read.fileno()), encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by wait
        read.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self) -> int:
        self._process.join()
        self.stdout.close()
        self._lifeline.close()
        code = self._process.exitcode
        assert code is not None
        return code

    def terminate(self) -> None:
        self._process.terminate()


def train_in_subprocess(plan: ArmPlan, root: str | Path, log: Log, gpu: str | None = None,
                        on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train `plan` under the absolute artifacts `root` in a child process (or, with train.devices_per_arm
    N > 1, N processes under torchrun, on the GPUs `gpu` lists); return the trainer's summary.

    Raises RuntimeError whose first line names the arm and the child's error (what the report shows).
    """
    root = Path(root)
    if not root.is_absolute():
        raise ValueError(f"the artifacts root must be absolute in the arm's process, got {root}")
    if STOPPING.is_set():
        raise RuntimeError(f"arm {plan.label} not started: the study is stopping")
    proc = start_arm(plan, root, gpu)
    assert proc.stdout is not None
    LIVE.add(proc)
    if STOPPING.is_set():  # stopped while the arm started (a fork waits for the fork server's imports): stop_arms
        proc.terminate()   # saw no process to stop (seen: a SIGTERMed study waited for its arm to train to the end)
    try:
        events = EventReader(log, on_progress)
        for line in proc.stdout:
            events.read(line.rstrip("\n"))
        code = proc.wait()
    except BaseException:
        # Interrupted here, in the thread that waits (a train-arm run's SIGTERM on cancellation, raised by Prefect's
        # handler): the arm must not train on, and this process would wait for it at exit. Checkpoints stay.
        proc.terminate()
        raise
    finally:
        LIVE.discard(proc)
    if code in (-signal.SIGINT, -signal.SIGTERM):  # Ctrl-C or a stop: the reason is known, its log is noise here
        raise ArmStopped(f"arm {plan.label} stopped before it finished; the same study resumes it from its last "
                         "checkpoint, if it wrote one")
    if code != 0:
        reason = "killed (out of memory?)" if code in (-signal.SIGKILL, 137) else f"exit code {code}"
        error = events.error or events.last_error_line()
        raise RuntimeError(f"arm {plan.label} failed ({reason})" + (f": {error}" if error else "") + "\n"
                           + "\n".join(events.tail))
    summary = root / plan.dir / SUMMARY
    if not summary.is_file():
        raise RuntimeError(f"arm {plan.label}: its process ended without error but {summary.parent} holds no "
                           f"{SUMMARY} (a finished arm)")
    return json.loads(summary.read_text())


class EventReader:
    """Turns the child's output lines into log calls, progress calls and the child's error."""

    def __init__(self, log: Log, on_progress: Callable[[dict[str, Any]], None] | None):
        self.log, self.on_progress = log, on_progress
        self.tail: collections.deque[str] = collections.deque(maxlen=120)  # torchrun's own traceback alone is ~40 lines; the rank's cause precedes it
        self.seen: set[tuple[str, str]] = set()
        self.error: str | None = None

    def read(self, line: str) -> None:
        try:
            event = json.loads(line) if line.startswith("{") else None
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            self._raw(line)
        elif "progress" in event:
            if self.on_progress:
                self.on_progress(event["progress"])
        elif "log" in event:
            self._record(event)

    def _record(self, event: dict[str, Any]) -> None:
        level = logging.getLevelName(event["log"])
        level = level if isinstance(level, int) else logging.INFO
        name, message = event.get("name", "?"), event.get("msg", "")
        self.tail.append(f"{name}: {message}")
        if event.get("error"):
            self.error = event["error"]
            self.tail.extend(event.get("traceback", "").splitlines())
        if level >= logging.WARNING:
            if level == logging.WARNING and (name, message) in self.seen:
                return
            self.seen.add((name, message))
            self.log(level, message if name.startswith("ftcore") else f"{name}: {message}")
        elif name.startswith("ftcore"):
            self.log(level, message)

    def _raw(self, line: str) -> None:
        """Output that did not come through logging (a library's print, a crash in C): kept for the failure
        message; forwarded once when it looks like a warning or an error."""
        if not line.strip():
            return
        self.tail.append(line)
        lowered = line.lower()
        if ("warn" in lowered or "error" in lowered) and ("raw", line) not in self.seen:
            self.seen.add(("raw", line))
            self.log(logging.WARNING, line)

    def last_error_line(self) -> str | None:
        """The child's exception line (`SomeError: message`), if its output ends with a traceback."""
        for line in reversed(self.tail):
            head = line.split(":", 1)[0]
            if ":" in line and " " not in head and (head.endswith("Error") or head.endswith("Exception")):
                return line.strip()
        return None
