"""The ftstudy command: exit codes, messages that name the field, `show`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs `ftstudy` in a new process, most of them a study

REPO = Path(__file__).resolve().parent.parent


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, message", [
    (["run", "--preset", "nope"], "unknown preset 'nope'"),
    (["run", "--set", "train.learning_rate=-1"], "train.learning_rate: Input should be greater than 0"),
    (["run", "--set", 'arms=["full","qlora"]'], "arms.1: 'qlora' is not an arm: use full, replay, lora, or a spec {name, method: full|lora|qlora"),
    (["run", "--set", "replay_ratio=1.5"], "replay_ratio: Input should be less than 1"),
    (["run", "--set", "train.max_steps"], "not of the form field=value"),
])
def test_bad_config_exits_2_naming_the_field(args, message, tmp_path):
    result = _cli(*args, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "a").exists()  # nothing written


def test_missing_corpus_file_exits_2_before_any_model(tmp_path):
    result = _cli("run", "--preset", "smoke", "--artifacts", str(tmp_path / "a"),
                  "--set", f"domain.path={tmp_path / 'missing.csv'}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"domain.path: file {tmp_path / 'missing.csv'} does not exist" in result.stderr
    assert not (tmp_path / "a").exists()  # no empty root, no server database either


def test_an_unknown_fork_arms_setting_exits_2_before_any_step(tmp_path):
    result = _cli("run", "--preset", "smoke", "--artifacts", str(tmp_path / "a"), env={"FTSTUDY_FORK_ARMS": "maybe"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ftstudy: FTSTUDY_FORK_ARMS='maybe': set it to 0" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "a").exists()


def test_a_bad_value_found_after_the_model_fails_once_without_retry_or_traceback(tmp_path):
    """chunk_len above the model's context: no retries of fetch-model, no tracebacks, the message, exit 2."""
    result = _cli("run", "--preset", "smoke", "--artifacts", str(tmp_path / "a"), "--set", "chunk_len=4096")
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "ftstudy: chunk_len: 4096 tokens exceed the model's context of 1024; lower chunk_len" in result.stderr
    assert "Traceback" not in out and "Retrying" not in out and "AwaitingRetry" not in out
    assert not list((tmp_path / "a").glob("tokenize-*"))
    # Again on the same root, the model now recorded: refused the same way (it was a traceback and exit 1 when the
    # check ran while the recorded steps were read back)
    again = _cli("run", "--preset", "smoke", "--artifacts", str(tmp_path / "a"), "--set", "chunk_len=4096")
    assert again.returncode == 2 and "Traceback" not in again.stdout + again.stderr, again.stderr[-2000:]
    assert "ftstudy: chunk_len: 4096 tokens exceed the model's context of 1024; lower chunk_len" in again.stderr


def test_is_transient_retries_the_network_only():
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    from ftcore.sources import ModelError, is_transient

    def response(status):
        return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))

    assert is_transient(ConnectionError("reset")) and is_transient(TimeoutError())
    assert is_transient(httpx.ConnectError("refused"))
    assert is_transient(HfHubHTTPError("busy", response=response(503)))
    assert not is_transient(HfHubHTTPError("gone", response=response(404)))
    assert not is_transient(ModelError("model.name: no such directory")) and not is_transient(ValueError("bug"))


def test_show_prints_latest_results(tmp_path):
    result = _cli("show", str(tmp_path))
    assert result.returncode == 2 and "no results under" in result.stderr
    report = tmp_path / "report"
    report.mkdir()
    (report / "table.md").write_text("| arm | domain ppl |\n| base | 1.00 |\n")
    (report / "report.md").write_text("# report\n")
    # latest.json holds paths relative to the artifacts root, so a moved root still shows
    (tmp_path / "latest.json").write_text(json.dumps({"table": "report/table.parquet", "report": "report/report.md"}))
    result = _cli("show", str(tmp_path))
    assert result.returncode == 0 and "| base | 1.00 |" in result.stdout and str(report / "report.md") in result.stdout


@pytest.mark.slow
def test_a_study_run_from_another_directory_writes_where_it_was_told(tmp_path):
    """A relative --artifacts from any working directory: every arm trains there, nothing lands in the checkout."""
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    before = set(REPO.iterdir())
    result = subprocess.run([str(Path(sys.executable).with_name("ftstudy")), "run", "--preset", "smoke",
                             "--artifacts", "rel", "--set", 'arms=["full","lora"]'], cwd=elsewhere,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    latest = json.loads((elsewhere / "rel" / "latest.json").read_text())
    assert (elsewhere / "rel" / latest["table"]).is_file()
    assert len(list((elsewhere / "rel").glob("train-*/*/train_summary.json"))) == 2
    assert set(REPO.iterdir()) == before  # no stray rel/ (or anything) inside the checkout
    # The same command again: every step is recorded, so the table is read back without a flow run or a server,
    # and without importing torch or a training library (the door's model checks passed before: root/checked/).
    again = subprocess.run([str(Path(sys.executable).with_name("ftstudy")), "run", "--preset", "smoke",
                            "--artifacts", "rel", "--set", 'arms=["full","lora"]'], cwd=elsewhere,
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "every step of this study is recorded (nothing to run)" in again.stderr
    assert "Flow run" not in again.stderr + again.stdout
    imported = {line.rsplit("|", 1)[1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert "pandas" in imported and not imported & {"torch", "transformers", "trl", "peft", "matplotlib"}
    table = result.stdout[result.stdout.index("| arm |"):result.stdout.index("report:")]
    assert table == again.stdout[again.stdout.index("| arm |"):again.stdout.index("report:")]


@pytest.mark.slow
def test_two_cli_runs_on_one_artifacts_root_at_once_print_the_same_table(tmp_path):
    """Two `ftstudy run` processes (two flow runs, two embedded servers, one PREFECT_HOME) at once."""
    artifacts = tmp_path / "a"
    args = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--artifacts", str(artifacts),
            "--set", 'arms=["full","lora"]']
    outs = [tmp_path / f"run{i}.out" for i in range(2)]
    procs = []
    for out in outs:
        with open(out, "w") as f:
            procs.append(subprocess.Popen(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ)))
    codes = [p.wait(timeout=600) for p in procs]
    texts = [out.read_text() for out in outs]
    assert codes == [0, 0], texts
    tables = [t[t.index("| arm |"):t.index("report:")] for t in texts]
    assert tables[0] == tables[1]
    for step in ("train-full", "train-lora", "eval-base-domain", "report"):
        assert len([d for d in (artifacts / step).iterdir() if d.is_dir()]) == 1, step
    (arm_dir,) = [d for d in (artifacts / "train-full").iterdir() if d.is_dir()]  # beside it: the step lock file
    log = (arm_dir / "train_log.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in log]
    assert steps == sorted(set(steps))  # trained once, not twice


def _is_arm(process) -> bool:
    """An arm's process: started afresh (`python -m tasks.arm_worker`) or forked from the arm fork server (named
    ftstudy-arm)."""
    try:
        return "tasks.arm_worker" in " ".join(process.cmdline()) or process.name() == "ftstudy-arm"
    except Exception:  # noqa: BLE001 - a process that ended meanwhile (psutil.NoSuchProcess) is no arm
        return False


@pytest.mark.parametrize("sig, whole_group", [("SIGTERM", False), ("SIGINT", True)], ids=["sigterm", "ctrl-c"])
def test_an_interrupted_run_stops_its_arm_and_server_and_exits_at_once(tmp_path, sig, whole_group):
    """SIGTERM to ftstudy alone (a scheduler's stop; Prefect's handler raises it inside the flow, as it does a
    cancellation), and a terminal's Ctrl-C (SIGINT to the whole process group, the arm's process included):
    the arm's process stops too, instead of training on while the run waits for it; its checkpoints stay for
    the rerun; the run's embedded server outlives the flow long enough to record the run's end, then stops
    (seen: the server died first and the flow retried for 150 s, then exited 1)."""
    import signal
    import time

    import psutil

    args = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--artifacts", str(tmp_path / "a"),
            "--set", 'arms=["full"]', "--set", "train.max_steps=5000", "--set", "eval.every_steps=0"]
    with open(tmp_path / "out", "w") as out:
        # SIGINT at its default, as in a terminal's foreground job: a suite started in the background by a
        # non-interactive shell ignores it, and an ignored SIGINT stays ignored in every child (POSIX).
        proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ),
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 240
        arm = None
        while arm is None and time.monotonic() < deadline:
            arm = next((c for c in parent.children(recursive=True) if _is_arm(c)), None)
            time.sleep(1)
        assert arm is not None, (tmp_path / "out").read_text()[-2000:]
        (server,) = [c for c in parent.children() if "flows.embedded_server:app" in c.cmdline()]  # in a session of its own
        # Signal once the arm trains (its first loss is logged), not while it still imports its libraries: a busy
        # machine (two test workers) can take longer than any fixed wait.
        while not list((tmp_path / "a").glob("train-full/*/train_log.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # training
        started = time.monotonic()
        if whole_group:
            os.killpg(proc.pid, getattr(signal, sig))
        else:
            proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=120)
        text = (tmp_path / "out").read_text()
        assert time.monotonic() - started < 60, text[-2000:]
        assert not arm.is_running() or arm.status() == psutil.STATUS_ZOMBIE
        assert code == 128 + getattr(signal, sig) and "stopping the running arms" in text, text[-2000:]
        assert "arm full stopped before it finished" in text and "failed (exit code" not in text, text[-2000:]
        after = text[text.index("arm full stopped"):]
        assert "Traceback" not in after, after  # one line per stopped step, not a traceback each
        assert "Error logging to API" not in text and "ConnectError" not in text, text[-2000:]
        assert "Finished in state Crashed" in text or "Finished in state Cancelled" in text, text[-2000:]
        server.wait(timeout=15)  # stopped by the run, not left behind
    finally:  # a failed assertion leaves no run training on
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# `ftstudy run ... | tee log` and Ctrl-C, reduced to what decides the exit code: the output's reader is gone (tee
# died of the same Ctrl-C), the interrupt arrives, and the next line to the closed pipe raises what rich's console
# raises then, SystemExit(1) (Prefect's log handler prints through rich). argv[1]: whether the Ctrl-C comes.
CTRL_C_INTO_A_CLOSED_PIPE = """
import os, signal, sys, time
from flows import cli

def log(line):  # a log line as Prefect's handler writes it: through rich, which exits 1 on a broken pipe
    try:
        print(line, file=sys.stderr, flush=True)
    except BrokenPipeError:
        raise SystemExit(1)  # rich.console.Console.on_broken_pipe

def interrupted_run(args):
    if sys.argv[1] == "exit-1":  # a SystemExit(1) of something else, the output's reader still there
        raise SystemExit(1)
    try:
        if sys.argv[1] == "ctrl-c":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
        log("a log line")
    except KeyboardInterrupt:
        log("ftstudy: stopping the running arms")
    return 0

if sys.argv[1] != "exit-1":
    read, write = os.pipe()
    os.close(read)
    os.dup2(write, 1)
    os.dup2(write, 2)
cli.cmd_show = interrupted_run
sys.exit(cli.main(["show"]))
"""


@pytest.mark.parametrize("when, code", [("ctrl-c", 130), ("no-ctrl-c", 141), ("exit-1", 1)])
def test_ctrl_c_with_the_output_piped_to_a_reader_that_died_exits_130(when, code):
    """Ctrl-C exits 130 also when stdout and stderr go to a pipe whose reader died of it (`| tee`): measured before,
    exit 1 (rich's SystemExit on the broken pipe replaced the interrupt). Without a Ctrl-C the reader went away by
    itself (`ftstudy run ... 2>&1 | head -1`): rich's SystemExit(1) ends the command as a broken pipe does, exit 141
    (it exited 1, which reads as a failed study); the interpreter's last flush into the closed pipe adds no error of
    its own. A SystemExit(1) with the output's reader still there keeps its code."""
    result = subprocess.run([sys.executable, "-c", CTRL_C_INTO_A_CLOSED_PIPE, when], cwd=REPO, timeout=60)
    assert result.returncode == code


def test_a_line_said_to_a_closed_pipe_neither_raises_nor_fails_the_exit():
    """flows.terminal.say, which `ftstudy run` and `ftstudy serve` use for what they say while they stop: into a pipe
    whose reader is gone it prints nothing and raises nothing, and the interpreter's last flush does not fail (exit
    code 120) either."""
    code = ("import os, sys\nfrom flows.terminal import say\nread, write = os.pipe()\nos.close(read)\n"
            "os.dup2(write, 1)\nos.dup2(write, 2)\nsay('stopping', sys.stdout)\nsay('stopped')\nprint('more')\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_output_piped_to_a_reader_that_closed_it_ends_the_command_without_a_traceback():
    """`ftstudy show | head -1`: the reader closes the pipe before the command printed everything. Measured before:
    a BrokenPipeError traceback and exit 1. Now the command stops there, as a Unix tool killed by SIGPIPE: exit 141,
    nothing on stderr (here the pipe is closed before the first line, so it happens every time)."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "config"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


BROKEN_PIPE_ELSEWHERE = """
import sys
from flows import cli

def show(args):
    raise BrokenPipeError(32, "Broken pipe (a subprocess's stdin, say)")

cli.cmd_show = show
sys.exit(cli.main(["show"]))
"""


def test_a_broken_pipe_that_is_not_the_output_is_an_error_with_its_traceback():
    result = subprocess.run([sys.executable, "-c", BROKEN_PIPE_ELSEWHERE], cwd=REPO, timeout=60, capture_output=True,
                            text=True)
    assert result.returncode == 1 and "BrokenPipeError: [Errno 32] Broken pipe (a subprocess's stdin" in result.stderr


# `ftstudy serve | tee` and Ctrl-C while a study runs, reduced to the stop: the output's reader is gone, the server
# still has unfinished runs to end (and says so), and it must be stopped anyway. Measured before: serve exited 1 and
# left `prefect server` running (the "ended N runs" line raised BrokenPipeError before the server was stopped).
SERVE_STOPS_INTO_A_CLOSED_PIPE = """
import os, subprocess, sys
from pathlib import Path
from deployments import serve

server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
service = serve.Service("127.0.0.1", 1, Path(sys.argv[1]), procs={"server": server})
serve.end_orphaned_runs = lambda api_url, why: ["a-study-run"]
read, write = os.pipe()
os.close(read)
os.dup2(write, 1)
os.dup2(write, 2)
service.stop(grace=5)
sys.exit(0 if server.poll() is not None else 3)
"""


# A second Ctrl-C (or a closed terminal after the first) while serve stops. Measured before: the stop was cut short,
# serve exited 130, and the Prefect server and a worker were left running, orphaned.
SECOND_CTRL_C_WHILE_SERVE_STOPS = """
import os, signal, subprocess, sys
from pathlib import Path
from deployments import serve

server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
service = serve.Service("127.0.0.1", 1, Path(sys.argv[1]), procs={"server": server, "worker": worker})

def second_ctrl_c(api_url, why):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGHUP)
    return []

serve.end_orphaned_runs = second_ctrl_c
signal.signal(signal.SIGINT, serve._interrupt)
try:
    serve.shut_down(service)
finally:
    left = [p for p in (server, worker) if p.poll() is None]
    for p in left:
        p.kill()
sys.exit(3 if left else 0)
"""


def test_a_second_ctrl_c_while_serve_stops_does_not_cut_the_stop_short(tmp_path):
    result = subprocess.run([sys.executable, "-c", SECOND_CTRL_C_WHILE_SERVE_STOPS, str(tmp_path)], cwd=REPO,
                            timeout=60, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_stops_its_server_when_its_output_pipe_is_closed(tmp_path):
    result = subprocess.run([sys.executable, "-c", SERVE_STOPS_INTO_A_CLOSED_PIPE, str(tmp_path)], cwd=REPO, timeout=60)
    assert result.returncode == 0
