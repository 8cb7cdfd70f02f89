"""What the tests share: paths, captured Label Studio traffic, waiting, and (in the submodules) processes,
images, a stand-in Label Studio, a Redis server, tiny checkpoints and the human-in-the-loop simulation."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
CAPTURES = FIXTURES / "labelstudio_captures"
CONFIG_DIR = REPO / "labelstudio_config"
# The webhook secret of the backends the tests start (sent by their clients, as Label Studio would).
WEBHOOK_SECRET = "test-webhook-secret"


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
    """One Label Studio capture file (`NN_…json`) in tests/fixtures/labelstudio_captures."""
    matches = sorted(CAPTURES.glob(f"{prefix}_*.json"))
    if not matches:
        raise FileNotFoundError(f"no capture {prefix}_*.json in {CAPTURES}")
    return json.loads(matches[0].read_text(encoding="utf-8"))


def config_xml(name: str) -> str:
    """A labeling config shipped in labelstudio_config/."""
    return (CONFIG_DIR / name).read_text(encoding="utf-8")
