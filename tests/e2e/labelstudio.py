"""A real Label Studio for end-to-end tests: install, start, stop, serve images, talk to its REST API.

Label Studio runs from its own virtual environment (its pinned dependencies clash with the project's),
installed by ``scripts/ensure_labelstudio.sh`` at a stable path so that repeated runs reuse it. The
server is started as a team starts it, with only the settings an ML backend on loopback needs: local-IP
blocking and SSRF protection off, analytics and version checks off. Legacy API tokens stay disabled for
the organization (Label Studio's default): the tests log in with the user's password, create a personal
access token as a user would in Account & Settings, and give the backend that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

LS_VERSION = "1.23.2"
REPO_ROOT = Path(__file__).resolve().parents[2]
ENSURE_SCRIPT = REPO_ROOT / "scripts" / "ensure_labelstudio.sh"
CONFIG_DIR = REPO_ROOT / "labelstudio_config"

# Settings that make Label Studio usable with a backend on 127.0.0.1 and quiet in CI.
SERVER_ENV: dict[str, str] = {
    "ML_BLOCK_LOCAL_IP": "false",
    "SSRF_PROTECTION_ENABLED": "false",
    "COLLECT_ANALYTICS": "false",
    "LATEST_VERSION_CHECK": "false",
    "ML_TIMEOUT_PREDICT": "100",
}

# Inherited variables that would change how Label Studio behaves or which code it imports.
_DROPPED_ENV_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_")
_DROPPED_ENV_NAMES = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "ML_BLOCK_LOCAL_IP",
                      "SSRF_PROTECTION_ENABLED", "ML_TIMEOUT_PREDICT"}


class LabelStudioUnavailable(RuntimeError):
    """Label Studio could not be installed into its virtual environment."""


class LabelStudioStartError(RuntimeError):
    """The Label Studio server did not come up; the message names its log file."""


class LabelStudioError(RuntimeError):
    """Label Studio answered an API call with an HTTP error."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


def cache_root() -> Path:
    """Where Label Studio's venv and pristine data live between runs (``GPT4ROI_LS_CACHE`` overrides)."""
    return Path(os.environ.get("GPT4ROI_LS_CACHE") or Path.home() / ".cache" / "gpt4roi-ls")


def default_venv_path(version: str = LS_VERSION) -> Path:
    """Where ``scripts/ensure_labelstudio.sh`` keeps the Label Studio venv (``GPT4ROI_LS_VENV`` overrides)."""
    override = os.environ.get("GPT4ROI_LS_VENV")
    if override:
        return Path(override)
    return cache_root() / f"venv-{version}"


def ensure_labelstudio(version: str = LS_VERSION, timeout_s: float = 1200.0) -> Path:
    """Install Label Studio ``version`` into its own venv unless already there; return the venv path.

    Raises LabelStudioUnavailable with the installer's output when the install fails.
    """
    env = {**os.environ, "LS_VERSION": version, "GPT4ROI_LS_VENV": str(default_venv_path(version))}
    try:
        proc = subprocess.run(["bash", str(ENSURE_SCRIPT)], env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabelStudioUnavailable(
            f"installing label-studio {version} took over {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise LabelStudioUnavailable(
            f"{ENSURE_SCRIPT} exited with {proc.returncode}:\n{_tail(proc.stderr + proc.stdout, 60)}")
    venv = Path(proc.stdout.strip().splitlines()[-1])
    if not (venv / "bin" / "label-studio").is_file():
        raise LabelStudioUnavailable(f"{ENSURE_SCRIPT} reported {venv}, which has no bin/label-studio")
    return venv


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def read_log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note when it does not exist."""
    if not path.exists():
        return f"(no log at {path})"
    return _tail(path.read_text(encoding="utf-8", errors="replace"), lines)


@dataclass(frozen=True)
class Credentials:
    """The one user a test server is started with."""

    username: str
    password: str
    token: str

    @classmethod
    def generate(cls) -> Credentials:
        """A fresh user with a random password and legacy token."""
        return cls(username="e2e@example.com", password="pw-" + secrets.token_hex(8),
                   token=secrets.token_hex(20))


@dataclass
class LabelStudioServer:
    """One Label Studio process on loopback with its own data directory and a known user and token."""

    venv: Path
    data_dir: Path
    log_path: Path
    credentials: Credentials = field(default_factory=lambda: Credentials.generate())
    port: int = field(default_factory=free_port)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # `--enable-legacy-api-token`: only the pristine data is built without it, so leave it off.
    legacy_tokens: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    personal_token: str = field(default="", init=False, repr=False)

    @property
    def token(self) -> str:
        """The user's personal access token (created at start; the kind Label Studio hands out today)."""
        if not self.personal_token:
            raise RuntimeError("the server has not started: no personal access token yet")
        return self.personal_token

    @property
    def legacy_token(self) -> str:
        """The user's legacy token: accepted only while legacy tokens are enabled (`set_legacy_tokens`)."""
        return self.credentials.token

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The ``label-studio start`` command line."""
        return [
            str(self.venv / "bin" / "label-studio"), "start", "--no-browser",
            "--internal-host", "127.0.0.1", "--port", str(self.port), "--host", self.url,
            "--data-dir", str(self.data_dir),
            "--username", self.credentials.username, "--password", self.credentials.password,
            "--user-token", self.credentials.token,
        ] + (["--enable-legacy-api-token"] if self.legacy_tokens else [])

    def environment(self) -> dict[str, str]:
        """The process environment: ours minus Label Studio's own knobs, plus SERVER_ENV and extra_env."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_DROPPED_ENV_PREFIXES) and k not in _DROPPED_ENV_NAMES}
        env.update(SERVER_ENV)
        # Label Studio reads its default data dir before --data-dir; keep it off the user's home.
        env["LABEL_STUDIO_BASE_DATA_DIR"] = str(self.data_dir)
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 180.0, with_token: bool = True) -> float:
        """Start the server, wait until it answers and (with `with_token`) create the user's personal access
        token; return seconds taken.

        Raises LabelStudioStartError (naming the log file, with its tail) when the process exits or
        does not answer within ``timeout_s``.
        """
        if self.process is not None:
            raise RuntimeError(f"Label Studio is already running at {self.url}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            # A session of its own, so that stop() reaches every child process at once.
            self.process = subprocess.Popen(self.command(), cwd=self.data_dir, env=self.environment(),
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = started + timeout_s
        last_error = "no answer yet"
        with httpx.Client(timeout=5.0) as http:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code is not None:
                    self.process = None
                    raise LabelStudioStartError(
                        f"Label Studio exited with code {code} during start; log {self.log_path}:\n"
                        f"{read_log_tail(self.log_path)}")
                try:
                    answer = http.get(f"{self.url}/health/")
                    if answer.status_code == 200:
                        if with_token:
                            self.personal_token = self._personal_token()
                        return time.monotonic() - started
                    last_error = f"HTTP {answer.status_code}: {answer.text[:200]}"
                except httpx.TransportError as exc:
                    last_error = repr(exc)
                time.sleep(0.5)
        self.stop()
        raise LabelStudioStartError(
            f"Label Studio did not answer at {self.url} within {timeout_s:.0f} s (last: {last_error}); "
            f"log {self.log_path}:\n{read_log_tail(self.log_path)}")

    def stop(self, grace_s: float = 15.0) -> None:
        """Terminate the server's whole process group, killing it after ``grace_s`` seconds."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=grace_s)

    def client(self, timeout_s: float = 120.0) -> LabelStudioClient:
        """An API client authenticated as the server's user, with its personal access token."""
        return LabelStudioClient(self.url, self.token, timeout_s=timeout_s)

    @contextlib.contextmanager
    def session(self) -> Iterator[httpx.Client]:
        """An HTTP client logged in through Label Studio's login form, as the user's browser would be."""
        with httpx.Client(base_url=self.url, timeout=60.0, follow_redirects=True) as http:
            http.get("/user/login/")  # the form's CSRF cookie
            csrf = http.cookies.get("csrftoken", "")
            answer = http.post("/user/login/", data={"email": self.credentials.username,
                                                     "password": self.credentials.password,
                                                     "csrfmiddlewaretoken": csrf})
            if answer.status_code != 200 or "/user/login" in str(answer.url):
                raise LabelStudioStartError(f"logging in as {self.credentials.username} failed "
                                            f"(HTTP {answer.status_code}); log {self.log_path}")
            yield http

    def _personal_token(self) -> str:
        # What a user does under Account & Settings → Personal Access Token.
        with self.session() as http:
            answer = http.post("/api/token/")
            if answer.status_code != 201:
                raise LabelStudioStartError(f"creating a personal access token failed: HTTP {answer.status_code} "
                                            f"{answer.text[:300]}")
            return answer.json()["token"]

    def set_legacy_tokens(self, enabled: bool) -> None:
        """What an administrator does under Organization → API Tokens Settings."""
        with self.session() as http:
            answer = http.post("/api/jwt/settings", json={"api_tokens_enabled": True,
                                                          "legacy_api_tokens_enabled": enabled})
            if answer.status_code >= 400:
                raise LabelStudioError("POST", "/api/jwt/settings", answer.status_code, answer.text)

    def __enter__(self) -> LabelStudioServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        # The labeling UI downloads images with cross-origin fetches, which a browser refuses without this.
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()


class ImageServer:
    """Serves the files of one folder over HTTP on 127.0.0.1, from a background thread."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="image-server", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        """Base URL, without a trailing slash."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, relative_path: str) -> str:
        """The URL of a file below the served folder."""
        if not (self.root / relative_path).is_file():
            raise FileNotFoundError(f"{relative_path} is not a file below {self.root}")
        return f"{self.base_url}/{relative_path.lstrip('/')}"

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ImageServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class LabelStudioClient:
    """The Label Studio REST calls the end-to-end tests need, authenticated with either kind of token (the
    backend's own authentication, `backend.labelstudio`)."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 120.0) -> None:
        from backend.labelstudio import LabelStudioAuth, LabelStudioCredentials

        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s,
                                  auth=LabelStudioAuth(LabelStudioCredentials(self.base_url, token)))

    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                json_body: Any = None) -> Any:
        """Call the API; return the decoded JSON (None for an empty body) or raise LabelStudioError."""
        answer = self._http.request(method, path, params=params, json=json_body)
        if answer.status_code >= 400:
            raise LabelStudioError(method, path, answer.status_code, answer.text)
        if not answer.content:
            return None
        try:
            return answer.json()
        except json.JSONDecodeError as exc:
            raise LabelStudioError(method, path, answer.status_code,
                                   f"expected JSON, got: {answer.text[:500]}") from exc

    # Projects

    def create_project(self, title: str, label_config: str, **fields: Any) -> dict[str, Any]:
        """Create a project with a label config (XML text); extra fields go to ``POST /api/projects``."""
        return self.request("POST", "/api/projects",
                            json_body={"title": title, "label_config": label_config, **fields})

    def create_project_from_config(self, config: str | Path, title: str | None = None,
                                   **fields: Any) -> dict[str, Any]:
        """Create a project from a config file: a path, or a file name in ``labelstudio_config/``."""
        path = Path(config)
        if not path.is_absolute() and not path.exists():
            path = CONFIG_DIR / path
        if not path.is_file():
            raise FileNotFoundError(f"no label config at {path}")
        return self.create_project(title or path.stem, path.read_text(encoding="utf-8"), **fields)

    def get_project(self, project_id: int) -> dict[str, Any]:
        """``GET /api/projects/{id}``."""
        return self.request("GET", f"/api/projects/{project_id}")

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        """``PATCH /api/projects/{id}``, e.g. ``start_training_on_annotation_update=True``."""
        return self.request("PATCH", f"/api/projects/{project_id}", json_body=fields)

    def next_task(self, project_id: int) -> dict[str, Any]:
        """The label stream's next task (``GET /api/projects/{id}/next``), predictions included."""
        return self.request("GET", f"/api/projects/{project_id}/next")

    # Tasks

    def import_tasks(self, project_id: int, tasks: Sequence[Mapping[str, Any]]) -> list[int]:
        """Import tasks (each ``{"data": {...}}``, optionally with predictions); return their new ids."""
        answer = self.request("POST", f"/api/projects/{project_id}/import",
                              params={"return_task_ids": "true"}, json_body=list(tasks))
        task_ids = answer.get("task_ids") if isinstance(answer, dict) else None
        if task_ids is None or len(task_ids) != len(tasks):
            raise LabelStudioError("POST", f"/api/projects/{project_id}/import", 200,
                                   f"expected {len(tasks)} task ids, got: {json.dumps(answer)[:500]}")
        return [int(t) for t in task_ids]

    def upload_images(self, project_id: int, files: Mapping[str, bytes]) -> list[int]:
        """Upload image files into Label Studio (one task each, its image stored by Label Studio under
        ``/data/upload/``), as the import dialog does; return the new task ids in file order."""
        answer = self._http.post(f"/api/projects/{project_id}/import", params={"return_task_ids": "true"},
                                 # One form field per file: Label Studio reads one file per field name.
                                 files=[(f"file{i}", (name, data, "image/png"))
                                        for i, (name, data) in enumerate(files.items())])
        if answer.status_code >= 400:
            raise LabelStudioError("POST", f"/api/projects/{project_id}/import", answer.status_code, answer.text)
        task_ids = answer.json().get("task_ids")
        if not task_ids or len(task_ids) != len(files):
            raise LabelStudioError("POST", f"/api/projects/{project_id}/import", answer.status_code,
                                   f"expected {len(files)} task ids, got: {answer.text[:500]}")
        return [int(t) for t in task_ids]

    def list_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of a project, in id order, with its full data."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            answer = self.request("GET", "/api/tasks", params={"project": project_id, "page": page,
                                                               "page_size": 100, "fields": "all"})
            batch = answer["tasks"] if isinstance(answer, dict) else answer
            tasks.extend(batch)
            total = answer.get("total", len(tasks)) if isinstance(answer, dict) else len(tasks)
            if not batch or len(tasks) >= total:
                return sorted(tasks, key=lambda t: t["id"])
            page += 1

    def get_task(self, task_id: int) -> dict[str, Any]:
        """``GET /api/tasks/{id}`` (opening a task this way may trigger a backend prediction)."""
        return self.request("GET", f"/api/tasks/{task_id}")

    # ML backends

    def connect_ml_backend(self, project_id: int, url: str, title: str = "gpt4roi",
                           is_interactive: bool = True, **fields: Any) -> dict[str, Any]:
        """Connect an ML backend (``POST /api/ml``); Label Studio calls its /health and /setup."""
        return self.request("POST", "/api/ml", json_body={"url": url, "project": project_id, "title": title,
                                                          "is_interactive": is_interactive, **fields})

    def list_ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        """The ML backends of a project, with their state (``CO`` connected, ``ER`` error, ``DI``)."""
        return self.request("GET", "/api/ml", params={"project": project_id})

    def retrieve_predictions(self, project_id: int, task_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """The Data Manager's "Retrieve Predictions" on some tasks (all when ``task_ids`` is None)."""
        selected: dict[str, Any] = ({"all": True, "excluded": []} if task_ids is None
                                    else {"all": False, "included": list(task_ids)})
        return self.request("POST", "/api/dm/actions",
                            params={"id": "retrieve_tasks_predictions", "project": project_id},
                            json_body={"project": project_id, "selectedItems": selected})

    def interactive_annotating(self, ml_backend_id: int, task_id: int,
                               context: Mapping[str, Any] | None) -> dict[str, Any]:
        """What the labeling UI sends for a drawn region.

        Returns ``{"data": <the backend's first result>}``, or ``{"errors": [...]}`` when the backend failed.
        """
        return self.request("POST", f"/api/ml/{ml_backend_id}/interactive-annotating",
                            json_body={"task": task_id, "context": context})

    def train(self, ml_backend_id: int) -> Any:
        """The "Start Training" button: Label Studio sends START_TRAINING to the backend's /webhook."""
        return self.request("POST", f"/api/ml/{ml_backend_id}/train", json_body={})

    def list_webhooks(self, project_id: int) -> list[dict[str, Any]]:
        """Webhooks of a project (connecting a backend creates one to its /webhook)."""
        return self.request("GET", "/api/webhooks", params={"project": project_id})

    # Annotations and predictions

    def create_annotation(self, task_id: int, result: Sequence[Mapping[str, Any]],
                          **fields: Any) -> dict[str, Any]:
        """Submit an annotation (Label Studio then sends ANNOTATION_CREATED)."""
        return self.request("POST", f"/api/tasks/{task_id}/annotations",
                            json_body={"result": list(result), **fields})

    def update_annotation(self, annotation_id: int, result: Sequence[Mapping[str, Any]],
                          **fields: Any) -> dict[str, Any]:
        """Change an annotation (Label Studio then sends ANNOTATION_UPDATED)."""
        return self.request("PATCH", f"/api/annotations/{annotation_id}",
                            json_body={"result": list(result), **fields})

    def delete_annotation(self, annotation_id: int) -> None:
        """Delete an annotation (Label Studio then sends ANNOTATIONS_DELETED)."""
        self.request("DELETE", f"/api/annotations/{annotation_id}")

    def list_annotations(self, task_id: int) -> list[dict[str, Any]]:
        """Annotations of a task."""
        return self.request("GET", f"/api/tasks/{task_id}/annotations")

    def list_predictions(self, task_id: int | None = None,
                         project_id: int | None = None) -> list[dict[str, Any]]:
        """Stored predictions of one task or one project."""
        if (task_id is None) == (project_id is None):
            raise ValueError("pass exactly one of task_id and project_id")
        params = {"task": task_id} if task_id is not None else {"project": project_id}
        return self.request("GET", "/api/predictions", params=params)

    def delete_prediction(self, prediction_id: int) -> None:
        """``DELETE /api/predictions/{id}``."""
        self.request("DELETE", f"/api/predictions/{prediction_id}")

    def wait_for_predictions(self, task_id: int, count: int = 1, timeout_s: float = 60.0,
                             poll_s: float = 0.5) -> list[dict[str, Any]]:
        """Poll until a task has at least ``count`` predictions (pushed asynchronously); return them."""
        deadline = time.monotonic() + timeout_s
        while True:
            predictions = self.list_predictions(task_id=task_id)
            if len(predictions) >= count:
                return predictions
            if time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} has {len(predictions)} predictions after {timeout_s} s, "
                                   f"expected {count}")
            time.sleep(poll_s)


def pristine_data_dir(venv: Path, version: str = LS_VERSION,
                      timeout_s: float = 300.0) -> tuple[Path, Credentials]:
    """A migrated Label Studio data dir with one user and no projects, built once per version and cached.

    Label Studio's first start spends ~80 s of a 2-core machine on database migrations; a copy of this
    directory starts in ~10 s. Returns the template's data dir (copy it, never use it in place) and the
    credentials of its user.
    """
    root = cache_root()
    # "-stock": made without --enable-legacy-api-token, so the organization has legacy tokens off.
    template = root / f"data-template-{version}-stock"
    recorded = template / "credentials.json"
    if not recorded.is_file():
        root.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f"{template.name}-build-", dir=root))
        credentials = Credentials.generate()
        server = LabelStudioServer(venv=venv, data_dir=build / "data", log_path=build / "labelstudio.log",
                                   credentials=credentials)
        server.start(timeout_s, with_token=False)  # each copy's user creates its own token
        server.stop()  # a clean stop leaves a consistent SQLite file to copy
        (build / "credentials.json").write_text(json.dumps(dataclasses.asdict(credentials)), encoding="utf-8")
        try:
            build.rename(template)
        except OSError:
            # Another session finished its template first; theirs is as good as ours.
            shutil.rmtree(build, ignore_errors=True)
    return template / "data", Credentials(**json.loads(recorded.read_text(encoding="utf-8")))


def fresh_data_dir(venv: Path, dest: Path, version: str = LS_VERSION) -> Credentials:
    """Fill ``dest`` (which must not exist) with a copy of the pristine data dir; return its user."""
    source, credentials = pristine_data_dir(venv, version)
    shutil.copytree(source, dest)
    return credentials


@contextlib.contextmanager
def running_labelstudio(venv: Path, workdir: Path, **server_fields: Any) -> Iterator[LabelStudioServer]:
    """Start a Label Studio on a fresh copy of the pristine data under ``workdir``; stop it on exit."""
    data_dir = workdir / "data"
    credentials = fresh_data_dir(venv, data_dir)
    server = LabelStudioServer(venv=venv, data_dir=data_dir, log_path=workdir / "labelstudio.log",
                               credentials=credentials, **server_fields)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def region_result(label_config: str, region_id: str, box_percent: tuple[float, float, float, float],
                  original_size: tuple[int, int], caption: str = "a region",
                  pick: int = 0) -> list[dict[str, Any]]:
    """One region in Label Studio's per-region format for any shipped config.

    The rectangle (with label number ``pick`` when it has labels), the caption of every per-region
    TextArea and choice number ``pick`` of every per-region Choices, all sharing ``region_id`` and the
    geometry ``box_percent`` = (x, y, width, height) in percent of ``original_size`` = (width, height).
    """
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(label_config)
    x, y, width, height = box_percent
    geometry = {"x": x, "y": y, "width": width, "height": height, "rotation": 0}
    items: list[dict[str, Any]] = []
    for control in interface.controls:
        common = {"id": region_id, "from_name": control.name, "to_name": control.to_name[0],
                  "type": control.tag.lower(), "original_width": original_size[0],
                  "original_height": original_size[1], "image_rotation": 0}
        if control.tag == "RectangleLabels":
            items.insert(0, {**common, "value": {**geometry, "rectanglelabels": [control.labels[pick]]}})
        elif control.tag == "Rectangle":
            items.insert(0, {**common, "value": dict(geometry)})
        elif control.attr.get("perRegion") != "true":
            continue
        elif control.tag == "TextArea":
            items.append({**common, "value": {**geometry, "text": [caption]}})
        elif control.tag == "Choices":
            items.append({**common, "value": {**geometry, "choices": [control.labels[pick]]}})
    if not items or items[0]["type"] not in {"rectangle", "rectanglelabels"}:
        raise ValueError("the label config has no Rectangle or RectangleLabels control")
    return items
