"""Webhook events are checked, and recorded durably before `/webhook` answers."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from backend.annotations import AnnotationError
from backend.corrections import CorrectionsStore
from backend.settings import Settings
from backend.webhooks import WebhookError, parse_event, secret_matches, webhook_secret
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
    assert secret_matches(None, None)  # ALLOW_UNSIGNED_WEBHOOKS
    assert secret_matches("s3cret", "s3cret")
    assert not secret_matches("s3cret", None) and not secret_matches("s3cret", "S3CRET")


def test_the_secret_is_the_setting_or_one_generated_once_per_data_dir(tmp_path):
    assert webhook_secret(Settings(webhook_secret="set", data_dir=tmp_path)) == "set"
    assert webhook_secret(Settings(allow_unsigned_webhooks=True, data_dir=tmp_path)) is None
    generated = webhook_secret(Settings(data_dir=tmp_path))
    assert len(generated) >= 32 and webhook_secret(Settings(data_dir=tmp_path)) == generated
    assert webhook_secret(Settings(data_dir=tmp_path / "other")) != generated


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
