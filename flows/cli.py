"""`ftstudy run` and `ftstudy show`: the flow with an embedded Prefect server, and its results.

Prefect reads its settings when it is imported, so the environment is prepared first: unless the
user set them, PREFECT_HOME lives under the artifacts root (nothing is written to ~/.prefect) and
the embedded server gets time to start on a slow machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from flows.terminal import reader_gone, say, silence
from ftcore.presets import ABOUT
from tasks.heap import frozen_imports

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftstudy", description="What does fine-tuning cost you? "
                                     "Domain gain vs general forgetting for full FT, FT+replay and LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the study flow and print the table",
                         epilog="exit codes: 0 done; 1 failed (an arm or a step; the finished ones and the report are "
                         "kept); 2 bad input (refused before any model was trained or scored); 3 over the forgetting budget (gate: the study finished and "
                         "a gated arm forgot more than forgetting_budget_pct); 130 interrupted (rerun to resume); 141 the reader of its output closed the pipe",
                         description="The config is built in this order, each source overriding the one before, "
                         "field by field: the defaults, --preset, --config, each --set, --artifacts. Without "
                         "--preset and --config the smoke preset runs.")
    run.add_argument("--preset", help="; ".join(f"{name}: {about}" for name, about in ABOUT.items()).replace("%", "%%"))
    run.add_argument("--config", metavar="FILE", help="a YAML or JSON config file (write one with `ftstudy init`)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a config field, dotted, value as JSON when it parses (repeatable)")
    run.add_argument("--artifacts", help="artifacts root (default: the config's artifacts_dir, ./artifacts)")
    init = sub.add_parser("init", help="print a config file with every field, its value and its description")
    init.add_argument("--preset", help="start from this preset's values (default: the defaults, with example corpora)")
    init.add_argument("-o", "--output", metavar="FILE", help="write it to FILE instead of standard output")
    show = sub.add_parser("show", help="print the latest results found under an artifacts root")
    show.add_argument("root", nargs="?", help="artifacts root (default ./artifacts)")
    show.add_argument("--artifacts", help="the same, as `run` takes it")
    sub.add_parser("config", help="print the config schema (JSON)")
    serve = sub.add_parser("serve", help="local Prefect server + UI, work pools, workers and the deployments; Ctrl-C stops all")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=4200, help="port of the API and UI (default 4200)")
    serve.add_argument("--home", help="PREFECT_HOME of the server: its database and logs (default $PREFECT_HOME or ./.prefect)")
    serve.add_argument("--preset", default="demo", help="preset whose config fills the study's run form (default demo)")
    serve.add_argument("--database-url", default=os.environ.get("FTSTUDY_DATABASE_URL"),
                       help="the server's database, e.g. postgresql+asyncpg://user:pass@host:5432/prefect for a team "
                       "server with many workers (default $FTSTUDY_DATABASE_URL, else SQLite under --home)")
    deploy = sub.add_parser("deploy", help="register the study, train-arm and corpus-check deployments with the "
                            "Prefect server at PREFECT_API_URL")
    deploy.add_argument("--preset", default="demo", help="preset whose config fills the study's run form (default demo)")
    deploy.add_argument("--pool", default="ftstudy", help="work pool of the study and the corpus check (default ftstudy)")
    deploy.add_argument("--gpu-pool", default="ftstudy-gpu", help="work pool of the arms (default ftstudy-gpu)")
    deploy.add_argument("--artifacts", help="the form's default artifacts root (default $FTSTUDY_ARTIFACTS_DIR, else "
                        "./artifacts of this shell, made absolute)")
    return parser


def _prepare_env(artifacts: Path) -> None:
    """Prefect's settings, before Prefect is imported (it reads them then); nothing is written yet."""
    os.environ.setdefault("PREFECT_HOME", str(artifacts.resolve() / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ftcore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; avoids telemetry errors
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load(args: argparse.Namespace):
    from pydantic import ValidationError

    from ftcore.config import ConfigError
    from ftcore.config_files import describe_error, load_config

    fields = {"artifacts_dir": args.artifacts} if args.artifacts else {}
    preset = args.preset or (None if args.config else "smoke")
    try:
        return load_config(preset, args.overrides, config_file=args.config, **fields)
    except ValidationError as exc:
        where = f" ({args.config})" if args.config else ""
        raise SystemExit(_fail(f"invalid config{where}:\n" + describe_error(exc)))
    except ConfigError as exc:
        raise SystemExit(_fail(str(exc)))


def _fail(message: str) -> int:
    print(f"ftstudy: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def print_results(root: Path, results: dict) -> None:
    """The table and where the report, plots and per-run tables are (paths in `results` are relative to root)."""
    from ftcore.study import report_files

    files = report_files(root, results)
    if "headline" in files:  # the arms at equal domain gain first: the fair comparison
        print(files["headline"].read_text())
    print(files["table"].with_name("table.md").read_text())
    print(f"report: {files['report']}")
    for name in ("perplexity", "frontier", "loss", "curves", "path", "task_frontier"):
        if name in files:
            print(f"plot:   {files[name]}")
    for name in ("matched_gain", "runs", "general_docs", "tasks", "config"):
        if name in files:
            print(f"{name + ':':<7} {files[name]}")
    print(f"models: see the 'model' lines of {files['report']} (relative to {root})")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    root = Path(cfg.artifacts_dir).expanduser().resolve()
    _prepare_env(root)
    from flows.embedded_server import ServerError
    from ftcore import inputs
    from ftcore.config import InputError
    from tasks.arm_process import fork_arms_enabled
    from tasks.arm_worker import hide_unused_libraries

    hide_unused_libraries(arm.method for arm in cfg.arms)  # this process runs this study alone
    try:  # before anything is started or written: a missing file or an unwritable root exits 2 at once
        fork_arms_enabled()  # the environment's setting too
        checked = inputs.check_inputs(cfg)
    except InputError as exc:
        return _fail(str(exc))
    _make_prefect_home()
    with frozen_imports():  # Prefect (tasks.heap)
        from prefect.settings import PREFECT_API_URL, temporary_settings

    # The run's own server (flows/embedded_server.py) unless the user named one: it starts while the flow's
    # imports below run, and a Ctrl-C here stops the flow before it.
    server = None if PREFECT_API_URL.value() else _embedded_server()
    try:
        # The checks that need recorded steps (chunk_len against the fetched model's context, ...) run in the
        # read-back too: a refusal there is bad input, as it is in the flow.
        if server is not None and (results := _recorded(checked)) is not None:
            server.stop(drain=False)  # nothing to run: no flow run either (a user's own server records every run)
            return finish_recorded(results, checked.cfg, root)
        inputs.hand_over(checked)  # the flow below trusts these checks instead of repeating them
        with frozen_imports():
            from flows.study import study_flow

        if server is None:
            return finish(study_flow(config=checked.cfg, return_state=True), checked.cfg, root)
        server.wait_ready(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            return finish(study_flow(config=checked.cfg, return_state=True), checked.cfg, root)
    except InputError as exc:
        return _fail(str(exc))
    except ServerError as exc:
        print(f"ftstudy: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if server is not None:
            server.stop()


def _make_prefect_home() -> None:
    try:
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(_fail(f"PREFECT_HOME: cannot create {os.environ['PREFECT_HOME']} ({exc.strerror}); set "
                               "PREFECT_HOME (default <artifacts>/.prefect) to a writable directory"))


def _embedded_server():
    from flows.embedded_server import EmbeddedServer

    server = EmbeddedServer(Path(os.environ["PREFECT_HOME"])).start()
    os.environ["PREFECT_API_URL"] = server.api_url  # for the processes the flow starts (arms on other devices)
    return server


def _recorded(checked) -> dict | None:
    """The study's results when every one of its steps is recorded (a rerun with nothing to do), else None."""
    from ftcore import study
    from ftcore.steps import NotRecorded, RecordedRunner

    try:
        return study.run_study(checked, RecordedRunner(checked.arms_in_process))
    except NotRecorded:
        return None


def finish_recorded(results: dict, cfg, root: Path) -> int:
    """Print a study read back from its recorded steps and return the exit code: EXIT_OK, or gate.EXIT_OVER_BUDGET
    when a gated arm forgot more than the budget (as `finish` does for a flow run)."""
    from ftcore import gate, study

    print("every step of this study is recorded (nothing to run):", file=sys.stderr)
    print_results(root, results)
    verdict = gate.study_verdict(cfg, study.report_files(root, results))
    if verdict is None:
        return EXIT_OK
    print(f"gate: {verdict.line}", file=sys.stdout if verdict.passed else sys.stderr)
    return EXIT_OK if verdict.passed else gate.EXIT_OVER_BUDGET


def finish(state, cfg, root: Path) -> int:
    """Print what the study flow's final `state` says and return the exit code: EXIT_OK, EXIT_BAD_INPUT,
    EXIT_FAILED (an arm or step failed; the results are kept) or gate.EXIT_OVER_BUDGET."""
    from ftcore import gate, study
    from ftcore.config import InputError

    if state.is_completed():
        results = state.result()
        print_results(root, results)
        if verdict := gate.study_verdict(cfg, study.report_files(root, results)):
            print(f"gate: {verdict.line}")
        return EXIT_OK
    try:
        state.result()
    except InputError as exc:
        return _fail(str(exc))
    except gate.OverBudget as exc:  # the study finished; its gated arms forgot more than the budget
        print_results(root, json.loads((root / study.LATEST).read_text()))
        print(f"gate: {exc.verdict.line}", file=sys.stderr)
        return gate.EXIT_OVER_BUDGET
    except Exception as exc:  # the flow's own failure (e.g. a failed arm): say what and where
        print(f"ftstudy: study failed: {exc}", file=sys.stderr)
        latest = root / study.LATEST
        if latest.exists():
            print_results(root, json.loads(latest.read_text()))
    return EXIT_FAILED


def cmd_show(args: argparse.Namespace) -> int:
    root = Path(args.artifacts or args.root or "artifacts")
    latest = root / "latest.json"
    if not latest.exists():
        return _fail(f"no results under {root} (no latest.json); run `ftstudy run` first")
    print_results(root, json.loads(latest.read_text()))
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from ftcore.config import ConfigError
    from ftcore.config_files import config_yaml, load_config

    try:
        cfg = load_config(args.preset) if args.preset else None
    except ConfigError as exc:
        return _fail(str(exc))
    origin = f"the {args.preset} preset" if args.preset else "the defaults; replace the example corpora"
    text = config_yaml(cfg, header=f"ftstudy study config: {origin}.\nRun it with `ftstudy run --config FILE`; "
                       "--set FIELD=VALUE overrides a field.")
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from ftcore.config import StudyConfig

    print(json.dumps(StudyConfig.model_json_schema(), indent=2))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from deployments.serve import main as serve

    return serve(args.host, args.port, args.home, args.preset, args.database_url)


def cmd_deploy(args: argparse.Namespace) -> int:
    from ftcore.config import ConfigError

    from deployments.deploy import deploy

    try:
        names = deploy(args.preset, args.pool, args.gpu_pool, artifacts=args.artifacts)
    except ConfigError as exc:
        return _fail(str(exc))
    from deployments.deploy import default_config

    config = default_config(args.preset, args.artifacts)
    print("deployed: " + ", ".join(names))
    print(f"the study form's defaults: preset {args.preset}; artifacts under {config['artifacts_dir']}; "
          f"domain corpus {config['domain']['path']}")
    return EXIT_OK


_interrupted = False


def _on_sigint(signum, frame) -> None:
    """Ctrl-C: remembered, then Python's own KeyboardInterrupt."""
    global _interrupted
    _interrupted = True
    signal.default_int_handler(signum, frame)


def main(argv: list[str] | None = None) -> int:
    global _interrupted
    _interrupted = False
    # SIGTERM (kill, a scheduler's stop) unwinds like Ctrl-C, so the embedded server is stopped too
    # (while the flow runs, Prefect's own SIGTERM handler does; the flow then stops the arms).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(128 + signal.SIGHUP))  # a closed terminal: the same
    signal.signal(signal.SIGINT, _on_sigint)
    args = _parser().parse_args(argv)
    commands = {"run": cmd_run, "show": cmd_show, "config": cmd_config, "init": cmd_init, "serve": cmd_serve,
                "deploy": cmd_deploy}
    try:
        code = commands[args.command](args)
        # The answer is printed: a Ctrl-C during the interpreter's teardown (a second or two) must not turn a
        # finished study's exit code into 130.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return code
    except BrokenPipeError:
        # `ftstudy show | head -1`: the reader took what it wanted and closed the pipe. As a Unix tool killed by
        # SIGPIPE (which Python ignores): no traceback, exit 141. A broken pipe of anything else is an error.
        if not (reader_gone(sys.stdout) or reader_gone(sys.stderr)):
            raise
        silence()
        return 128 + signal.SIGPIPE
    except (KeyboardInterrupt, SystemExit) as exc:
        # `ftstudy run ... | tee log` and Ctrl-C: tee dies of it too, and the next log line to the closed pipe ends the
        # run with rich's SystemExit(1) (its console's answer to a broken pipe) instead of the interrupt.
        if isinstance(exc, SystemExit) and not _interrupted:
            # Without a Ctrl-C: rich's answer to a broken pipe is the same SystemExit(1) (`ftstudy run ... 2>&1 | head
            # -1`): the reader went away, as above, and the study stopped there; a rerun resumes it.
            if exc.code == 1 and (reader_gone(sys.stdout) or reader_gone(sys.stderr)):
                silence()
                return 128 + signal.SIGPIPE
            raise
        # Every finished step and checkpoint is kept: the same command resumes from them.
        say("ftstudy: interrupted; run the same command again to resume from the cached steps and checkpoints")
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
