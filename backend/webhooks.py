"""Label Studio webhook events: checked, then recorded durably before `/webhook` answers.

`store_event` is the single hand-off point: it gives the event to `backend.corrections.record_event`
(the corrections store, which turns annotations into training samples and starts fine-tunes) when that
module exists, and otherwise appends it to `DATA_DIR/webhook-events.jsonl` (one JSON object per line,
flushed and fsynced, safe across threads and processes).

Label Studio sends webhooks without any Authorization header, even to a backend registered with Basic auth,
so `/webhook` is exempt from Basic auth; with WEBHOOK_SECRET set it requires the header
`X-Webhook-Secret: <secret>` instead (add it to the project's webhook in Label Studio:
`PATCH /api/webhooks/<id> {"headers": {"X-Webhook-Secret": "<secret>"}}`).
"""

from __future__ import annotations

import fcntl
import hmac
import importlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backend.settings import Settings

SECRET_HEADER = "X-Webhook-Secret"
EVENT_LOG = "webhook-events.jsonl"
# The events the backend acts on; any other action is recorded and otherwise ignored.
KNOWN_ACTIONS = frozenset({
    "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "ANNOTATIONS_CREATED",
    "START_TRAINING", "PROJECT_UPDATED", "TASKS_CREATED", "TASKS_DELETED",
})

_append_lock = threading.Lock()


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


def secret_matches(settings: Settings, supplied: str | None) -> bool:
    """Whether the request may post events (always, when no WEBHOOK_SECRET is configured)."""
    if not settings.webhook_secret:
        return True
    return supplied is not None and hmac.compare_digest(supplied.encode(), settings.webhook_secret.encode())


def store_event(settings: Settings, event: Mapping[str, Any]) -> str:
    """Record one event durably; returns where it went: `"corrections"` or `"event-log"`."""
    record_event = _corrections_hook()
    if record_event is not None:
        record_event(settings, dict(event))
        return "corrections"
    append_event(event_log_path(settings), event)
    return "event-log"


def event_log_path(settings: Settings) -> Path:
    """Where events go while no corrections store is installed."""
    return Path(settings.data_dir) / EVENT_LOG


def append_event(path: Path, event: Mapping[str, Any]) -> Path:
    """Append one event as a JSON line and force it to disk."""
    line = json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _append_lock, open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return path


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event of an event log, oldest first."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _corrections_hook() -> Any:
    try:
        module = importlib.import_module("backend.corrections")
    except ModuleNotFoundError as exc:
        if exc.name != "backend.corrections":
            raise
        return None
    return getattr(module, "record_event", None)
