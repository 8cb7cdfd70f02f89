"""Webhook events are checked and recorded durably before `/webhook` answers."""

from __future__ import annotations

import copy
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from backend.settings import Settings
from backend.webhooks import (
    WebhookError,
    append_event,
    event_log_path,
    parse_event,
    read_events,
    secret_matches,
    store_event,
)
from tests.conftest import capture


def test_captured_events_parse():
    for prefix in ("08", "09", "10", "11", "12", "13", "14", "15"):
        body = capture(prefix)["request"]["json"]
        assert parse_event(body)["action"] == body["action"]


@pytest.mark.parametrize("body, message", [([], "JSON object"), ({"project": {}}, "no 'action'"),
                                           ({"action": "  "}, "no 'action'"), ({"action": 3}, "no 'action'")])
def test_envelopes_without_an_action_are_refused(body, message):
    with pytest.raises(WebhookError, match=message):
        parse_event(body)


def test_secret_check():
    assert secret_matches(Settings(), None)
    guarded = Settings(webhook_secret="s3cret")
    assert secret_matches(guarded, "s3cret")
    assert not secret_matches(guarded, None) and not secret_matches(guarded, "S3CRET")


def test_without_a_corrections_store_events_go_to_the_event_log(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "backend.corrections", None)
    settings = Settings(data_dir=tmp_path)
    event = capture("09")["request"]["json"]
    assert store_event(settings, event) == "event-log"
    assert read_events(event_log_path(settings)) == [event]


def test_with_the_corrections_store_events_go_there(tmp_path):
    pytest.importorskip("backend.corrections")
    settings = Settings(data_dir=tmp_path, model_dir=tmp_path / "models")
    assert store_event(settings, capture("14")["request"]["json"]) == "corrections"
    assert not event_log_path(settings).exists()


def test_concurrent_events_are_all_stored_and_a_malformed_one_fails_alone(tmp_path):
    corrections = pytest.importorskip("backend.corrections")
    settings = Settings(data_dir=tmp_path, model_dir=tmp_path / "models")
    events = []
    for annotation_id in range(1, 21):
        event = copy.deepcopy(capture("09")["request"]["json"])
        event["annotation"]["id"] = event["task"]["id"] = annotation_id
        events.append(event)
    events[6]["annotation"]["id"] = "seven"
    with ThreadPoolExecutor(max_workers=len(events)) as pool:
        answers = [pool.submit(store_event, settings, event) for event in events]
        wait(answers)
    assert [a.result() for i, a in enumerate(answers) if i != 6] == ["corrections"] * 19
    with pytest.raises(corrections.CorrectionsError, match="no integer 'id'"):
        answers[6].result()
    assert corrections.CorrectionsStore.for_settings(settings).annotation_ids() == set(range(1, 21)) - {7}


def test_concurrent_appends_keep_every_line_whole(tmp_path):
    path = tmp_path / "events.jsonl"
    payload = "x" * 5000

    def send(thread: int) -> None:
        for index in range(40):
            append_event(path, {"action": "ANNOTATION_UPDATED", "thread": thread, "index": index, "pad": payload})

    threads = [threading.Thread(target=send, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 240
    seen = {(e["thread"], e["index"]) for e in map(json.loads, lines)}
    assert len(seen) == 240
