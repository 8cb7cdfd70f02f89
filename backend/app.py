"""HTTP layer of the ML backend: the routes Label Studio 1.23 calls, plus `/metrics`.

| route | answer |
|---|---|
| `GET /health` | `{"status": "UP", "model_class": "GPT4RoIBackend"}`, constant |
| `POST /setup` | `{"model_version": "<current>"}` from the registry pointer |
| `POST /predict` | `{"results": [...]}`, one item per task (see `backend.labelstudio_backend`) |
| `POST /webhook` | `{"status": "ok", "action", "samples", …}` once stored; no Basic auth, optional secret header |
| `GET /versions` | `{"versions": [...], "current_version": "…", "engines": {version: engine}}` |
| `GET /metrics` | Prometheus text |
| `POST /train` | legacy training trigger, recorded like a START_TRAINING webhook |

Errors are JSON `{"status": <code>, "detail": "<message>"}`: 400/422 for requests the backend cannot use,
401 for missing credentials, 413 for bodies, task lists or regions past their limits (MAX_REQUEST_BYTES,
MAX_TASKS_PER_REQUEST, MAX_REGIONS_PER_TASK), 429 when the queues hold MAX_QUEUED_JOBS, 503 when Redis (or
the model registry) is unavailable, 504 when an interactive prediction misses INTERACTIVE_TIMEOUT, 500 when
a worker failed on the job, and for anything else. A 500 says what failed and names an incident id
(`backend.jobs.log_incident`); the details go to the log under that id, never to the caller. Blocking work
(waiting on jobs, storing events) runs on bounded thread pools, so `/health` and `/setup` answer while
predictions wait.

This module never imports torch: the model lives in the workers.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend import registry
from backend.annotations import AnnotationError
from backend.connect import install_webhook_secret
from backend.jobs import JobQueue, QueueFull, QueueUnavailable, connect, log_incident
from backend.labelconfig import ConfigError
from backend.labelstudio_backend import GPT4RoIBackend, PredictionFailed, PredictionTimeout, RequestError
from backend.metrics import Metrics
from backend.settings import Settings
from backend.store import Database, StoreUnavailable
from backend.webhooks import SECRET_HEADER, WebhookError, WebhookGate, parse_event

log = logging.getLogger(__name__)

OPEN_ROUTES = frozenset({"/webhook"})


def create_app(settings: Settings | None = None, redis_url: str | None = None) -> FastAPI:
    """The ASGI app (`uvicorn --factory backend.app:create_app`); settings default to the environment."""
    settings = settings or Settings.from_env()
    url = redis_url or settings.effective_redis_url
    queue = JobQueue(settings, connect(url, settings), url)
    metrics = Metrics(queue, version=lambda: registry.current_version(settings), settings=settings)
    backend = GPT4RoIBackend(settings, queue, observer=metrics)
    _open_store(settings)
    gate = WebhookGate(settings)
    installer = None
    if not settings.allow_unsigned_webhooks and settings.label_studio_url and settings.label_studio_api_key:
        installer = _SecretInstaller(settings)
        installer.start()
    predict_threads = anyio.CapacityLimiter(settings.threads)
    event_threads = anyio.CapacityLimiter(max(4, settings.threads // 2))

    app = FastAPI(title="GPT4RoI ML backend for Label Studio", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.settings = settings
    app.state.backend = backend
    app.state.metrics = metrics

    def auth_and_measure(inner: ASGIApp) -> ASGIApp:
        # Plain ASGI rather than @app.middleware("http"), whose per-request task and streams cost a third of
        # the API's CPU per webhook and showed in /webhook's p99 with 20 concurrent senders.
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            started = time.perf_counter()
            path = scope["path"]
            status = 500

            async def send_noting_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            request = Request(scope)
            declared = request.headers.get("content-length", "")
            if settings.basic_auth_enabled and path == "/health" and not _basic_auth_ok(request, settings):
                # Load balancers and the compose health check hold no credentials: alive, and nothing more.
                await JSONResponse({"status": "ok"})(scope, receive, send_noting_status)
            elif settings.basic_auth_enabled and path not in OPEN_ROUTES and not _basic_auth_ok(request, settings):
                denied = _error(401, "Basic auth required: send BASIC_AUTH_USER / BASIC_AUTH_PASS",
                                headers={"WWW-Authenticate": 'Basic realm="gpt4roi"'})
                await denied(scope, receive, send_noting_status)
            elif declared.isdigit() and int(declared) > settings.max_request_bytes:
                await _too_large(settings)(scope, receive, send_noting_status)
            elif scope["method"] == "POST" and not _declares_json(request.headers.get("content-type", "")):
                await _not_json()(scope, receive, send_noting_status)
            else:
                await inner(scope, _limited(receive, settings), send_noting_status)
            route = path if path in _ROUTES else "other"
            metrics.requests.labels(route, str(status)).inc()
            metrics.request_seconds.labels(route).observe(time.perf_counter() - started)

        return middleware

    app.add_middleware(auth_and_measure)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "UP", "model_class": type(backend).__name__}

    def answer_setup(raw: bytes) -> dict[str, str]:
        body = _json_object(raw)
        return backend.setup(_optional_str(body, "project"), _optional_str(body, "schema"),
                             body.get("extra_params"))

    # Every body is parsed on a thread: a body may be tens of megabytes of JSON, and the event loop must stay
    # free for /health and /setup.
    @app.post("/setup")
    async def setup(request: Request) -> dict[str, str]:
        return await anyio.to_thread.run_sync(answer_setup, await request.body(), limiter=event_threads)

    @app.get("/versions")
    async def versions() -> dict[str, Any]:
        return backend.versions()

    def answer_predict(raw: bytes) -> list[dict[str, Any]]:
        body = _parse_json(raw)
        if not isinstance(body, dict):
            raise RequestError(f"the body must be a JSON object, got {type(body).__name__}", status=400)
        if "tasks" not in body:
            raise RequestError("the body has no 'tasks' list", status=400)
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise RequestError("'params' must be an object", status=400)
        return backend.predict(body["tasks"], params.get("context"), label_config=_optional_str(body, "label_config"),
                               project=_optional_str(body, "project"))

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        # Abandoned when the server shuts down: the thread may wait on its jobs for INTERACTIVE_TIMEOUT, and
        # the jobs are the workers' to finish or retry.
        results = await anyio.to_thread.run_sync(answer_predict, await request.body(), limiter=predict_threads,
                                                 abandon_on_cancel=True)
        return JSONResponse({"results": results})

    @app.post("/webhook")
    async def webhook(request: Request) -> Response:
        if not gate.accepts(request.headers.get(SECRET_HEADER)):
            if installer is not None:
                installer.retry()  # Label Studio may have been down at start, or the webhook added since
            return _error(401, f"missing or wrong {SECRET_HEADER} header: webhooks need the backend's secret "
                               "(WEBHOOK_SECRET, or DATA_DIR/webhook-secret; `python -m backend connect` adds it "
                               "to Label Studio's webhook)")
        summary = await anyio.to_thread.run_sync(answer_webhook, await request.body(), limiter=event_threads)
        return JSONResponse({"status": "ok", **summary})

    def answer_webhook(raw: bytes) -> dict[str, Any]:
        event = parse_event(_parse_json(raw))
        refused = gate.refused_project(event)
        if refused is not None:
            raise RequestError(refused, status=403)
        return backend.fit(event["action"], event)

    def answer_train(raw: bytes) -> dict[str, Any]:
        body = _parse_json(raw) if raw.strip() else {}
        return backend.fit("START_TRAINING", body if isinstance(body, dict) else {"body": body})

    @app.post("/train")
    async def train(request: Request) -> dict[str, Any]:
        summary = await anyio.to_thread.run_sync(answer_train, await request.body(), limiter=event_threads)
        return {"status": "ok", **summary}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = await anyio.to_thread.run_sync(metrics.render, limiter=event_threads)
        return Response(body, media_type=content_type)

    _install_error_handlers(app)
    return app


_ROUTES = frozenset({"/health", "/setup", "/predict", "/webhook", "/versions", "/metrics", "/train"})


def _open_store(settings: Settings) -> None:
    # Now rather than on the first webhook: a burst arriving after a start would otherwise wait, all of it,
    # for the driver's import, the connection and the migration.
    try:
        Database.for_settings(settings)
    except StoreUnavailable as exc:
        log.warning("%s; /webhook answers 503 until it does", exc)


_SECRET_INSTALL_INTERVAL_S = 60.0


class _SecretInstaller:
    """Adds the secret header to Label Studio's webhooks for this backend (`install_webhook_secret`), in the
    background: at start, and again when a webhook comes without it (Label Studio was not up yet, or a
    webhook was added since), then at most once a minute whoever sends them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._retried = float("-inf")

    def start(self) -> None:
        threading.Thread(target=self._install, daemon=True, name="webhook-secret").start()

    def retry(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._retried < _SECRET_INSTALL_INTERVAL_S:
                return
            self._retried = now
        self.start()

    def _install(self) -> None:
        try:
            for step in install_webhook_secret(self.settings):
                log.info("%s", step.describe())
        except Exception as exc:
            log.warning("could not add the webhook secret header in Label Studio (%s); run `python -m backend "
                        "connect --project ID`, or add the header %s by hand", exc, SECRET_HEADER)


def _declares_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _not_json() -> JSONResponse:
    # Browsers post text/plain and form bodies to any origin without a CORS preflight; requiring JSON's
    # media type means no web page can post to the API in its visitors' name.
    return _error(415, "the body must be JSON sent with Content-Type: application/json (Label Studio sends it)")


def _too_large(settings: Settings) -> JSONResponse:
    return _error(413, f"the request body is larger than MAX_REQUEST_BYTES={settings.max_request_bytes}")


def _limited(receive: Receive, settings: Settings) -> Receive:
    """`receive` that counts the body as it arrives and refuses it past MAX_REQUEST_BYTES (a chunked body
    declares no length)."""
    seen = 0

    async def counting() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > settings.max_request_bytes:
                raise RequestError(f"the request body is larger than MAX_REQUEST_BYTES={settings.max_request_bytes}",
                                   status=413)
        return message

    return counting


def _install_error_handlers(app: FastAPI) -> None:
    def handler(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
        async def respond(request: Request, exc: Exception) -> JSONResponse:
            return _error(getattr(exc, "status", status), str(exc))
        return respond

    app.add_exception_handler(RequestError, handler(422))
    app.add_exception_handler(WebhookError, handler(400))
    app.add_exception_handler(AnnotationError, handler(422))
    app.add_exception_handler(ConfigError, handler(422))
    app.add_exception_handler(QueueUnavailable, handler(503))
    app.add_exception_handler(StoreUnavailable, handler(503))
    app.add_exception_handler(QueueFull, handler(429))
    app.add_exception_handler(registry.RegistryError, handler(503))
    app.add_exception_handler(PredictionTimeout, handler(504))
    # Its message is made of the jobs' own: what failed in plain words and, for a worker's error, the incident
    # id under which `backend.jobs` logged the details.
    app.add_exception_handler(PredictionFailed, handler(500))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return _error(exc.status_code, str(exc.detail))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The details (and the traceback) go to the log, under an id the answer names; never to the caller.
        incident = log_incident(log, f"unhandled error on {request.method} {request.url.path}", exc_info=exc)
        return _error(500, f"internal error {incident} while answering {request.url.path}; the backend's log "
                           "has the details")

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": status, "detail": detail}, status_code=status, headers=headers)


def _json_object(raw: bytes) -> dict[str, Any]:
    body = _parse_json(raw)
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}", status=400)
    return body


# Label Studio's requests are a few levels deep (tasks → task → annotations → result → value → labels) plus
# whatever a task's data holds; anything near the interpreter's recursion limit would overflow whatever
# walks it next (a copy, the job's JSON, the store's), so it is refused before.
MAX_JSON_DEPTH = 64


def _parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise RequestError("empty body: expected JSON", status=400)
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        value = None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"the body is not valid JSON: {exc}", status=400) from None
    else:
        # Each level needs an opening bracket: a body with fewer has nothing to walk.
        if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH or _depth_within(value, MAX_JSON_DEPTH):
            return value
    raise RequestError(f"the body is nested deeper than {MAX_JSON_DEPTH} levels of objects and lists", status=400)


def _depth_within(value: Any, limit: int) -> bool:
    """Whether `value` holds no more than `limit` levels of containers (walked without recursion)."""
    level: list[Any] = [value]
    for _ in range(limit):
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list))]
        if not level:
            return True
    return False


def _reject_constant(name: str) -> Any:
    # Python's parser accepts NaN and Infinity, which are not JSON and could not be echoed back.
    raise ValueError(f"{name} is not a JSON value")


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise RequestError(f"'{key}' must be a string", status=400)
    return str(value)


def _basic_auth_ok(request: Request, settings: Settings) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user.encode(), settings.basic_auth_user.encode()) and hmac.compare_digest(
        password.encode(), settings.basic_auth_pass.encode())
