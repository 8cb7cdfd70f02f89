"""Label Studio's REST API, as the backend calls it: one client and one way to authenticate for every caller.

`LABEL_STUDIO_API_KEY` may hold either kind of token Label Studio 1.23 hands out:

- a **legacy token** (opaque; only where an administrator enabled legacy tokens for the organization),
  sent as `Authorization: Token <token>`;
- a **personal access token** (a JWT refresh token, the default of new organizations), exchanged at
  `/api/token/refresh/` for an access token (Label Studio gives those five minutes), sent as
  `Authorization: Bearer <access token>`. The access token is kept until `REFRESH_MARGIN_S` before it
  expires; a 401 (the server expired or revoked it sooner) refreshes it once and the request is sent
  again.

`LabelStudioCredentials` does this for any caller: `LabelStudioClient` (projects, tasks, predictions,
annotations, webhooks, ML backends) and the image fetcher (`backend.images`), which needs the header for
downloads of uploaded files and retries a refused download the same way (`retry_header`). Both take their
credentials from `credentials_for`, so a process holds one access token per Label Studio and token, however
many clients and loaders it makes. label-studio-sdk exchanges personal access tokens for its own calls, but
it refreshes only after expiry, never on a 401, and cannot sign the raw file downloads, so the backend keeps
this one implementation rather than two.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from backend.settings import Settings

REFRESH_PATH = "/api/token/refresh/"
# Refresh this long before the access token expires, so that a request never leaves with a stale one.
REFRESH_MARGIN_S = 30.0
PAGE_SIZE = 100


class TokenKind(enum.StrEnum):
    """What LABEL_STUDIO_API_KEY holds."""

    LEGACY = "legacy"
    PERSONAL = "personal access token"
    ACCESS = "access token"


class LabelStudioError(RuntimeError):
    """Label Studio refused a call or could not be reached; the message says what to check."""

    def __init__(self, message: str, status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.status = status
        # What Label Studio itself said (its `detail`), for callers that explain particular refusals.
        self.detail = detail


def token_kind(token: str) -> TokenKind:
    """Legacy tokens are opaque; personal access tokens and access tokens are JWTs (`token_type` says which)."""
    claims = _jwt_claims(token)
    if claims is None:
        return TokenKind.LEGACY
    return TokenKind.PERSONAL if claims.get("token_type") == "refresh" else TokenKind.ACCESS


def _jwt_claims(token: str) -> dict[str, Any] | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioCredentials:
    """The `Authorization` header for Label Studio, for one token of either kind (thread-safe)."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.kind = token_kind(token)
        self._timeout = timeout
        self._access: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()

    def header(self) -> str:
        """The header value to send now (refreshing the access token when it is about to expire)."""
        if self.kind is TokenKind.LEGACY:
            return f"Token {self.token}"
        if self.kind is TokenKind.ACCESS:
            return f"Bearer {self.token}"
        with self._lock:
            if self._access is None or time.time() > self._expires_at - REFRESH_MARGIN_S:
                self._refresh()
            return f"Bearer {self._access}"

    def refused(self, sent: str) -> bool:
        """A request sent with `sent` got a 401: forget that access token; True when a retry may succeed."""
        if self.kind is not TokenKind.PERSONAL:
            return False
        with self._lock:
            if self._access is not None and sent == f"Bearer {self._access}":
                self._access = None
        return True

    def retry_header(self, sent: str) -> str | None:
        """After a 401 to a request sent with `sent`: the header to send it once more with (a fresh access
        token), or None when another try cannot help (a legacy or plain access token)."""
        return self.header() if self.refused(sent) else None

    def _refresh(self) -> None:
        url = self.base_url + REFRESH_PATH
        try:
            answer = httpx.post(url, json={"refresh": self.token}, timeout=self._timeout, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise LabelStudioError(f"cannot reach Label Studio at {self.base_url} to exchange the personal access "
                                   f"token ({type(exc).__name__}: {exc}); check LABEL_STUDIO_URL") from None
        if answer.status_code != 200:
            raise LabelStudioError(
                f"Label Studio refused the personal access token in LABEL_STUDIO_API_KEY (HTTP {answer.status_code} "
                f"from {REFRESH_PATH}): it was revoked or has expired; create a new one under Account & Settings "
                "→ Personal Access Token", status=answer.status_code)
        access = _access_token(answer)
        claims = _jwt_claims(access) or {}
        self._access = access
        # Without an expiry claim, keep it a minute and let a 401 tell when it ends.
        self._expires_at = float(claims.get("exp") or time.time() + 60 + REFRESH_MARGIN_S)


_shared: dict[tuple[str, str, float], LabelStudioCredentials] = {}
_shared_lock = threading.Lock()


def credentials_for(settings: Settings) -> LabelStudioCredentials | None:
    """The process's credentials for LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (None without them): one
    object per Label Studio and token, so that the API client and the image fetcher share one access token,
    exchanged once and refreshed once when Label Studio expires it."""
    if not (settings.label_studio_url and settings.label_studio_api_key):
        return None
    key = (settings.label_studio_url.rstrip("/"), settings.label_studio_api_key, settings.label_studio_timeout)
    with _shared_lock:
        credentials = _shared.get(key)
        if credentials is None:
            credentials = _shared[key] = LabelStudioCredentials(*key)
        return credentials


def _access_token(answer: httpx.Response) -> str:
    try:
        access = answer.json()["access"]
    except (ValueError, KeyError, TypeError):
        access = None
    if not isinstance(access, str) or not access:
        raise LabelStudioError(f"{REFRESH_PATH} answered without an access token: {answer.text[:200]}")
    return access


class LabelStudioAuth(httpx.Auth):
    """`LabelStudioCredentials` as an httpx auth flow: one retry with a fresh token on a 401."""

    def __init__(self, credentials: LabelStudioCredentials):
        self.credentials = credentials

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        sent = self.credentials.header()
        request.headers["Authorization"] = sent
        response = yield request
        retry = self.credentials.retry_header(sent) if response.status_code == 401 else None
        if retry is not None:
            request.headers["Authorization"] = retry
            yield request


def same_origin(url: str, base_url: str) -> bool:
    """Whether `url` is on Label Studio's own scheme, host and port."""
    a, b = urlsplit(url), urlsplit(base_url)
    return (a.scheme.lower(), a.hostname, _port(a)) == (b.scheme.lower(), b.hostname, _port(b))


def upload_project(reference: Any, base_url: str) -> str | None:
    """The project whose upload `reference` names (Label Studio keeps a project's uploads under
    `/data/upload/<project id>/`, also as `upload/…` or a URL on its own origin), or None for any other
    reference."""
    if not isinstance(reference, str):
        return None
    reference = reference.strip()
    if reference.startswith(("upload/", "/upload/")):
        reference = "/data/" + reference.lstrip("/")
    elif not reference.startswith("/"):
        if not base_url or not same_origin(reference, base_url):
            return None
        reference = urlsplit(reference).path
    path = unquote(reference.split("?", 1)[0].split("#", 1)[0])
    if not path.startswith("/data/upload/"):
        return None
    return path.removeprefix("/data/upload/").split("/", 1)[0]


def _port(parts: Any) -> int:
    try:
        return parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return -1


class LabelStudioClient:
    """The Label Studio REST calls the backend makes (see the module docstring for authentication)."""

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None):
        credentials = credentials_for(settings)
        if credentials is None:
            raise LabelStudioError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a personal access token, or a "
                                   "legacy token) to let the backend call Label Studio")
        self.base_url = credentials.base_url
        self.credentials = credentials
        self._http = httpx.Client(base_url=self.base_url, auth=LabelStudioAuth(self.credentials), transport=transport,
                                  timeout=settings.label_studio_timeout, follow_redirects=False)

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json_body: Any = None,
                missing_ok: bool = False) -> Any:
        """Call the API; the decoded JSON answer (None for an empty one, or for a 404 with `missing_ok`)."""
        try:
            answer = self._http.request(method, path, params=params, json=json_body)
        except httpx.HTTPError as exc:
            raise LabelStudioError(f"cannot reach Label Studio at {self.base_url} ({type(exc).__name__}: {exc}); "
                                   "check LABEL_STUDIO_URL") from None
        if answer.status_code == 404 and missing_ok:
            return None
        if answer.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio refused {method} {path} (HTTP {answer.status_code}: {_detail(answer)}); check "
                f"LABEL_STUDIO_API_KEY ({self.credentials.kind}) and that its user may see the project",
                status=answer.status_code, detail=_said(answer))
        if answer.status_code >= 400:
            raise LabelStudioError(f"Label Studio answered {method} {path} with HTTP {answer.status_code}: "
                                   f"{_detail(answer)}", status=answer.status_code, detail=_said(answer))
        if not answer.content:
            return None
        try:
            return answer.json()
        except ValueError:
            raise LabelStudioError(f"Label Studio answered {method} {path} with something other than JSON") from None

    # ------------------------------------------------------------------ projects and tasks
    def project(self, project_id: int) -> dict[str, Any]:
        """`GET /api/projects/{id}`: title, label_config, model_version, …"""
        return self.request("GET", f"/api/projects/{project_id}/")

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        """`PATCH /api/projects/{id}`."""
        return self.request("PATCH", f"/api/projects/{project_id}/", json_body=fields)

    def tasks(self, project_id: int) -> Iterator[dict[str, Any]]:
        """Every task of a project with its annotations and predictions, page by page."""
        page = 1
        seen = 0
        while True:
            answer = self.request("GET", "/api/tasks/", params={"project": project_id, "page": page,
                                                               "page_size": PAGE_SIZE, "fields": "all"},
                                  missing_ok=True)
            batch = (answer or {}).get("tasks", []) if isinstance(answer, dict) else (answer or [])
            yield from batch
            seen += len(batch)
            total = answer.get("total") if isinstance(answer, dict) else None
            if not batch or (total is not None and seen >= total):
                return
            page += 1

    # ------------------------------------------------------------------ predictions and annotations
    def create_prediction(self, task_id: int, result: list[dict[str, Any]], score: float,
                          model_version: str) -> dict[str, Any]:
        """`POST /api/predictions/`: store a prediction on a task."""
        return self.request("POST", "/api/predictions/", json_body={
            "task": task_id, "result": result, "score": score, "model_version": model_version})

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> None:
        """`POST /api/projects/{id}/import/predictions`: store predictions on several tasks of one project in one
        request, each `{"task", "result", "score", "model_version"}`. Label Studio stores all or none: a task
        that is not in the project refuses the whole request (HTTP 400)."""
        self.request("POST", f"/api/projects/{project_id}/import/predictions", json_body=list(predictions))

    def annotation(self, annotation_id: int) -> dict[str, Any] | None:
        """`GET /api/annotations/{id}`; None when Label Studio has no such annotation (or no longer)."""
        return self.request("GET", f"/api/annotations/{annotation_id}/", missing_ok=True)

    # ------------------------------------------------------------------ connection
    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        """The ML backends connected to a project."""
        return self.request("GET", "/api/ml/", params={"project": project_id}) or []

    def create_ml_backend(self, **fields: Any) -> dict[str, Any]:
        """`POST /api/ml` (Label Studio calls the backend's /health and /setup before it answers)."""
        return self.request("POST", "/api/ml/", json_body=fields)

    def update_ml_backend(self, backend_id: int, **fields: Any) -> dict[str, Any]:
        """`PATCH /api/ml/{id}`."""
        return self.request("PATCH", f"/api/ml/{backend_id}", json_body=fields)

    def webhooks(self, project_id: int | None = None) -> list[dict[str, Any]]:
        """Webhooks of a project (all the token's user may see without one)."""
        params = {"project": project_id} if project_id is not None else None
        return self.request("GET", "/api/webhooks/", params=params) or []

    def create_webhook(self, **fields: Any) -> dict[str, Any]:
        """`POST /api/webhooks`."""
        return self.request("POST", "/api/webhooks/", json_body=fields)

    def update_webhook(self, webhook_id: int, **fields: Any) -> dict[str, Any]:
        """`PATCH /api/webhooks/{id}`."""
        return self.request("PATCH", f"/api/webhooks/{webhook_id}/", json_body=fields)


def _detail(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.text[:300]
    if isinstance(body, dict):
        for key in ("detail", "validation_errors", "errors"):
            if key in body:
                return json.dumps(body[key])[:300]
    return json.dumps(body)[:300]


def _said(answer: httpx.Response) -> str:
    """Label Studio's own words for a refusal: its `detail` as it wrote it, else what `_detail` shows."""
    try:
        detail = answer.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return detail if isinstance(detail, str) else _detail(answer)
