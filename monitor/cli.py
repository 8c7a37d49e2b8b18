"""The ``driftloop`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from monitor.config import Config, load_config  # noqa: E402
from monitor.errors import DriftloopError  # noqa: E402

DEFAULT_CONFIG = "config/driftloop.yaml"


def _config(args) -> Config:
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    return load_config(path)


def _open_registry(config: Config, *, create: bool = False):
    """Open the store and registry; unless ``create``, a missing SQLite database is an error."""
    from monitor.store import Store
    from retrain.registry import Registry

    if not create and config.db_url.startswith("sqlite:///"):
        database = Path(config.db_url.removeprefix("sqlite:///"))
        if not database.is_file():
            raise DriftloopError(
                f"no driftloop state at {database}; pass the config of a bootstrapped deployment with "
                "--config, or run `driftloop bootstrap` first"
            )
    store = Store(config.db_url)
    return store, Registry(store, config.shared_path)


def cmd_bootstrap(args) -> int:
    from retrain.bootstrap import bootstrap

    bootstrap(_config(args), force=args.force)
    return 0


def _listen(host: str, port: int, key: str) -> socket.socket:
    """Bind the listening socket before any state is touched, so a taken port fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DriftloopError(
            f"cannot listen on {host}:{port} ({key}): {exc.strerror or exc}; "
            "stop the process that uses the port or choose another one"
        ) from None
    sock.listen(2048)
    return sock


def _terminate(_signum, _frame) -> None:
    # SIGTERM is the usual request to stop, and uvicorn re-raises it only after a graceful
    # shutdown, so the process exits with status 0 as supervisors expect of a clean stop.
    raise SystemExit(0)


def _serve(server, sock: socket.socket, name: str) -> None:
    """Run the uvicorn server on ``sock`` until it stops, then log the stop."""
    # A fixed name, because under `python -m monitor.cli` __name__ is "__main__".
    logger = logging.getLogger("monitor.cli")
    host, port = sock.getsockname()[:2]
    # uvicorn re-raises a captured SIGTERM once it has shut down. With the default
    # handler that kills the process before the caller's cleanup runs, so turn it
    # into SystemExit, which unwinds through the finally blocks.
    previous = signal.signal(signal.SIGTERM, _terminate)
    logger.info("%s listening on http://%s:%d", name, host, port)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        logger.info("%s stopped", name)


def _http_server(app):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning"))


def cmd_run(args) -> int:
    from monitor.api import create_app
    from monitor.daemon import MonitorDaemon, lock_state_dir
    from monitor.shutdown import ShutdownDrain
    from retrain.notify import monitor_url

    config = _config(args)
    # The lock and the port come first: a second daemon by mistake must not touch the runs.
    lock = lock_state_dir(config.state_path)
    try:
        sock = _listen(args.host or config.monitor.host, args.port or config.monitor.port, "monitor.port")
        daemon = MonitorDaemon(config)
        daemon.notifier.listen_url = monitor_url(*sock.getsockname()[:2])
        server = _http_server(create_app(daemon))

        def stop_server() -> None:
            # Nothing retries a failed startup, so the process exits and its supervisor can restart it.
            server.should_exit = True

        def force_stop() -> None:
            server.should_exit = True
            server.force_exit = True

        # SIGTERM and SIGINT start the drain instead of stopping uvicorn at once, so /readyz and
        # /metrics keep answering while it runs. uvicorn reads handle_exit when it installs its handlers.
        drain = ShutdownDrain(daemon, config.monitor.shutdown_grace_s, on_done=stop_server, on_force=force_stop)
        server.handle_exit = drain.handle_signal
        server.config.timeout_graceful_shutdown = max(1, int(drain.close_s))
        daemon.start(background=True, on_failure=stop_server)
        try:
            _serve(server, sock, "monitor")
        finally:
            daemon.stop(timeout_s=drain.remaining_s())
    finally:
        lock.close()
    if daemon.startup_error:
        print(f"driftloop: error: monitor startup failed: {daemon.startup_error}", file=sys.stderr)
        return 1
    if drain.forced:
        print("driftloop: error: stopped by a second signal before the drain finished", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args) -> int:
    from monitor.auth import load_token
    from monitor.config import resolve_model_path
    from retrain.emitter import EventEmitter
    from retrain.jobs import WAITING_STATES
    from retrain.server import create_app

    config = _config(args)
    sock = _listen(args.host or config.server.host, args.port or config.server.port, "server.port")
    _store, registry = _open_registry(config, create=True)
    emitter = EventEmitter(config.server.monitor_url)
    emitter.start()
    app = create_app(
        base_model=resolve_model_path(config.model.base),
        version_source=registry.active_for_server,
        candidate_source=lambda: registry.candidates_for_server((*WAITING_STATES, "approved", "promoting")),
        preload_candidates=config.server.preload_candidates,
        keep_previous=config.server.keep_previous_versions,
        max_concurrent_predictions=config.server.max_concurrent_predictions,
        emitter=emitter,
        max_batch=config.server.max_batch,
        max_text_chars=config.server.max_text_chars,
        poll_interval_s=config.server.poll_interval_s,
        device=None if config.model.device == "auto" else config.model.device,
        num_threads=config.model.num_threads,
        reload_token=load_token(config.auth),
    )
    try:
        _serve(_http_server(app), sock, "model server")
    finally:
        emitter.close(5.0)
    return 0


def cmd_demo(args) -> int:
    from monitor.demo import run_demo

    config_path = args.config or "config/demo.yaml"
    return run_demo(config_path, quick=args.quick, keep_state=args.keep_state)


def _print(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def cmd_approve(args) -> int:
    from retrain.jobs import approve_run

    store, _ = _open_registry(_config(args))
    run = approve_run(store, args.run_id, actor=args.by, comment=args.comment)
    print(f"run {run['id']} approved; the monitor's leader promotes it within about a second")
    return 0


def cmd_reject(args) -> int:
    from retrain.jobs import reject_run

    store, _ = _open_registry(_config(args))
    run = reject_run(store, args.run_id, actor=args.by, comment=args.comment)
    print(f"run {run['id']} rejected")
    return 0


class TerminalProgress:
    """A tqdm progress bar per training phase (each sweep rank, then the final run) on stderr."""

    def __init__(self) -> None:
        self.bar = None
        self.phase = None
        self.postfix: dict[str, str] = {}

    def __call__(self, progress: dict) -> None:
        from tqdm import tqdm

        phase = progress.get("phase", "train")
        if self.bar is None or phase != self.phase:
            self.close()
            self.phase = phase
            self.postfix = {}
            self.bar = tqdm(total=progress["total_steps"], desc=phase, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(progress["step"] - self.bar.n)
        for key in ("loss", "val_loss", "val_macro_f1"):
            if progress.get(key) is not None:
                self.postfix[key] = f"{progress[key]:.3f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_retrain(args) -> int:
    """Run one retrain in this process, with a progress bar; the daemon promotes the result once approved."""
    import threading

    from monitor.daemon import new_run_id
    from retrain.datasets import dataset_from_config
    from retrain.jobs import RUNNING_STATES, RetrainJob, recover_interrupted_runs, run_owner
    from retrain.trainer import progress_reporter

    config = _config(args)
    store, registry = _open_registry(config)
    active = registry.active()
    if active is None:
        raise DriftloopError("no active version to retrain from; run `driftloop bootstrap` first")
    # A run whose process died (a killed terminal, say) is closed here, as the daemon does at start.
    recover_interrupted_runs(store, config.shared_path)
    running = store.runs(states=RUNNING_STATES, limit=1)
    if running:
        raise DriftloopError(f"retrain run {running[0]['id']} is {running[0]['state']}; wait for it or "
                             f"`driftloop cancel {running[0]['id']}`")
    if store.count_labelled(since=registry.activated_at()) == 0:
        raise DriftloopError(f"no labelled production events since version {active.name} became active; "
                             "post labels to the monitor's /v1/labels first")
    dataset = dataset_from_config(config)
    run_id = new_run_id()
    trigger = {"reason": args.reason, "manual": True}
    store.create_run(run_id, "queued", active.name, {**trigger, "owner": run_owner("driftloop retrain")})
    store.audit(args.by, "retrain_triggered", run_id=run_id, version=active.name, detail=trigger)
    print(f"retrain run {run_id} from version {active.name}; Ctrl-C or `driftloop cancel {run_id}` stops it", flush=True)

    use_bar = sys.stderr.isatty() and not args.no_progress
    progress = TerminalProgress() if use_bar else progress_reporter(lambda line: print(line, file=sys.stderr, flush=True), f"run {run_id}")
    stop = threading.Event()

    def interrupt(signum, _frame) -> None:
        # The first signal cancels cleanly before the next step; the job records it.
        stop.set()

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        job = RetrainJob(run_id=run_id, config=config, store=store, registry=registry, dataset=dataset, base=active,
                         since=registry.activated_at(), on_progress=progress, should_stop=stop.is_set,
                         stop_reason="interrupted in the terminal")
        if use_bar:
            from tqdm.contrib.logging import logging_redirect_tqdm

            # Log lines go above the bar instead of breaking it.
            with logging_redirect_tqdm():
                state = job.run()
        else:
            state = job.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if use_bar:
            progress.close()
    run = store.get_run(run_id)
    training = run["training"] or {}
    validation = (training.get("validation") or {}).get("best") or {}
    if training.get("steps"):
        print(f"trained rank {training.get('rank')} for {training['steps']} steps ({training.get('stop_reason')}) in "
              f"{training.get('wall_seconds', 0):.0f} s, {training.get('total_seconds', 0):.0f} s with data and sweep; "
              f"validation macro-F1 {validation.get('macro_f1', float('nan')):.3f}")
    for name, finding in (training.get("findings") or {}).items():
        print(f"warning: {name}: {finding.get('message', finding)}")
    canary = run["canary"] or {}
    summary = f"run {run_id}: {state}"
    if canary and state not in ("cancelled", "failed"):
        summary += f", canary {canary['status']}"
        if canary.get("deciding_gate"):
            summary += f" at gate {canary['deciding_gate']}"
    if run["error"]:
        summary += f"; {run['error']}"
    print(summary)
    if state == "pending_approval":
        print(f"approve with `driftloop approve {run_id}`; the running monitor then promotes it")
    return 0 if state in ("pending_approval", "approved", "rejected_by_gate") else 1


def cmd_cancel(args) -> int:
    from retrain.jobs import cancel_run

    config = _config(args)
    store, _ = _open_registry(config)
    run = cancel_run(store, args.run_id, actor=args.by, comment=args.comment, state_dir=config.shared_path)
    if run["state"] == "cancelling":
        print(f"run {run['id']}: cancel requested; its worker stops before the next training step")
    else:
        print(f"run {run['id']} cancelled")
    return 0


def cmd_rollback(args) -> int:
    _, registry = _open_registry(_config(args))
    previous, target = registry.rollback(args.to, actor=args.by, reason=args.comment)
    print(f"rolled back from {previous} to {target}; the server and the monitor follow within their poll interval")
    return 0


def cmd_runs(args) -> int:
    store, _ = _open_registry(_config(args))
    runs = store.runs(limit=args.limit)
    if not runs:
        print("no retrain runs yet")
    for run in runs:
        canary = run["canary"] or {}
        print(f"{run['id']}  {run['state']:<17} job={run['job']:<9} base={run['base_version']} promoted={run['promoted_version'] or '-'} "
              f"canary={canary.get('status', '-')}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(run['created_at']))}")
    return 0


def cmd_versions(args) -> int:
    _, registry = _open_registry(_config(args))
    active = registry.active()
    for version in registry.versions():
        marker = "*" if active and version.name == active.name else " "
        print(f"{marker} {version.name:<6} parent={version.parent or '-':<6} run={version.run_id or '-'}  {version.adapter_dir}")
    return 0


def cmd_report(args) -> int:
    from monitor.report import write_window_report

    config = _config(args)
    store, _ = _open_registry(config)
    path = write_window_report(config, store, args.window, Path(args.output) if args.output else None,
                               evidently=not args.no_evidently)
    print(f"wrote {path}")
    return 0


def cmd_history(args) -> int:
    store, _ = _open_registry(_config(args))
    for entry in store.audit_log(limit=args.limit, latest=True):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["timestamp"]))
        print(f"{stamp}  {entry['action']:<20} actor={entry['actor']:<12} run={entry['run_id'] or '-'} "
              f"version={entry['version'] or '-'}  {json.dumps(entry['detail'])}")
    return 0


def cmd_db(args) -> int:
    """Print the schema revision of the configured database, or upgrade it to the newest."""
    from monitor.migrations import current_revision, head_revision, legacy_revision
    from monitor.store import Store, redacted_url

    config = _config(args)
    store = Store(config.db_url, migrate=args.action == "upgrade")
    try:
        current = current_revision(store.engine)
        if current is None:
            with store.engine.connect() as connection:
                legacy = legacy_revision(connection)
            if legacy is not None:
                current = f"{legacy} (tables made before migrations, not stamped yet)"
    finally:
        store.close()
    head = head_revision()
    where = redacted_url(config.db_url)
    if args.action == "upgrade":
        print(f"{where}: schema at revision {current} (newest)")
        return 0
    if current == head:
        print(f"{where}: schema at revision {current} (newest)")
    else:
        print(f"{where}: schema at revision {current or 'none'}; newest is {head}; run `driftloop db upgrade` "
              "(`driftloop run` also upgrades at start-up)")
    return 0


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a whole number of at least 1") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"invalid value {number}: expected at least 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="driftloop", description="Drift monitor and LoRA retraining loop for text classifiers.")
    parser.add_argument("--config", "-c", help=f"YAML config file (default: {DEFAULT_CONFIG} when present, else built-in defaults)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # The options are accepted before and after the command name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], **kwargs)

    bootstrap = command("bootstrap", help="train the first adapter and build its reference profile")
    bootstrap.add_argument("--force", action="store_true", help="train and activate a new version even if one is active")
    bootstrap.set_defaults(func=cmd_bootstrap)

    for name, func, text in (("run", cmd_run, "start the monitor sidecar daemon"),
                             ("serve", cmd_serve, "start the bundled model server")):
        sub = command(name, help=text)
        sub.add_argument("--host", help="listen address (default from the config)")
        sub.add_argument("--port", type=int, help="listen port (default from the config); the other process "
                                                     "still finds this one through the config's addresses")
        sub.set_defaults(func=func)

    demo = command("demo", help="run the closed loop on CLINC150 with real processes on loopback")
    demo.add_argument("--quick", action="store_true", help="smaller slice: finishes in a few minutes")
    demo.add_argument("--keep-state", action="store_true", help="keep the previous demo's database and versions")
    demo.set_defaults(func=cmd_demo)

    retrain = command("retrain", help="run a retrain now in this terminal, with a progress bar")
    retrain.add_argument("--reason", default="manual", help="why, for the audit log")
    retrain.add_argument("--by", default=os.environ.get("USER", "cli"), help="who starts it (default: $USER)")
    retrain.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    retrain.set_defaults(func=cmd_retrain)

    for name, func, text in (("approve", cmd_approve, "approve a retrain run waiting for approval"),
                             ("reject", cmd_reject, "reject a retrain run waiting for approval"),
                             ("cancel", cmd_cancel, "cancel a queued, running, pending or approved retrain run")):
        sub = command(name, help=text)
        sub.add_argument("run_id")
        sub.add_argument("--comment", default="")
        sub.add_argument("--by", default=os.environ.get("USER", "cli"), help="who decides (default: $USER)")
        sub.set_defaults(func=func)

    rollback = command("rollback", help="make an earlier version active again")
    rollback.add_argument("--to", help="version name (default: step back to the version active before the "
                                       "current one; repeated rollbacks keep stepping back)")
    rollback.add_argument("--comment", default="")
    rollback.add_argument("--by", default=os.environ.get("USER", "cli"), help="who rolls back (default: $USER)")
    rollback.set_defaults(func=cmd_rollback)

    for name, func, text in (("runs", cmd_runs, "list retrain runs, newest first"),
                             ("history", cmd_history, "print the latest audit log entries, oldest first")):
        sub = command(name, help=text)
        sub.add_argument("--limit", type=_positive_int, default=50, help="entries to print (default 50)")
        sub.set_defaults(func=func)
    command("versions", help="list adapter versions; * marks the active one").set_defaults(func=cmd_versions)

    database = command("db", help="show or upgrade the database schema revision (Alembic)")
    database.add_argument("action", choices=["current", "upgrade"],
                          help="current: print the revision; upgrade: migrate to the newest revision")
    database.set_defaults(func=cmd_db)

    report = command("report", help="write a self-contained HTML report of one window against its reference")
    report.add_argument("--window", required=True, help="window id, as listed by GET /v1/windows")
    report.add_argument("--output", "-o", help="HTML file to write (default: <state_dir>/reports/<window>.html)")
    report.add_argument("--no-evidently", action="store_true", help="leave out the Evidently part (it takes a few seconds)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import warnings

    import transformers

    # Deprecation notices from transformers internals are not actionable for users of this CLI.
    warnings.filterwarnings("ignore", category=FutureWarning)

    # Model-load reports and progress bars would bury the daemon's own log lines.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Alembic logs its context on each start; monitor.migrations logs the upgrades themselves.
    for noisy in ("httpx", "apscheduler", "sentence_transformers", "peft", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except DriftloopError as exc:
        print(f"driftloop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`driftloop runs | head`); point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
