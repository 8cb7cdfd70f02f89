"""Connecting this backend to Label Studio projects, and keeping them connected.

`python -m backend connect --project ID` makes sure that, in project ID of the Label Studio at
LABEL_STUDIO_URL (called with LABEL_STUDIO_API_KEY):

1. this backend is the project's ML backend at BACKEND_URL (the URL Label Studio reaches it at), titled
   `gpt4roi`, with interactive pre-annotation on, and Basic auth when BASIC_AUTH_USER/BASIC_AUTH_PASS are set;
2. Label Studio's webhook to `BACKEND_URL/webhook` exists and carries the webhook secret header
   (`backend.webhooks`), so corrections arrive and are accepted;
3. the project's prelabeling version (Settings → Annotation) is this backend, the live model: Label Studio
   then shows, and asks the backend for, predictions of the version the backend serves now (the one its
   `/setup` answers), not those of an older version or of imported predictions.

Each step says what it found and what it did; a second run finds everything in place and changes nothing.
`--check` only reports. (Label Studio 1.23 accepts as a prelabeling version only a connected backend's title
or a version it already holds predictions of; the live model is the one that follows promotions.) The
project is remembered as connected, and when a fine-tune promotes a version or a rollback restores one,
`follow_version` has Label Studio read the backend's new version at once (and puts the live model back as
the prelabeling version where someone changed it). Predictions of older versions stay as they are: Label
Studio keeps every prediction it stores and asks the backend only for tasks without one of the version the
backend serves, so after a promotion the next Retrieve Predictions or label stream asks the new version,
and the old predictions remain as history.

`install_webhook_secret`, run when the API starts with Label Studio credentials, is step 2 for every
webhook of this backend in a connected project (never for organization-wide webhooks, nor those of other
projects: anyone who may add a webhook could read the secret back from Label Studio's API).
`rotate_secret` (`python -m backend rotate-secret`) replaces the secret everywhere (`backend.webhooks`).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Any

from backend import registry
from backend.labelstudio import LabelStudioClient, LabelStudioError
from backend.settings import Settings
from backend.store import Database
from backend.webhooks import SECRET_HEADER, SECRET_REFRESH_S, current_secret, replace_secret

log = logging.getLogger(__name__)

TITLE = "gpt4roi"


class StepStatus(enum.StrEnum):
    """How one step of `connect` ended."""

    OK = "ok"  # already as it should be
    DONE = "done"  # changed now
    MISSING = "missing"  # not as it should be (with --check, or after a failure), see the detail
    FAILED = "failed"


@dataclass(frozen=True)
class Step:
    """One thing `connect` looked at."""

    what: str
    status: StepStatus
    detail: str = ""

    def describe(self) -> str:
        """One line for the terminal."""
        return f"[{self.status}] {self.what}" + (f": {self.detail}" if self.detail else "")


def connect_project(settings: Settings, project_id: int, *, check: bool = False,
                    client: LabelStudioClient | None = None) -> list[Step]:
    """Register, hook up and version project `project_id` (see the module docstring); what was found and done."""
    owned = client is None
    client = client or LabelStudioClient(settings)
    try:
        try:
            project = client.project(project_id)
        except LabelStudioError as exc:
            return [Step(f"project {project_id}", StepStatus.FAILED, str(exc))]
        steps = [Step(f"project {project_id}", StepStatus.OK, f"{project.get('title')!r} at {client.base_url}")]
        steps.append(_ml_backend(settings, client, project_id, check))
        steps.append(_webhook(settings, client, project_id, check))
        # Read again: registering a backend can itself set the project's prelabeling version.
        project = client.project(project_id) if not check else project
        steps.append(_prelabeling_version(client, project_id, project, registry.current_version(settings), check))
        if not check and all(s.status is not StepStatus.FAILED for s in steps):
            _remember(settings, project_id, client.base_url)
        return steps
    finally:
        if owned:
            client.close()


def _ml_backend(settings: Settings, client: LabelStudioClient, project_id: int, check: bool) -> Step:
    url = settings.effective_backend_url
    what = f"ML backend {url}"
    wanted: dict[str, Any] = {"url": url, "project": project_id, "title": TITLE, "is_interactive": True}
    if settings.basic_auth_enabled:
        wanted.update(auth_method="BASIC_AUTH", basic_auth_user=settings.basic_auth_user,
                      basic_auth_pass=settings.basic_auth_pass)
    else:
        wanted["auth_method"] = "NONE"
    try:
        ours = [b for b in client.ml_backends(project_id) if str(b.get("url", "")).rstrip("/") == url]
        if ours:
            found = ours[0]
            stale = [k for k in ("title", "is_interactive", "auth_method") if found.get(k) != wanted[k]]
            if settings.basic_auth_enabled and found.get("basic_auth_user") != settings.basic_auth_user:
                stale.append("basic_auth_user")
            if not stale:
                return Step(what, StepStatus.OK, f"connected (id {found['id']}, state {found.get('state')})")
            if check:
                return Step(what, StepStatus.MISSING, f"connected, but {', '.join(stale)} differ")
            # Label Studio 1.23 needs url and project in every update, or it answers 500.
            client.update_ml_backend(int(found["id"]), **wanted)
            return Step(what, StepStatus.DONE, f"updated {', '.join(stale)} (id {found['id']})")
        if check:
            return Step(what, StepStatus.MISSING, "not connected to the project")
        created = client.create_ml_backend(**wanted)
        return Step(what, StepStatus.DONE, f"connected (id {created.get('id')}; Label Studio reached /health and "
                                           "/setup)")
    except LabelStudioError as exc:
        return Step(what, StepStatus.FAILED, _with_fix(exc, url))


def _webhook(settings: Settings, client: LabelStudioClient, project_id: int, check: bool) -> Step:
    url = settings.effective_backend_url + "/webhook"
    what = f"webhook {url}"
    secret = current_secret(settings)
    headers = {SECRET_HEADER: secret} if secret else {}
    try:
        hooks = [h for h in client.webhooks(project_id) if str(h.get("url", "")).rstrip("/") == url]
        if hooks:
            hook = hooks[0]
            if not headers or (hook.get("headers") or {}).get(SECRET_HEADER) == secret:
                return Step(what, StepStatus.OK, f"in place (id {hook['id']})" + (", with the secret header"
                                                                                   if headers else ""))
            if check:
                return Step(what, StepStatus.MISSING, f"exists (id {hook['id']}) without the {SECRET_HEADER} header: "
                                                      "Label Studio's events would be refused")
            client.update_webhook(int(hook["id"]), url=url, headers={**(hook.get("headers") or {}), **headers})
            return Step(what, StepStatus.DONE, f"added the {SECRET_HEADER} header (id {hook['id']})")
        if check:
            return Step(what, StepStatus.MISSING, "no webhook: corrections would never arrive")
        created = client.create_webhook(project=project_id, url=url, send_payload=True, send_for_all_actions=True,
                                        headers=headers)
        return Step(what, StepStatus.DONE, f"created (id {created.get('id')})")
    except LabelStudioError as exc:
        return Step(what, StepStatus.FAILED, _with_fix(exc, url))


def _prelabeling_version(client: LabelStudioClient, project_id: int, project: dict[str, Any], version: str,
                         check: bool) -> Step:
    what = "prelabeling version (Settings → Annotation)"
    if project.get("model_version") == TITLE:
        return Step(what, StepStatus.OK, f"the live model {TITLE!r} (serving {version})")
    if check:
        return Step(what, StepStatus.MISSING, f"{project.get('model_version')!r}, not the live model {TITLE!r}: "
                                              "the label stream would show other predictions")
    try:
        client.update_project(project_id, model_version=TITLE)
    except LabelStudioError as exc:
        return Step(what, StepStatus.FAILED, str(exc))
    return Step(what, StepStatus.DONE, f"{project.get('model_version')!r} → the live model {TITLE!r} (serving "
                                       f"{version})")


def install_webhook_secret(settings: Settings, client: LabelStudioClient | None = None) -> list[Step]:
    """Add the secret header to every webhook of Label Studio's that points at this backend from a connected
    project (the API runs this at start when it has Label Studio credentials)."""
    secret = current_secret(settings)
    if secret is None:
        return []
    url = settings.effective_backend_url + "/webhook"
    owned = client is None
    client = client or LabelStudioClient(settings)
    steps = []
    try:
        connected = {str(project) for project, base_url in connected_projects(settings) if base_url == client.base_url}
        for hook in client.webhooks():
            if str(hook.get("url", "")).rstrip("/") != url:
                continue
            if str(hook.get("project")) not in connected:
                whose = "organization-wide" if hook.get("project") is None else f"of project {hook.get('project')}"
                steps.append(Step(f"webhook {hook['id']}", StepStatus.MISSING,
                                  f"{whose}, not a connected project's: left without the secret (`python -m backend "
                                  "connect --project ID` connects a project)"))
                continue
            if (hook.get("headers") or {}).get(SECRET_HEADER) == secret:
                steps.append(Step(f"webhook {hook['id']}", StepStatus.OK, "has the secret header"))
                continue
            client.update_webhook(int(hook["id"]), url=url,
                                  headers={**(hook.get("headers") or {}), SECRET_HEADER: secret})
            steps.append(Step(f"webhook {hook['id']}", StepStatus.DONE, "added the secret header"))
    finally:
        if owned:
            client.close()
    return steps


def rotate_secret(settings: Settings, grace_s: float = 3600.0, client: LabelStudioClient | None = None,
                  settle_s: float = 2 * SECRET_REFRESH_S + 1) -> list[Step]:
    """Replace the webhook secret: every process sharing the database accepts the new one within
    `SECRET_REFRESH_S` (the old one for `grace_s` more seconds), and after `settle_s` Label Studio's webhooks
    of connected projects are given it, so that no delivery is refused on the way."""
    if settings.allow_unsigned_webhooks:
        return [Step("webhook secret", StepStatus.FAILED, "ALLOW_UNSIGNED_WEBHOOKS is set: there is no secret")]
    replace_secret(settings, grace_s)
    steps = [Step("webhook secret", StepStatus.DONE, f"a new secret for every process sharing the database; the "
                                                     f"previous one is accepted for {grace_s:g} s more")]
    time.sleep(settle_s)  # every process reads the new secret before Label Studio sends it
    if not (settings.label_studio_url and settings.label_studio_api_key):
        steps.append(Step("Label Studio's webhooks", StepStatus.MISSING, "no LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY: "
                                                                         f"set the {SECRET_HEADER} header by hand"))
        return steps
    try:
        steps += install_webhook_secret(settings, client)
    except LabelStudioError as exc:
        steps.append(Step("Label Studio's webhooks", StepStatus.FAILED, f"{exc}; run `python -m backend connect "
                                                                        "--project ID` before the grace window ends"))
    return steps


def follow_version(settings: Settings, version: str, client: LabelStudioClient | None = None) -> list[Step]:
    """After a promotion or rollback to `version`: every connected project reads it from the backend now
    (Label Studio asks `/setup` when the backend is looked up) and keeps the live model as its prelabeling
    version."""
    projects = connected_projects(settings)
    if not projects or not (settings.label_studio_url and settings.label_studio_api_key):
        return []
    owned = client is None
    client = client or LabelStudioClient(settings)
    url = settings.effective_backend_url
    steps = []
    try:
        for project_id, base_url in projects:
            if base_url != client.base_url:
                continue
            try:
                for backend in client.ml_backends(project_id):
                    if str(backend.get("url", "")).rstrip("/") == url:
                        client.request("GET", f"/api/ml/{backend['id']}")
                if client.project(project_id).get("model_version") != TITLE:
                    client.update_project(project_id, model_version=TITLE)
                steps.append(Step(f"project {project_id}", StepStatus.DONE, f"prelabels with {version}"))
            except LabelStudioError as exc:
                log.warning("project %s did not learn of version %s: %s", project_id, version, exc)
                steps.append(Step(f"project {project_id}", StepStatus.FAILED, str(exc)))
    finally:
        if owned:
            client.close()
    return steps


def connected_projects(settings: Settings) -> list[tuple[int, str]]:
    """(project id, Label Studio URL) of every project `connect` linked to this backend."""
    rows = Database.for_settings(settings).read().execute(
        "SELECT project_id, label_studio_url FROM connected_projects ORDER BY project_id").fetchall()
    return [(int(row["project_id"]), row["label_studio_url"]) for row in rows]


def _remember(settings: Settings, project_id: int, base_url: str) -> None:
    Database.for_settings(settings).write(lambda db: db.execute(
        "INSERT INTO connected_projects (project_id, label_studio_url, connected_at) VALUES (?, ?, ?) "
        "ON CONFLICT (project_id) DO UPDATE SET label_studio_url = excluded.label_studio_url, "
        "connected_at = excluded.connected_at", (project_id, base_url, time.time())))


def _with_fix(exc: LabelStudioError, url: str) -> str:
    """What Label Studio answered, with what to do about the refusals a first connect runs into."""
    message = str(exc)
    if "reserved network address" in message:
        # Label Studio's guard against loopback and private URLs answers 403: the token is fine, so say only
        # what to change.
        return (f"Label Studio refuses {url} ({exc.detail or message}): a stock Label Studio calls no ML backend "
                "or webhook on a loopback or private network. Start Label Studio with ML_BLOCK_LOCAL_IP=false and "
                "SSRF_PROTECTION_ENABLED=false (or set BACKEND_URL to a public address of this backend)")
    if "health check failed" in message or "Can't connect" in message:
        return (f"{message}. Start the backend first (`python -m backend serve`) and make sure Label Studio "
                f"reaches {url} (BACKEND_URL)")
    return message
