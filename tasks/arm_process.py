"""Run one arm in a child process bound to a device slot, forwarding its log and progress."""

from __future__ import annotations

import collections
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftcore.config import StudyConfig

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the parent dies, so a killed run leaves no orphan training."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def run_arm_process(
    cfg: StudyConfig,
    arm: str,
    model: dict[str, Any],
    domain: dict[str, Any],
    replay: dict[str, Any] | None,
    gpu: str | None,
    log: Callable[[str], None],
    key: str,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    arm_dir: Path | None = None,
) -> dict[str, Any]:
    """Train `arm` in `python -m tasks.arm_worker`; raise with the tail of its output if it fails."""
    with tempfile.TemporaryDirectory(prefix=f"ftstudy-{arm}-") as tmp:
        request = Path(tmp) / "request.json"
        result = Path(tmp) / "result.json"
        request.write_text(json.dumps({"config": cfg.model_dump(mode="json"), "arm": arm, "model": model,
                                       "domain": domain, "replay": replay, "key": key,
                                       "result_path": str(result)}))
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.arm_worker", str(request)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=Path(__file__).resolve().parent.parent, preexec_fn=_die_with_parent,
        )
        tail: collections.deque[str] = collections.deque(maxlen=40)
        stop = threading.Event()
        watcher = None
        if on_progress and arm_dir is not None:
            watcher = threading.Thread(target=_watch_progress, args=(arm_dir / "progress.json", on_progress, stop), daemon=True)
            watcher.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line.startswith("ftcore") or "Error" in line or "Traceback" in line:
                log(line)
        code = proc.wait()
        stop.set()
        if watcher:
            watcher.join()
        if code != 0:
            reason = "killed (out of memory?)" if code in (-signal.SIGKILL, 137) else f"exit code {code}"
            error = _last_error(tail)
            # The first line is what the report and the UI show as the arm's failure.
            raise RuntimeError(f"arm {arm} failed ({reason})" + (f": {error}" if error else "") + "\n" + "\n".join(tail))
        return json.loads(result.read_text())


def _last_error(lines) -> str | None:
    """The child's exception line (`SomeError: message`), if its output ends with a traceback."""
    for line in reversed(list(lines)):
        head = line.split(":", 1)[0]
        if ":" in line and " " not in head and (head.endswith("Error") or head.endswith("Exception")):
            return line.strip()
    return None


def _watch_progress(path: Path, on_progress: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
    last = None
    while not stop.wait(2.0):
        try:
            progress = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if progress != last:
            last = progress
            on_progress(progress)
