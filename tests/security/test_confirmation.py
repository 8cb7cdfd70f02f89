"""Corrections are confirmed whole: what a fine-tune trains on is the content Label Studio's API holds
(regions, fields, the task's image and the project's labeling config), the answer is kept with the event it
was about, deletions are Label Studio's word, and a webhook's dates and id lists cannot freeze or flood the
store. Each test runs on SQLite and on PostgreSQL, against a stand-in Label Studio over real HTTP."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest

from backend.confirmation import Confirmation, confirm
from backend.corrections import MAX_DELETED_PER_EVENT, CorrectionsStore
from backend.labelstudio import LabelStudioClient
from backend.settings import Settings
from tests.support.fake_labelstudio import LS_TOKEN, FakeLabelStudio
from tests.support.hitl import DEMO_CONFIG, PROJECT_ID, SceneTask, annotation_event, make_tasks

# Ids of our own, so that the session's stand-in Label Studio holds nothing of other tests' under them.
FIRST_ID = 88_000


@pytest.fixture
def settings(tmp_path: Path, database_url: str, fake_ls: FakeLabelStudio) -> Settings:
    return Settings.from_env({}, data_dir=tmp_path / "data", model_dir=tmp_path / "models",
                             database_url=database_url, label_studio_url=fake_ls.url,
                             label_studio_api_key=LS_TOKEN)


@pytest.fixture
def tasks(tmp_path: Path, fake_ls: FakeLabelStudio) -> list[SceneTask]:
    """Three tasks of project PROJECT_ID, as Label Studio holds them."""
    made = make_tasks(tmp_path / "images", "b", 1, 3, seed=41)
    fake_ls.add_project(PROJECT_ID, DEMO_CONFIG,
                        [{"id": t.task_id, "data": {"image": t.reference}} for t in made])
    return made


def held_by_label_studio(fake_ls: FakeLabelStudio, event: dict[str, Any]) -> None:
    fake_ls.annotations[event["annotation"]["id"]] = copy.deepcopy(event["annotation"])


def recaptioned(event: dict[str, Any], caption: str, updated_at: str | None = None) -> dict[str, Any]:
    changed = copy.deepcopy(event)
    next(i for i in changed["annotation"]["result"] if i["type"] == "textarea")["value"]["text"] = [caption]
    if updated_at is not None:
        changed["annotation"]["updated_at"] = updated_at
    return changed


def test_an_answer_is_kept_for_the_content_it_was_about_not_for_a_delivery_that_came_meanwhile(
        settings, fake_ls, tasks):
    """Fails before the answer was bound to its event: the forged update, stored while Label Studio was
    being asked, was marked confirmed and trained on by the next fine-tune."""
    store = CorrectionsStore.for_settings(settings)
    genuine = annotation_event(tasks[0], FIRST_ID, DEMO_CONFIG)
    held_by_label_studio(fake_ls, genuine)
    store.record_event(genuine)
    snapshot = store.regions()

    class ForgeryWhileAsking(LabelStudioClient):
        def annotation(self, annotation_id: int) -> dict[str, Any] | None:
            store.record_event(recaptioned(genuine, "a forged caption",
                                           time.strftime("%Y-%m-%dT%H:%M:%S.900000Z", time.gmtime())))
            return super().annotation(annotation_id)

    with ForgeryWhileAsking(settings) as client:
        assert confirm(settings, snapshot, client=client) == {FIRST_ID: Confirmation.CONFIRMED}

    assert "a forged caption" in {r.caption for r in store.regions()}
    assert confirm(settings, store.regions()) == {FIRST_ID: Confirmation.CHANGED}


def test_the_image_and_the_labeling_config_are_label_studios_too(settings, fake_ls, tasks):
    """Fails while only the annotation was compared: the image and the config came from the webhook."""
    store = CorrectionsStore.for_settings(settings)
    elsewhere = annotation_event(tasks[0], FIRST_ID + 10, DEMO_CONFIG)
    held_by_label_studio(fake_ls, elsewhere)
    elsewhere["task"]["data"]["image"] = f"{fake_ls.url}/data/upload/2/someone-elses.png"
    reconfigured = annotation_event(tasks[1], FIRST_ID + 11, DEMO_CONFIG)
    held_by_label_studio(fake_ls, reconfigured)
    reconfigured["project"]["label_config"] = DEMO_CONFIG.replace("</View>", '<Choices name="extra" toName="image" '
                                                                             'perRegion="true"><Choice value="x"/>'
                                                                             '</Choices></View>', 1)
    assert "extra" in reconfigured["project"]["label_config"]
    faithful = annotation_event(tasks[2], FIRST_ID + 12, DEMO_CONFIG)
    held_by_label_studio(fake_ls, faithful)
    for event in (elsewhere, reconfigured, faithful):
        store.record_event(event)

    assert confirm(settings, store.regions()) == {FIRST_ID + 10: Confirmation.CHANGED,
                                                  FIRST_ID + 11: Confirmation.CHANGED,
                                                  FIRST_ID + 12: Confirmation.CONFIRMED}


def test_a_cloud_storage_image_is_the_same_whichever_way_label_studio_spells_it(settings, fake_ls, tmp_path):
    # GET /api/tasks/{id} resolves storage URIs into Label Studio's presign route; webhooks send them as imported.
    import base64

    [task] = make_tasks(tmp_path / "images", "b", 1, 1, seed=42)
    uri = "s3://bucket/scenes/1.png"
    signed = f"{fake_ls.url}/tasks/{task.task_id}/presign/?fileuri={base64.urlsafe_b64encode(uri.encode()).decode()}"
    fake_ls.add_project(PROJECT_ID, DEMO_CONFIG, [{"id": task.task_id, "data": {"image": signed}}])
    event = annotation_event(task, FIRST_ID + 15, DEMO_CONFIG)
    event["task"]["data"]["image"] = uri
    held_by_label_studio(fake_ls, event)
    store = CorrectionsStore.for_settings(settings)
    store.record_event(event)
    assert confirm(settings, store.regions()) == {FIRST_ID + 15: Confirmation.CONFIRMED}


def test_a_deletion_counts_once_label_studio_confirms_it(settings, fake_ls, tasks):
    """Fails while a deletion event removed annotations, and blocked their ids, on its own word."""
    store = CorrectionsStore.for_settings(settings)
    kept = annotation_event(tasks[0], FIRST_ID + 20, DEMO_CONFIG)
    held_by_label_studio(fake_ls, kept)
    gone = annotation_event(tasks[1], FIRST_ID + 21, DEMO_CONFIG)  # deleted in Label Studio: it answers 404
    for event in (kept, gone):
        store.record_event(event)
    deletion = {"action": "ANNOTATIONS_DELETED", "project": {"id": PROJECT_ID},
                "annotations": [{"id": FIRST_ID + 20}, {"id": FIRST_ID + 21}, {"id": FIRST_ID + 29}]}
    summary = store.record_event(deletion)
    assert summary["deleted"] == len(tasks[0].objects) + len(tasks[1].objects)
    assert store.regions() == [] and store.annotation_ids() == set()

    # Label Studio still holds the first (the event was not its), and no longer the second.
    assert confirm(settings, store.regions()) == {}
    assert store.annotation_ids() == {FIRST_ID + 20}
    assert confirm(settings, store.regions()) == {FIRST_ID + 20: Confirmation.CONFIRMED}
    replayed = store.record_event(gone)
    assert replayed["samples"] == 0 and "deleted earlier" in replayed["ignored"][0]
    assert store.record_event(recaptioned(kept, "edited after all"))["samples"] == len(tasks[0].objects)


def test_annotations_withheld_by_a_deletion_are_not_trained_on_while_label_studio_cannot_be_asked(
        settings, fake_ls, tasks):
    import dataclasses

    blind = dataclasses.replace(settings, label_studio_url="", label_studio_api_key="", train_on_unconfirmed=True)
    store = CorrectionsStore.for_settings(blind)
    event = annotation_event(tasks[0], FIRST_ID + 30, DEMO_CONFIG)
    store.record_event(event)
    snapshot = store.regions()  # taken before the deletion arrived
    store.record_event({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": FIRST_ID + 30}]})
    assert confirm(blind, snapshot) == {FIRST_ID + 30: Confirmation.DELETING}


def test_an_updated_at_in_the_future_is_taken_as_the_moment_the_event_arrived(settings, tasks):
    """Fails while `updated_at` was stored as sent: the year 9999 froze the annotation."""
    store = CorrectionsStore.for_settings(settings)
    first = annotation_event(tasks[0], FIRST_ID + 40, DEMO_CONFIG)
    store.record_event(recaptioned(first, "from the future", "9999-12-31T23:59:59Z"))
    time.sleep(0.01)
    later = recaptioned(first, "the annotator's next edit",
                        time.strftime("%Y-%m-%dT%H:%M:%S.999999Z", time.gmtime(time.time() + 1)))
    assert store.record_event(later)["samples"] == len(tasks[0].objects)
    assert "the annotator's next edit" in {r.caption for r in store.regions()}
    stored = store.database.read().execute("SELECT updated_at FROM annotations WHERE annotation_id = ?",
                                           (FIRST_ID + 40,)).fetchone()[0]
    assert not stored.startswith("9999")


def test_the_ids_of_one_deletion_event_are_capped(settings, tasks):
    """Fails while every listed id was handled: millions fit in one event."""
    store = CorrectionsStore.for_settings(settings)
    store.record_event(annotation_event(tasks[0], FIRST_ID + 50, DEMO_CONFIG))
    ids = [FIRST_ID + 50, *range(10**9, 10**9 + MAX_DELETED_PER_EVENT + 4)]
    started = time.perf_counter()
    summary = store.record_event({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in ids]})
    assert summary["dropped"] == 5 and summary["deleted"] == len(tasks[0].objects)
    assert time.perf_counter() - started < 30
