"""Webhook events are checked, and recorded durably before `/webhook` answers."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from backend.annotations import AnnotationError
from backend.corrections import CorrectionsStore
from backend.settings import Settings
from backend.webhooks import WebhookError, parse_event, secret_matches
from tests.support import capture


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


def test_concurrent_events_are_all_stored_and_a_malformed_one_fails_alone(tmp_path):
    store = CorrectionsStore.for_settings(Settings(data_dir=tmp_path, model_dir=tmp_path / "models"))
    events = []
    for annotation_id in range(1, 21):
        event = copy.deepcopy(capture("09")["request"]["json"])
        event["annotation"]["id"] = event["task"]["id"] = annotation_id
        events.append(event)
    events[6]["annotation"]["id"] = "seven"
    with ThreadPoolExecutor(max_workers=len(events)) as pool:
        answers = [pool.submit(store.record_event, event) for event in events]
        wait(answers)
    assert [a.result()["samples"] for i, a in enumerate(answers) if i != 6] == [1] * 19
    with pytest.raises(AnnotationError, match="no integer 'id'"):
        answers[6].result()
    assert store.annotation_ids() == set(range(1, 21)) - {7}
