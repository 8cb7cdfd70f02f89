"""Label Studio webhook events: what a body must look like, and who may send one.

Label Studio sends webhooks without any Authorization header, even to a backend registered with Basic auth,
so `/webhook` is exempt from Basic auth; with WEBHOOK_SECRET set it requires the header
`X-Webhook-Secret: <secret>` instead (add it to the project's webhook in Label Studio:
`PATCH /api/webhooks/<id> {"headers": {"X-Webhook-Secret": "<secret>"}}`). What an accepted event means is
`GPT4RoIBackend.fit`'s business.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from backend.settings import Settings

SECRET_HEADER = "X-Webhook-Secret"


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
