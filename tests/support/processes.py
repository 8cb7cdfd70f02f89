"""Backend processes started by tests: `python -m backend worker` and `serve-api`, with their logs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from backend.webhooks import SECRET_HEADER
from tests.support import REPO, WEBHOOK_SECRET, free_port, wait_until


@dataclass
class Process:
    """A child process started by a fixture, with its combined output in a log file."""

    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        """The end of the process's output, for failure messages."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        """Whether it is still running."""
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Signal it and wait; SIGKILL if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def start_process(args: list[str], env: dict[str, str], log: Path) -> Process:
    """Start `args` in the repository root with `env`, output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "wb")  # noqa: SIM115 - the child owns it for its lifetime
    popen = subprocess.Popen(args, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    return Process(popen, log)


def backend_env(base: dict[str, str], **overrides: str) -> dict[str, str]:
    """The environment of a backend process: the test settings plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    env.update(base)
    env.update(overrides)

    return env


def start_worker(env: dict[str, str], log: Path, name: str) -> Process:
    """`python -m backend worker --name NAME`; returns once it listens (its model is loaded)."""
    proc = start_process([sys.executable, "-m", "backend", "worker", "--name", name], env, log)
    connection = redis.Redis.from_url(env["REDIS_URL"])
    key = f"rq:worker:{name}"

    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"worker {name} exited:\n{proc.tail()}")
        return bool(connection.exists(key))

    wait_until(ready, 120, f"worker {name} to start")
    return proc


@dataclass
class Api:
    """A running `python -m backend serve-api`."""

    process: Process
    url: str
    client: httpx.Client

    def stop(self) -> None:
        """Stop the server and close the client."""
        self.client.close()
        self.process.stop()


def start_api(env: dict[str, str], log: Path) -> Api:
    """`python -m backend serve-api` on a free port; returns once /health answers."""
    port = free_port()
    env = {**env, "PORT": str(port), "HOST": "127.0.0.1"}
    proc = start_process([sys.executable, "-m", "backend", "serve-api"], env, log)
    url = f"http://127.0.0.1:{port}"
    auth = (env["BASIC_AUTH_USER"], env["BASIC_AUTH_PASS"]) if env.get("BASIC_AUTH_USER") else None
    # The backend's webhook secret, as Label Studio sends it once `connect` installed it.
    secret = {SECRET_HEADER: env["WEBHOOK_SECRET"]} if env.get("WEBHOOK_SECRET") else {}
    client = httpx.Client(base_url=url, timeout=120, auth=auth, headers=secret)

    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"API exited:\n{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            return client.get("/health").status_code in (200, 401)
        return False

    wait_until(ready, 60, "the API to answer /health")
    return Api(proc, url, client)


def start_serve(env: dict[str, str], log: Path, timeout_s: float = 180) -> tuple[Process, httpx.Client]:
    """`python -m backend serve` (API, worker, Redis as `env` says) on `env["PORT"]`; returns once /health
    answers, with a client that sends the webhook secret as Label Studio would."""
    proc = start_process([sys.executable, "-m", "backend", "serve"], env, log)
    client = httpx.Client(base_url=f"http://127.0.0.1:{env['PORT']}", timeout=120,
                          headers={SECRET_HEADER: env.get("WEBHOOK_SECRET", WEBHOOK_SECRET)})

    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"serve exited:\n{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            return client.get("/health").status_code == 200
        return False

    wait_until(ready, timeout_s, "serve to answer /health")
    return proc, client
