"""Label Studio webhook events: what a body must look like, and who may send one.

Label Studio sends webhooks without any Authorization header, even to a backend registered with Basic auth,
so `/webhook` is exempt from Basic auth and requires the header `X-Webhook-Secret: <secret>` instead. The
secret is WEBHOOK_SECRET, or, when that is unset, one generated on first start and kept in
`DATA_DIR/webhook-secret` (readable by its owner only). With Label Studio credentials the backend adds the
header to its webhook in Label Studio itself (`backend.connect`; the API at start, and again when an event
comes without it); otherwise add it by hand:
`PATCH /api/webhooks/<id>/ {"headers": {"X-Webhook-Secret": "<secret>"}}`. ALLOW_UNSIGNED_WEBHOOKS turns the
check off, for a backend nobody else can reach. What an accepted event means is `GPT4RoIBackend.fit`'s
business.

The secret goes only into the webhooks of projects `connect` linked to this backend, and once any project
is connected, events must name one of them (`WebhookGate`): an organization member who adds a webhook of
their own to the backend's URL learns no secret, and a leaked secret posts into no other project.

`python -m backend rotate-secret` replaces the secret for every process sharing the database: the new one
is kept in the `webhook_secrets` table (from then on it, not WEBHOOK_SECRET or the file, is the secret), every
process learns it within `SECRET_REFRESH_S`, and the one it replaces is still accepted for the grace window,
so that deliveries already under way when Label Studio's webhooks change are not refused.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backend.settings import Settings
from backend.store import Database

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Webhook-Secret"
SECRET_FILE = "webhook-secret"
# How often every process reads the accepted secrets and the connected projects again; a rotation waits
# for twice this before Label Studio sends the new secret.
SECRET_REFRESH_S = 2.0


class WebhookError(ValueError):
    """A webhook body that is not a Label Studio event."""


def parse_event(body: Any) -> dict[str, Any]:
    """Check the envelope (`{"action": "<EVENT>", …}`) and return the event."""
    if not isinstance(body, Mapping):
        raise WebhookError("a webhook body must be a JSON object with an 'action'")
    action = body.get("action")
    if not isinstance(action, str) or not action.strip():
        raise WebhookError("the webhook has no 'action' (expected e.g. ANNOTATION_CREATED)")
    return dict(body)


def webhook_secret(settings: Settings) -> str | None:
    """The secret `/webhook` requires (None with ALLOW_UNSIGNED_WEBHOOKS): WEBHOOK_SECRET, or the one kept
    in DATA_DIR, generated there by the first process that asks."""
    if settings.allow_unsigned_webhooks:
        return None
    if settings.webhook_secret:
        return settings.webhook_secret
    path = Path(settings.data_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{SECRET_FILE}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # A hard link appears whole or not at all: of two processes starting together, one secret wins.
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    secret = path.read_text(encoding="utf-8").strip()
    if not secret:
        raise OSError(f"{path} is empty: delete it to have a new webhook secret generated, or set WEBHOOK_SECRET")
    return secret


def secret_matches(expected: str | None, supplied: str | None) -> bool:
    """Whether a request carrying `supplied` may post events (always, when no secret is expected)."""
    if expected is None:
        return True
    return supplied is not None and hmac.compare_digest(supplied.encode(), expected.encode())


def current_secret(settings: Settings) -> str | None:
    """The secret to install in Label Studio: the last one `rotate-secret` made, else `webhook_secret`."""
    if settings.allow_unsigned_webhooks:
        return None
    row = Database.for_settings(settings).read().execute(
        "SELECT secret FROM webhook_secrets WHERE accepted_until IS NULL ORDER BY created_at DESC LIMIT 1").fetchone()
    return row[0] if row else webhook_secret(settings)


def accepted_secrets(settings: Settings, now: float | None = None) -> tuple[str, ...]:
    """Every secret `/webhook` accepts now, the current one first (empty with ALLOW_UNSIGNED_WEBHOOKS)."""
    if settings.allow_unsigned_webhooks:
        return ()
    now = time.time() if now is None else now
    rows = Database.for_settings(settings).read().execute(
        "SELECT secret FROM webhook_secrets WHERE accepted_until IS NULL OR accepted_until > ? "
        "ORDER BY accepted_until IS NOT NULL, created_at DESC", (now,)).fetchall()
    found = tuple(row[0] for row in rows)
    return found if found else (webhook_secret(settings) or "",)


def replace_secret(settings: Settings, grace_s: float) -> str:
    """Make a new secret current for every process sharing the database; the one it replaces is accepted
    for `grace_s` more seconds. Returns the new secret (Label Studio does not have it yet)."""
    previous = current_secret(settings)
    new = secrets.token_urlsafe(32)
    now = time.time()

    def store(db: Any) -> None:
        Database.for_settings(settings).serialize(db, "webhook-secret")
        db.execute("DELETE FROM webhook_secrets WHERE accepted_until IS NOT NULL AND accepted_until <= ?", (now,))
        db.execute("UPDATE webhook_secrets SET accepted_until = ? WHERE accepted_until IS NULL", (now + grace_s,))
        if previous:
            db.execute("INSERT INTO webhook_secrets (secret, created_at, accepted_until) VALUES (?, ?, ?) "
                       "ON CONFLICT (secret) DO UPDATE SET accepted_until = excluded.accepted_until",
                       (previous, now, now + grace_s))
        db.execute("INSERT INTO webhook_secrets (secret, created_at, accepted_until) VALUES (?, ?, NULL)",
                   (new, now + 1e-6))

    Database.for_settings(settings).write(store)
    return new


def connected_project_ids(settings: Settings) -> frozenset[str]:
    """The projects `connect` linked to this backend, as text."""
    rows = Database.for_settings(settings).read().execute("SELECT project_id FROM connected_projects").fetchall()
    return frozenset(str(row[0]) for row in rows)


def event_project(event: Mapping[str, Any]) -> str | None:
    """The project an event names (Label Studio sends the project object with every event)."""
    project = event.get("project")
    if isinstance(project, Mapping):
        project = project.get("id")
    if project is None or isinstance(project, (bool, Mapping, list)):
        return None
    return str(project)


class WebhookGate:
    """What `/webhook` lets in, as every process sharing the database sees it: the accepted secrets and the
    connected projects, read again every SECRET_REFRESH_S by a background thread (so the event loop never
    waits on the database)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.unsigned = settings.allow_unsigned_webhooks
        self._secrets: tuple[bytes, ...] = ()
        self._projects: frozenset[str] = frozenset()
        self.refresh()
        threading.Thread(target=_follow, args=(weakref.ref(self),), daemon=True, name="webhook-gate").start()

    def refresh(self) -> None:
        try:
            self._secrets = tuple(s.encode() for s in accepted_secrets(self.settings) if s)
            self._projects = connected_project_ids(self.settings)
        except Exception as exc:  # the database is away: keep what was read last
            log.warning("could not read the webhook secrets and connected projects: %s", exc)
            if not self._secrets and not self.unsigned:
                self._secrets = tuple(s.encode() for s in (webhook_secret(self.settings),) if s)

    def accepts(self, supplied: str | None) -> bool:
        """Whether a request carrying `supplied` may post events."""
        if self.unsigned:
            return True
        if supplied is None:
            return False
        given = supplied.encode()
        # Every candidate is compared, so the time taken says nothing of which one matched.
        return sum(hmac.compare_digest(given, secret) for secret in self._secrets) > 0

    def refused_project(self, event: Mapping[str, Any]) -> str | None:
        """Why an event is refused for the project it names (None when accepted): once a project is
        connected, only connected projects' events are."""
        projects = self._projects
        if not projects:
            return None
        named = event_project(event)
        if named in projects:
            return None
        if named is None:
            return "the event names no project, and this backend takes events of its connected projects only"
        return (f"project {named} is not connected to this backend (`python -m backend connect --project "
                f"{named}`), so its events are refused")


def _follow(gate: weakref.ref[WebhookGate]) -> None:
    """Refresh a gate every SECRET_REFRESH_S for as long as it is in use."""
    while True:
        time.sleep(SECRET_REFRESH_S)
        current = gate()
        if current is None:
            return
        current.refresh()
        del current
