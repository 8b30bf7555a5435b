"""The Prefect API server of one `ftstudy run`: started first, in the background and in its own session.

Prefect's own embedded ("ephemeral") server starts when the flow first calls the API, that is after torch,
transformers and the flow's modules are imported, and in the terminal's process group. Both cost: the
server's start (seconds) adds to the imports instead of overlapping them on the second core, and a
Ctrl-C in the terminal reaches the server too, which dies before the flow can record its end; the flow
then retried for minutes. This server is the same application (Prefect's `create_app`, ephemeral: no UI,
no background services) started by `ftstudy run` before those imports, in a session of its own, and
stopped by `ftstudy run` when the run ends, however it ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


class ServerError(RuntimeError):
    """The embedded server did not start; the message says why and where its log is."""


def app():
    """uvicorn's factory: Prefect's API application as its ephemeral server builds it. The server ends itself
    when the `ftstudy run` that started it is gone, even killed (SIGKILL, a closed terminal)."""
    from tasks.heap import frozen_imports

    with frozen_imports():  # Prefect's server application: about 3.7 s of imports
        from prefect.server.api.server import create_app

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    return create_app(ephemeral=True, final=True)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServer:
    """A Prefect API server on a free loopback port, its database and log under `home` (PREFECT_HOME).

    `start()` returns at once; `wait_ready()` blocks until it answers (raises ServerError if it exits or
    does not answer within `timeout` s); `stop()` sends it what the run's log and event workers still
    hold (unless `drain` is false), then ends it (SIGTERM, then SIGKILL after 10 s).
    """

    def __init__(self, home: Path):
        self.home = home
        self.log = home / "embedded-server.log"
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.ready = False  # it answered: the run may have sent it logs and events

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> EmbeddedServer:
        self.port = _free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        with open(self.log, "wb") as out:
            # Its own session: the terminal's Ctrl-C goes to `ftstudy run`, which then stops this server itself.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "flows.embedded_server:app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the embedded Prefect server exited with code {self.process.returncode}; "
                                  f"see {self.log}:\n{_tail(self.log)}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        self.ready = True
                        return
            except OSError:
                time.sleep(0.05)
        raise ServerError(f"the embedded Prefect server did not answer on {self.api_url} within {timeout:.0f} s "
                          f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); see {self.log}")

    def stop(self, drain: bool = True) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if not self.ready:  # stopped while it started: nothing was sent to it; uvicorn defers SIGTERM till started
            self.process.kill()
            self.process.wait()
            return
        if drain:
            _drain_to_server()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _drain_to_server() -> None:
    """Send the logs and events the run's background workers still hold (Prefect sends them at exit, by then
    to a stopped server)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
