"""Nothing is trained on that Label Studio does not confirm: a forged or altered annotation, accepted by
`/webhook` because it carried the secret, never reaches a fine-tune, and what was left out is counted where
an operator looks (the run's record, `versions`, `report`, `/metrics`)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backend import registry
from backend.confirmation import Confirmation, confirm, judge
from backend.corrections import CorrectionsStore
from backend.finetune import FinetuneOptions, run_finetune
from backend.settings import Settings
from tests.support import REPO
from tests.support.fake_labelstudio import LS_TOKEN
from tests.support.hitl import DEMO_CONFIG, PROJECT_ID, annotation_event, make_tasks
from tests.support.processes import backend_env
from tests.support.redis_server import KEY_PREFIX, REDIS_URL

pytestmark = pytest.mark.slow
BASE = "tiny-0"


@pytest.fixture
def settings(tmp_path: Path, tiny_checkpoint: Path, fake_ls: Any, redis_db: Any) -> Settings:
    settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data", redis_url=REDIS_URL,
                        key_prefix=KEY_PREFIX, local_files_document_root=str(tmp_path / "images"),
                        label_studio_url=fake_ls.url, label_studio_api_key=LS_TOKEN, max_new_tokens=4,
                        finetune_steps=2, finetune_learning_rate=1e-2, finetune_device="cpu")
    registry.import_checkpoint(settings, tiny_checkpoint, BASE, symlink=True)
    return settings


def test_forged_and_altered_annotations_are_kept_out_of_the_fine_tune(settings, fake_ls, tmp_path):
    tasks = make_tasks(tmp_path / "images", "b", 1, 8, seed=31)
    fake_ls.add_project(PROJECT_ID, DEMO_CONFIG, [{"id": t.task_id, "data": {"image": t.reference}} for t in tasks])
    store = CorrectionsStore.for_settings(settings)
    genuine = []
    for i, task in enumerate(tasks):
        event = annotation_event(task, 7000 + i, DEMO_CONFIG)
        store.record_event(event)
        if i < 6:  # Label Studio holds these as the webhooks said
            fake_ls.annotations[7000 + i] = copy.deepcopy(event["annotation"])
            genuine.append(7000 + i)
    # 7006: never in Label Studio (forged); 7007: Label Studio holds another caption (altered in transit).
    altered = copy.deepcopy(annotation_event(tasks[7], 7007, DEMO_CONFIG)["annotation"])
    next(item for item in altered["result"] if item["type"] == "textarea")["value"]["text"] = ["what LS holds"]
    fake_ls.annotations[7007] = altered

    outcome = run_finetune(settings, FinetuneOptions())

    assert outcome.ok, outcome.message
    data = registry.read_metadata(settings, outcome.candidate)["data"]
    forged_regions = len(tasks[6].objects)
    altered_regions = len(tasks[7].objects)
    assert data["unconfirmed_regions"] == {"missing": forged_regions, "changed": altered_regions}
    trained = data["new_regions"] + data["fresh_eval_regions"]
    assert trained == sum(len(t.objects) for t in tasks[:6])
    states = confirm(settings, store.regions())
    assert {a for a, s in states.items() if s is Confirmation.CONFIRMED} == set(genuine)

    env = backend_env({"MODEL_DIR": str(settings.model_dir), "DATA_DIR": str(settings.data_dir),
                       "REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": KEY_PREFIX})
    for command in ("versions", "report"):
        shown = subprocess.run([sys.executable, "-m", "backend", command], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert "confirmed 6" in shown.stdout and "missing 1" in shown.stdout and "changed 1" in shown.stdout
        assert "2 left out" in shown.stdout


def test_without_label_studio_credentials_nothing_unconfirmed_is_trained(settings, tmp_path):
    import dataclasses

    blind = dataclasses.replace(settings, label_studio_api_key="", label_studio_url="")
    for i, task in enumerate(make_tasks(tmp_path / "images", "b", 1, 3, seed=32)):
        CorrectionsStore.for_settings(blind).record_event(annotation_event(task, 7100 + i, DEMO_CONFIG))
    refused = run_finetune(blind, FinetuneOptions())
    assert not refused.ok and "not confirmed by Label Studio" in refused.message and "unchecked" in refused.message
    opted_out = run_finetune(dataclasses.replace(blind, train_on_unconfirmed=True), FinetuneOptions())
    assert opted_out.ok, opted_out.message


def test_judging_what_label_studio_holds(tmp_path):
    [task] = make_tasks(tmp_path / "images", "b", 1, 1, seed=33)
    settings = Settings(data_dir=tmp_path / "data")
    event = annotation_event(task, 7200, DEMO_CONFIG)
    CorrectionsStore.for_settings(settings).record_event(event)
    regions = CorrectionsStore.for_settings(settings).regions()
    held = copy.deepcopy(event["annotation"])
    assert judge(held, regions) is Confirmation.CONFIRMED
    assert judge(None, regions) is Confirmation.MISSING
    assert judge({**held, "task": 999}, regions) is Confirmation.FOREIGN
    assert judge({**held, "was_cancelled": True}, regions) is Confirmation.CANCELLED
    moved = copy.deepcopy(held)
    moved["result"][0]["value"]["x"] += 5
    assert judge(moved, regions) is Confirmation.CHANGED
    fewer = {**held, "result": [i for i in held["result"] if i["id"] != held["result"][0]["id"]]}
    assert judge(fewer, regions) is Confirmation.CHANGED

    # The project the webhook named must be the annotation's; where either side names none, the task decides.
    named, elsewhere = str(event["project"]["id"]), {**held, "project": held["project"] + 1}
    assert judge(held, regions, named) is Confirmation.CONFIRMED
    assert judge(elsewhere, regions, named) is Confirmation.FOREIGN
    assert judge({**held, "project": None}, regions, named) is Confirmation.CONFIRMED
    assert judge(elsewhere, regions, None) is Confirmation.CONFIRMED

    class LabelStudioHoldingItElsewhere:
        def annotation(self, annotation_id: int) -> dict[str, Any]:
            return elsewhere

    # `confirm` compares with the project stored from the webhook.
    assert confirm(settings, regions, client=LabelStudioHoldingItElsewhere()) == {7200: Confirmation.FOREIGN}
