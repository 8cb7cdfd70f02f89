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
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backend.settings import Settings

SECRET_HEADER = "X-Webhook-Secret"
SECRET_FILE = "webhook-secret"


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
