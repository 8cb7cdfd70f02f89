"""A stand-in for Label Studio's REST API and file routes, over real HTTP, with inspectable state.

Routes: uploads behind a token (`/data/upload/…`), the presign route of cloud URIs (redirecting to a
public URL with a credential in its query), public and slow images (`/img/…`, `/slow/…`), projects (read
and their prelabeling version changed), paged task lists and single tasks, annotations, prediction
pushes (one, or many in one import request), and registering ML backends and webhooks, which a stock Label
Studio refuses for loopback and
private URLs (ML_BLOCK_LOCAL_IP and SSRF_PROTECTION_ENABLED, both on by default) with the 403 that Label
Studio 1.23 answers.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.images import png_bytes, scene

LS_TOKEN = "test-legacy-token"
# What Label Studio 1.23 answers for an ML backend or webhook URL on a blocked network
# (tests/fixtures/labelstudio_captures/20_ls_api_connect_blocked_by_default.json).
BLOCKED_DETAIL = "URL resolves to a reserved network address (block: 127.0.0.0/8)"


def jwt(claims: dict[str, Any]) -> str:
    """An (unsigned) JWT with these claims, shaped like Label Studio's tokens."""
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def personal_access_token(lifetime_s: float = 3600 * 24 * 365) -> str:
    """A personal access token (a JWT refresh token), as Label Studio hands them out."""
    return jwt({"token_type": "refresh", "exp": int(time.time() + lifetime_s), "jti": uuid.uuid4().hex,
                "user_id": "1"})


@dataclass
class FakeLabelStudio:
    """Label Studio's REST and file routes the backend uses, over real HTTP, with inspectable state."""

    url: str = ""
    token: str = LS_TOKEN
    # Personal access tokens: the refresh token, the access tokens it was exchanged for (5 minutes each, as
    # Label Studio gives them), and how many exchanges there were.
    personal_token: str = field(default_factory=personal_access_token)
    access_tokens: set[str] = field(default_factory=set)
    refreshes: int = 0
    legacy_tokens_enabled: bool = True
    annotations: dict[int, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    projects: dict[int, dict[str, Any]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    # Task id → how many more prediction pushes for it are answered 503 (a Label Studio having a bad moment).
    failing_pushes: dict[int, int] = field(default_factory=dict)
    # Whether `POST /api/projects/{id}/import/predictions` (many predictions in one request) is served.
    bulk_predictions: bool = True
    # How many more predictions are stored before every access token expires (None: no such plan), and
    # how many exchanges there had been when they did.
    expire_after_predictions: int | None = None
    refreshes_at_expiry: int | None = None
    # A stock Label Studio refuses ML backends and webhooks on loopback and private addresses.
    block_local_ip: bool = True
    ml_backends: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_project(self, project_id: int, label_config: str, tasks: list[dict[str, Any]]) -> None:
        """Create (or replace) a project with its tasks."""
        with self.lock:
            self.projects[project_id] = {"label_config": label_config, "tasks": tasks}
            self.predictions = [p for p in self.predictions if p["project"] != project_id]

    def expire_access_tokens(self) -> None:
        """Make every access token handed out so far invalid (as when its five minutes are over)."""
        with self.lock:
            self._expire()

    def expire_access_tokens_after_predictions(self, count: int) -> None:
        """Make every access token invalid once `count` more predictions are stored (the five minutes ending
        in the middle of a batch push)."""
        with self.lock:
            self.expire_after_predictions = count
            self.refreshes_at_expiry = None

    def _expire(self) -> None:
        self.access_tokens.clear()
        self.refreshes_at_expiry = self.refreshes

    def _stored_prediction(self) -> None:
        if self.expire_after_predictions is None:
            return
        self.expire_after_predictions -= 1
        if self.expire_after_predictions <= 0:
            self.expire_after_predictions = None
            self._expire()

    def patch(self, kind: str, record_id: int, changes: dict[str, Any]) -> dict[str, Any] | None:
        """`PATCH /api/{kind}/{id}/` of a project or a webhook: the record as changed, None if there is none."""
        with self.lock:
            if kind == "projects":
                record = self.projects.get(record_id)
            elif kind == "webhooks":
                record = next((h for h in self.webhooks if h["id"] == record_id), None)
            else:
                record = None
            if record is None:
                return None
            record.update(changes)
            return _project_view(record_id, record) if kind == "projects" else dict(record)

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
            sent = self.headers.get("Authorization") or ""
            if sent.startswith("Bearer "):
                with ls.lock:
                    return sent.removeprefix("Bearer ") in ls.access_tokens
            return ls.legacy_tokens_enabled and sent == f"Token {ls.token}"

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
            if path.startswith("/api/annotations/"):
                annotation = ls.annotations.get(int(path.strip("/").split("/")[2]))
                return self._json(200, annotation) if annotation is not None else self._json(404, {"detail": "no"})
            if path.startswith("/api/projects/"):
                project_id = int(path.strip("/").split("/")[2])
                project = ls.projects.get(project_id)
                if project is None:
                    return self._json(404, {"detail": "Not found."})
                return self._json(200, _project_view(project_id, project))
            if path.startswith("/api/tasks/") and path.strip("/").split("/")[-1].isdigit():
                task_id = int(path.strip("/").split("/")[2])
                with ls.lock:
                    found = next(({**task, "project": pid} for pid, p in ls.projects.items()
                                  for task in p["tasks"] if task["id"] == task_id), None)
                return self._json(200, found) if found is not None else self._json(404, {"detail": "Not found."})
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
            if path.rstrip("/") in ("/api/ml", "/api/webhooks"):
                rows = ls.ml_backends if path.startswith("/api/ml") else ls.webhooks
                project_id = int(query.get("project", ["0"])[0])
                with ls.lock:
                    found = [r for r in rows if not project_id or r["project"] == project_id]
                return self._json(200, found)
            return self._json(404, {"detail": "Not found."})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ls.requests.append(("POST", self.path, dict(self.headers)))
            if urlsplit(self.path).path == "/api/token/refresh/":
                if json.loads(body or b"{}").get("refresh") != ls.personal_token:
                    return self._json(401, {"detail": "Token is invalid or expired", "code": "token_not_valid"})
                access = jwt({"token_type": "access", "exp": int(time.time() + 300), "jti": uuid.uuid4().hex})
                with ls.lock:
                    ls.access_tokens.add(access)
                    ls.refreshes += 1
                return self._json(200, {"access": access})
            if not self._authorized():
                return self._json(401, {"detail": "Authentication credentials were not provided."})
            if urlsplit(self.path).path == "/api/predictions/":
                data = json.loads(body)
                with ls.lock:
                    if ls.failing_pushes.get(data["task"], 0) > 0:
                        ls.failing_pushes[data["task"]] -= 1
                        return self._json(503, {"detail": "Service Unavailable"})
                    project = next((pid for pid, p in ls.projects.items()
                                    if any(t["id"] == data["task"] for t in p["tasks"])), None)
                    record = {"id": len(ls.predictions) + 1, "project": project, **data}
                    ls.predictions.append(record)
                    ls._stored_prediction()
                return self._json(201, record)
            bulk = re.fullmatch(r"/api/projects/(\d+)/import/predictions", urlsplit(self.path).path)
            if bulk:
                return self._import_predictions(int(bulk.group(1)), json.loads(body))
            if urlsplit(self.path).path.rstrip("/") in ("/api/ml", "/api/webhooks"):
                data = json.loads(body)
                if ls.block_local_ip and _reserved(data.get("url", "")):
                    return self._json(403, {"id": uuid.uuid4().hex, "status_code": 403, "version": "1.23.2",
                                            "detail": BLOCKED_DETAIL, "exc_info": None})
                rows = ls.ml_backends if self.path.startswith("/api/ml") else ls.webhooks
                with ls.lock:
                    record = {"id": len(rows) + 1, **data}
                    rows.append(record)
                return self._json(201, record)
            return self._json(404, {"detail": "Not found."})

        def _import_predictions(self, project_id: int, items: list[dict[str, Any]]) -> None:
            # All or none, as Label Studio: a task outside the project refuses the whole request.
            with ls.lock:
                if not ls.bulk_predictions:
                    return self._json(404, {"detail": "Not found."})
                tasks = {t["id"] for t in ls.projects.get(project_id, {}).get("tasks", [])}
                missing = [item.get("task") for item in items if item.get("task") not in tasks]
                if missing:
                    return self._json(400, {"detail": f"task ID {missing[0]} not found in project {project_id}"})
                failing = [item["task"] for item in items if ls.failing_pushes.get(item["task"], 0) > 0]
                for task in failing:
                    ls.failing_pushes[task] -= 1
                if failing:
                    return self._json(503, {"detail": "Service Unavailable"})
                for item in items:
                    ls.predictions.append({"id": len(ls.predictions) + 1, "project": project_id, **item})
                    ls._stored_prediction()
            return self._json(201, {"created": len(items)})

        def do_PATCH(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ls.requests.append(("PATCH", self.path, dict(self.headers)))
            if not self._authorized():
                return self._json(401, {"detail": "Authentication credentials were not provided."})
            kind, _, number = urlsplit(self.path).path.strip("/").removeprefix("api/").partition("/")
            changed = ls.patch(kind, int(number), json.loads(body)) if number.isdigit() else None
            if changed is not None:
                return self._json(200, changed)
            return self._json(404, {"detail": "Not found."})

    return Handler


def _project_view(project_id: int, project: dict[str, Any]) -> dict[str, Any]:
    """A project as `GET /api/projects/{id}/` shows it (the fields the backend reads)."""
    return {"id": project_id, "title": f"p{project_id}", "label_config": project["label_config"],
            "model_version": project.get("model_version", "")}


def _reserved(url: str) -> bool:
    """Whether a URL's host resolves to a loopback, private or otherwise non-public address."""
    host = urlsplit(url).hostname
    if not host:
        return False
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return any(not ipaddress.ip_address(a.split("%", 1)[0]).is_global for a in addresses)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that give up on the slow route close the socket; that is the point of those tests.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def running_fake_labelstudio() -> Iterator[FakeLabelStudio]:
    """A stand-in Label Studio with a few images, served on a free loopback port while the block runs."""
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
    try:
        yield ls
    finally:
        server.shutdown()
        server.server_close()
