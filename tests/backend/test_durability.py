"""Nothing acknowledged is lost: the API is SIGKILLed while 20 senders post webhooks; every webhook answered
2xx is in the corrections store afterwards, and the store opens cleanly for the next API process."""

from __future__ import annotations

import copy
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend.corrections import CorrectionsStore
from backend.store import DB_FILE, SQLiteDatabase
from backend.webhooks import SECRET_HEADER
from tests.support import WEBHOOK_SECRET, capture
from tests.support.processes import backend_env, start_api

pytestmark = pytest.mark.slow
SENDERS = 20


def annotation_webhook(annotation_id: int) -> dict[str, Any]:
    body = copy.deepcopy(capture("09")["request"]["json"])
    body["annotation"]["id"] = annotation_id
    body["annotation"]["task"] = body["task"]["id"] = annotation_id
    body["annotation"]["result"][1]["value"]["text"] = [f"caption of annotation {annotation_id}"]
    return body


class Sender(threading.Thread):
    """Posts webhooks with its own ids until the server stops answering."""

    def __init__(self, url: str, first_id: int):
        super().__init__(daemon=True)
        self.url = url
        self.next_id = first_id
        self.acknowledged: list[int] = []
        self.unanswered: list[int] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10, headers={SECRET_HEADER: WEBHOOK_SECRET}) as client:
            while True:
                annotation_id = self.next_id
                self.next_id += 1
                try:
                    response = client.post("/webhook", json=annotation_webhook(annotation_id))
                except httpx.HTTPError:
                    self.unanswered.append(annotation_id)
                    return
                if 200 <= response.status_code < 300:
                    self.acknowledged.append(annotation_id)
                else:
                    self.unanswered.append(annotation_id)


def test_every_acknowledged_webhook_survives_a_sigkill(base_env, tmp_path):
    env = backend_env(base_env, DATA_DIR=str(tmp_path / "data"), THREADS="32")
    api = start_api(env, tmp_path / "api.log")
    senders = [Sender(api.url, 1_000_000 * (i + 1)) for i in range(SENDERS)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 30
    while sum(len(s.acknowledged) for s in senders) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    api.process.popen.send_signal(signal.SIGKILL)
    api.process.popen.wait(timeout=10)
    for sender in senders:
        sender.join(timeout=30)
    api.client.close()

    acknowledged = {i for s in senders for i in s.acknowledged}
    assert len(acknowledged) >= 200, api.process.tail()
    assert all(s.unanswered for s in senders), "every sender should have seen the server go away"

    path = Path(env["DATA_DIR"]) / DB_FILE
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = CorrectionsStore(SQLiteDatabase(path))
    stored = store.annotation_ids()
    assert acknowledged <= stored, f"lost {sorted(acknowledged - stored)[:10]}"
    captions = {r.annotation_id: r.caption for r in store.regions()}
    assert all(captions[i] == f"caption of annotation {i}" for i in acknowledged)
    store.database.close()

    # The next API process opens the same store and goes on.
    again = start_api(env, tmp_path / "api-again.log")
    try:
        assert again.client.post("/webhook", json=annotation_webhook(42)).status_code == 200
    finally:
        again.stop()
    assert {42} | acknowledged <= CorrectionsStore(SQLiteDatabase(path)).annotation_ids()
