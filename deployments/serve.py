"""`ftstudy serve`: a local Prefect server with its UI, the work pools, workers and deployments.

One command for a team's box: it starts `prefect server` on a loopback port, creates the process
work pools `ftstudy` (study and corpus check) and `ftstudy-gpu` (arms), registers the deployments
(deployments/deploy.py, `ftstudy deploy`), starts one worker per pool, prints the UI address and waits. Ctrl-C (or
SIGTERM) stops every process it started, and their children, by process id. Output of each process
goes to `<PREFECT_HOME>/serve-logs/`; the process ids are in `<PREFECT_HOME>/serve.json`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from flows.terminal import say

ROOT = Path(__file__).resolve().parent.parent
POOLS = ("ftstudy", "ftstudy-gpu")  # process pools: the study and its check; the arms (GPU machines)


class ServeError(RuntimeError):
    """A step of bringing the service up failed; the message says which and where its log is."""


@dataclass
class Service:
    host: str
    port: int
    home: Path
    preset: str = "demo"
    database_url: str | None = None  # the server's database; None = SQLite under PREFECT_HOME
    # The study form's default artifacts root: resolved where `serve` was started, not where the code is.
    artifacts: Path = field(default_factory=lambda: Path(os.environ.get("FTSTUDY_ARTIFACTS_DIR") or "artifacts").resolve())
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def logs(self) -> Path:
        return self.home / "serve-logs"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "ftcore",
            "TOKENIZERS_PARALLELISM": "false",
        })
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        return env

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Start `prefect ARGS` in its own session, output to serve-logs/NAME.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen([_prefect(), *args], cwd=ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.procs[name] = proc
        self._write_pids()
        return proc

    def call(self, name: str, *command: str, timeout: float = 300) -> None:
        """Run COMMAND to completion against the server; raise with the tail of its output if it fails."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            code = subprocess.call(list(command), cwd=ROOT, env=self.env(), stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout)
        if code != 0:
            raise ServeError(f"`{' '.join(command)}` failed (exit {code}); see {log}:\n{_tail(log)}")

    def _write_pids(self) -> None:
        (self.home / "serve.json").write_text(json.dumps(
            {"pid": os.getpid(), "api_url": self.api_url, "ui_url": self.ui_url,
             "processes": {name: p.pid for name, p in self.procs.items()}}, indent=2))

    def stop(self, grace: float = 15.0) -> None:
        """Stop every started process and its descendants (a worker's flow runs), newest first; then end the runs
        they left unfinished (end_orphaned_runs) while the server still answers, and stop the server.

        Workers go before the server, so they can still report their runs' end to it.
        """
        for name, proc in reversed(list(self.procs.items())):
            if name == "server" and proc.poll() is None:
                try:
                    ended = end_orphaned_runs(self.api_url, "ftstudy serve was stopped while this run ran")
                except Exception as exc:  # noqa: BLE001 - a server that no longer answers: the next start ends them
                    say(f"ftstudy serve: could not end the unfinished runs now ({exc}); the next start will")
                else:
                    if ended:
                        say(f"ftstudy serve: ended {len(ended)} unfinished run(s): {', '.join(ended)}", sys.stdout)
            try:
                parent = psutil.Process(proc.pid)
                tree = [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for p in tree:
                _signal(p, signal.SIGTERM)
            _, alive = psutil.wait_procs(tree, timeout=grace)
            for p in alive:
                _signal(p, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=5)
            proc.poll()


# The flows this service runs; a run of one of them that is still active when no worker of this service runs
# it was left behind by a stop (Ctrl-C, SIGTERM, kill -9 of serve or of a worker).
FLOWS = ("ftstudy", "ftstudy-train-arm", "ftstudy-corpus-check")


def end_orphaned_runs(api_url: str, why: str) -> list[str]:
    """End every run of this service's flows that is still Pending, Running or Cancelling on the server at
    `api_url`, and their unfinished task runs: Cancelling becomes Cancelled, the others Crashed, with `why` and
    how to resume in the message. Called when no worker of this service runs (before the workers start, and
    after they stopped), so nothing it ends is still running. Returns the ended runs' names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId,
                                                FlowRunFilterState, FlowRunFilterStateType, TaskRunFilter,
                                                TaskRunFilterState, TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelled, Crashed

    active = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
    message = f"{why}; run it again (Retry) to resume from its cached steps and checkpoints"
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))),
                                     flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                                         type=FlowRunFilterStateType(any_=active))))
        if not runs:
            return []
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=active))))
        for task in tasks:
            client.set_task_run_state(task.id, Crashed(message=message), force=True)
        for run in runs:
            cancelling = run.state is not None and run.state.type == StateType.CANCELLING
            client.set_flow_run_state(run.id, Cancelled(message=message) if cancelling else Crashed(message=message),
                                      force=True)
    return [r.name for r in runs]


def create_pools(api_url: str) -> None:
    """Create (or reset) the process work pools POOLS on the server at `api_url`, as `prefect work-pool create NAME
    --type process --overwrite` does, from this process: two fewer Prefect processes to start (about 2 s each)
    before the service is ready.

    Their one change to Prefect's default template: the flow-run command is set, to this interpreter's
    `python -m prefect.engine` (the command Prefect's process worker would build itself; serve starts the workers
    on this machine with this interpreter). With a command set, the worker starts the run's engine directly; left
    unset, it starts Prefect's workspace supervisor, a Python process that imports Prefect (about 1.2 s of a core)
    only to run the deployment's pull step and exec the same engine."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.processutils import command_to_string
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = command_to_string(
        [sys.executable, "-m", "prefect.engine"])
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for pool in POOLS:
            client.create_work_pool(WorkPoolCreate(name=pool, type=ProcessWorker.type, base_job_template=template),
                                    overwrite=True)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def _prefect() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else "prefect"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_healthy(service: Service, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    server = service.procs["server"]
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log = service.logs / "server.log"
            raise ServeError(f"prefect server exited with code {server.returncode}; see {log}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{service.api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServeError(f"prefect server did not answer on {service.api_url} within {timeout:.0f} s; "
                     f"see {service.logs / 'server.log'}")


def port_free(host: str, port: int) -> bool:
    """Whether the server can listen on host:port now. Probed as the server binds (SO_REUSEADDR, as uvicorn does),
    so a port a stopped server left in TIME_WAIT counts as free (a restart right after Ctrl-C), and one with
    a listener does not."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def bring_up(service: Service) -> None:
    """Server, pools, deployments, workers; raises ServeError naming the step that failed."""
    if not port_free(service.host, service.port):
        raise ServeError(f"port {service.port} on {service.host} is in use; choose another with --port")
    service.home.mkdir(parents=True, exist_ok=True)
    database = _redact(service.database_url) if service.database_url else f"SQLite in {service.home}"
    say(f"starting prefect server on {service.ui_url} (PREFECT_HOME={service.home}, database: {database}) ...",
        sys.stdout)
    service.start("server", "server", "start", "--host", service.host, "--port", str(service.port))
    wait_healthy(service)
    # Runs a stopped service left active (a kill -9, a power cut) would show Running forever and keep the corpus
    # check from starting a study: no worker of this service runs yet, so none of them is still running.
    if ended := end_orphaned_runs(service.api_url, "found unfinished when ftstudy serve started (its service had "
                                  "stopped)"):
        say(f"ended {len(ended)} run(s) a stopped service left unfinished: {', '.join(ended)}", sys.stdout)
    try:
        create_pools(service.api_url)
    except Exception as exc:  # noqa: BLE001 - any refusal by the server: name the step, as the other steps do
        raise ServeError(f"creating the work pools {', '.join(POOLS)} failed: {type(exc).__name__}: {exc}") from exc
    say(f"deploying (preset {service.preset}) ...", sys.stdout)
    service.call("deploy", sys.executable, "-m", "flows.cli", "deploy", "--preset", service.preset,
                 "--artifacts", str(service.artifacts))
    for pool in POOLS:
        service.start(f"worker-{pool}", "worker", "start", "--pool", pool, "--type", "process",
                      "--name", f"{pool}-{os.uname().nodename}", "--install-policy", "never")


def _redact(url: str) -> str:
    """A database URL without its password, for logs."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def main(host: str = "127.0.0.1", port: int = 4200, home: str | None = None, preset: str = "demo",
         database_url: str | None = None) -> int:
    # The server's home is the user's (./.prefect), never the package's directory: installed, that is
    # site-packages, which may not be writable and is no place for a database.
    service = Service(host, port, Path(home or os.environ.get("PREFECT_HOME") or ".prefect").resolve(), preset,
                      database_url)
    # Both stop the service, also when started from a script that ignores SIGINT in background jobs.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        bring_up(service)
        print(f"""
ftstudy serve: ready
  UI:          {service.ui_url}
  API:         {service.api_url}   (export PREFECT_API_URL={service.api_url} to use the prefect CLI)
  deployments: ftstudy/study (preset {service.preset}), ftstudy/<preset> (a form per other preset),
               ftstudy-train-arm/train-arm, ftstudy-corpus-check/corpus-check
  work pools:  ftstudy (study, corpus check), ftstudy-gpu (arms); one process worker each on this machine
  artifacts:   {service.artifacts}   (the study form's default artifacts_dir)
  logs:        {service.logs}
Ctrl-C stops the server, the workers and their runs.""", flush=True)
        while True:
            for name, proc in service.procs.items():
                if proc.poll() is not None:
                    raise ServeError(f"{name} exited with code {proc.returncode}; see {service.logs / name}.log:\n"
                                     f"{_tail(service.logs / f'{name}.log')}")
            time.sleep(1)
    except KeyboardInterrupt:
        say("ftstudy serve: stopping ...", sys.stdout)
        return 0
    except ServeError as exc:
        say(f"ftstudy serve: {exc}")
        return 1
    finally:
        shut_down(service)


def shut_down(service: Service) -> None:
    """Stop the service (Service.stop), deaf to further signals while it stops: a second Ctrl-C, or a closed terminal
    after the first, cut the stop short and left the Prefect server and a worker running, orphaned."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    service.stop()
    say("ftstudy serve: stopped", sys.stdout)
