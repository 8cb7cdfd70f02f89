"""Shared fixtures for the backend tests: real Redis, real processes, real HTTP.

- Redis: the local server at 127.0.0.1:6379, database `REDIS_DB` (kept for these tests), flushed before each
  test that uses it; tests that stop Redis start their own `redis-server` on a free port.
- A tiny random GPT4RoI checkpoint registered as version `tiny-1` in a temporary MODEL_DIR.
- `fake_ls`: a small HTTP server standing in for Label Studio's REST API and file routes (uploads with a
  token, presigned cloud URIs, public images, a slow route, tasks, predictions).
- `worker` / `api`: `python -m backend worker` and `python -m backend serve-api` subprocesses on that Redis.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from PIL import Image, ImageDraw

from tests.paths import REPO, SHARED

CAPTURES = SHARED / "labelstudio-captures"
REDIS_DB = 11
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
KEY_PREFIX = "gpt4roi-test"
LS_TOKEN = "test-legacy-token"
MODEL_VERSION = "tiny-1"
CONFIG_DIR = REPO / "labelstudio_config"


# ---------------------------------------------------------------------- helpers
def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def capture(prefix: str) -> dict[str, Any]:
    """One Label Studio capture file (`NN_…json`) from the shared reference material."""
    matches = sorted(CAPTURES.glob(f"{prefix}_*.json"))
    if not matches:
        raise FileNotFoundError(f"no capture {prefix}_*.json in {CAPTURES}")
    return json.loads(matches[0].read_text(encoding="utf-8"))


def config_xml(name: str) -> str:
    """A labeling config shipped in labelstudio_config/."""
    return (CONFIG_DIR / name).read_text(encoding="utf-8")


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
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
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
    client = httpx.Client(base_url=url, timeout=120, auth=auth)

    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"API exited:\n{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            return client.get("/health").status_code in (200, 401)
        return False

    wait_until(ready, 60, "the API to answer /health")
    return Api(proc, url, client)


# ---------------------------------------------------------------------- images
def scene(size: tuple[int, int] = (96, 64), box: tuple[int, int, int, int] = (10, 12, 50, 44),
          colour: tuple[int, int, int] = (220, 30, 30)) -> Image.Image:
    """A white image with one filled rectangle."""
    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).rectangle(box, fill=colour)
    return image


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of an image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------- a stand-in Label Studio
@dataclass
class FakeLabelStudio:
    """Label Studio's REST and file routes the backend uses, over real HTTP, with inspectable state."""

    url: str = ""
    token: str = LS_TOKEN
    files: dict[str, bytes] = field(default_factory=dict)
    projects: dict[int, dict[str, Any]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_project(self, project_id: int, label_config: str, tasks: list[dict[str, Any]]) -> None:
        """Create (or replace) a project with its tasks."""
        with self.lock:
            self.projects[project_id] = {"label_config": label_config, "tasks": tasks}
            self.predictions = [p for p in self.predictions if p["project"] != project_id]

    def predictions_for(self, project_id: int) -> list[dict[str, Any]]:
        """Predictions pushed for a project, in arrival order."""
        with self.lock:
            return [p for p in self.predictions if p["project"] == project_id]


def _handler(ls: FakeLabelStudio) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data).encode())

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Token {ls.token}"

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            ls.requests.append(("GET", self.path, dict(self.headers)))
            path = parts.path
            if path.startswith("/img/") or path.startswith("/slow/"):
                if path.startswith("/slow/"):
                    time.sleep(float(query.get("delay", ["3"])[0]))
                name = path.split("/", 2)[2]
                data = ls.files.get(name)
                return self._send(200, data, "image/png") if data is not None else self._json(404, {"detail": "no"})
            if not self._authorized():
                return self._json(401, {"detail": "Authentication credentials were not provided."})
            if path.startswith("/data/upload/"):
                data = ls.files.get(path.rsplit("/", 1)[1])
                return self._send(200, data, "image/png") if data is not None else self._json(404, {"detail": "no"})
            if path.startswith("/tasks/") and path.endswith("/presign/"):
                uri = base64.urlsafe_b64decode(query["fileuri"][0]).decode()
                name = uri.rsplit("/", 1)[1]
                return self._send(302, headers={"Location": f"{ls.url}/img/{name}?X-Amz-Signature=secret"})
            if path.startswith("/api/projects/"):
                project_id = int(path.strip("/").split("/")[2])
                project = ls.projects.get(project_id)
                if project is None:
                    return self._json(404, {"detail": "Not found."})
                return self._json(200, {"id": project_id, "title": f"p{project_id}",
                                        "label_config": project["label_config"]})
            if path == "/api/tasks/":
                project_id = int(query["project"][0])
                page = int(query.get("page", ["1"])[0])
                size = int(query.get("page_size", ["100"])[0])
                with ls.lock:
                    tasks = [dict(t) for t in ls.projects.get(project_id, {}).get("tasks", [])]
                    for task in tasks:
                        task["predictions"] = [p for p in ls.predictions if p["task"] == task["id"]] + list(
                            task.get("predictions", []))
                chunk = tasks[(page - 1) * size: page * size]
                return self._json(200, {"tasks": chunk, "total": len(tasks), "total_annotations": 0,
                                        "total_predictions": 0})
            return self._json(404, {"detail": "Not found."})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ls.requests.append(("POST", self.path, dict(self.headers)))
            if not self._authorized():
                return self._json(401, {"detail": "Authentication credentials were not provided."})
            if urlsplit(self.path).path == "/api/predictions/":
                data = json.loads(body)
                with ls.lock:
                    project = next((pid for pid, p in ls.projects.items()
                                    if any(t["id"] == data["task"] for t in p["tasks"])), None)
                    record = {"id": len(ls.predictions) + 1, "project": project, **data}
                    ls.predictions.append(record)
                return self._json(201, record)
            return self._json(404, {"detail": "Not found."})

    return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that give up on the slow route close the socket; that is the point of those tests.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@pytest.fixture(scope="session")
def fake_ls() -> Iterator[FakeLabelStudio]:
    """A running stand-in Label Studio with a few images."""
    ls = FakeLabelStudio()
    ls.files.update({
        "red.png": png_bytes(scene()),
        "blue.png": png_bytes(scene(colour=(20, 40, 220), box=(40, 8, 90, 60))),
        "corrupt.png": b"\x89PNG\r\n\x1a\n this is not an image",
    })
    server = _QuietServer(("127.0.0.1", 0), _handler(ls))
    ls.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield ls
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------- model, Redis, processes
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MODEL_DIR whose current version `tiny-1` is a random tiny checkpoint."""
    from tests.model_factory import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    make_tiny_checkpoint(root / MODEL_VERSION)
    (root / "current").write_text(MODEL_VERSION + "\n")
    return root


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    """The test database on the local Redis, empty at the start of the test."""
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError:
        pytest.fail("the tests need Redis at 127.0.0.1:6379 (start redis-server)")
    _flush_keeping_workers(connection)
    yield connection
    connection.close()


def _flush_keeping_workers(connection: redis.Redis) -> None:
    # Session workers stay registered; everything else (queues, jobs, results, claims) goes.
    keep = {key for key in connection.scan_iter("rq:worker:*")} | {b"rq:workers"}
    keep |= set(connection.scan_iter("rq:workers:*"))
    doomed = [key for key in connection.scan_iter("*") if key not in keep]
    for start in range(0, len(doomed), 500):
        connection.delete(*doomed[start:start + 500])


@pytest.fixture(scope="session")
def base_env(model_dir: Path, fake_ls: FakeLabelStudio, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Settings shared by the session's API and worker."""
    return {
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": KEY_PREFIX,
        "MODEL_DIR": str(model_dir),
        "DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "LABEL_STUDIO_URL": fake_ls.url,
        "LABEL_STUDIO_API_KEY": LS_TOKEN,
        "DEVICE": "cpu",
        "MAX_NEW_TOKENS": "6",
        "WORKER_HEARTBEAT_TTL": "3",
        "WORKER_MAINTENANCE_INTERVAL": "1",
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture(scope="session")
def worker(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """One model worker for the whole session."""
    proc = start_worker(backend_env(base_env), tmp_path_factory.mktemp("logs") / "worker.log", "session-worker")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def api(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The API for the whole session (default settings plus the test environment)."""
    server = start_api(backend_env(base_env), tmp_path_factory.mktemp("logs") / "api.log")
    yield server
    server.stop()
