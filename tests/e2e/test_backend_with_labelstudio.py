"""The GPT4RoI backend serves a real Label Studio 1.23.2 end to end.

Our API and a model worker (a tiny random checkpoint, on the local Redis) are connected to a Label Studio
project built from ``labelstudio_config/demo_shapes.xml``. Its tasks carry rectangles from an imported
annotation or prediction; "Retrieve Predictions" must leave one prediction of ours per task that fills the
caption and every per-region choice of each rectangle, and a rectangle drawn in the labeling UI must come
back with its caption and choices. Random weights make the words arbitrary: this checks the protocol.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from label_studio_sdk.label_interface import LabelInterface

from tests.support.images import scene
from tests.support.processes import Api, Process, backend_env, start_api, start_worker
from tests.support.redis_server import REDIS_URL

from .labelstudio import CONFIG_DIR, ImageServer, LabelStudioClient, LabelStudioServer, region_result

pytestmark = pytest.mark.e2e

CONFIG_NAME = "demo_shapes.xml"
PER_REGION = {"caption": "textarea", "color": "choices", "size": "choices", "texture": "choices"}
IMAGE_SIZE = (96, 64)
# Each task: a coloured rectangle in pixels and the box Label Studio holds for it, in percent.
SCENES: list[tuple[tuple[int, int, int], tuple[int, int, int, int], tuple[float, float, float, float]]] = [
    ((220, 30, 30), (10, 12, 50, 44), (10.4, 18.75, 41.7, 50.0)),
    ((20, 40, 220), (40, 8, 90, 60), (41.7, 12.5, 52.1, 81.25)),
    ((30, 180, 60), (5, 30, 35, 60), (5.2, 46.9, 31.3, 46.9)),
]
PREDICTION_TIMEOUT_S = 120.0


@dataclass
class ConnectedProject:
    """A Label Studio project with our backend connected and tasks whose rectangles are known."""

    project: dict[str, Any]
    label_config: str
    ml_backend: dict[str, Any]
    task_ids: list[int]
    region_ids: dict[int, str]
    model_version: str


@pytest.fixture(scope="module")
def our_backend(labelstudio: LabelStudioServer, image_server: ImageServer, model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """Our API and one worker, told to reach the test Label Studio and to fetch from the image server."""
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError:
        pytest.fail("the end-to-end backend test needs Redis at 127.0.0.1:6379 (start redis-server)")
    finally:
        connection.close()
    image_host = urlsplit(image_server.base_url).netloc
    # A prefix of its own keeps these queues away from any other worker on the same Redis database.
    prefix = f"gpt4roi-e2e-{secrets.token_hex(4)}"
    logs = tmp_path_factory.mktemp("backend-logs")
    env = backend_env({
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        "MODEL_DIR": str(model_dir),
        "DATA_DIR": str(tmp_path_factory.mktemp("backend-data")),
        "LABEL_STUDIO_URL": labelstudio.url,
        "LABEL_STUDIO_API_KEY": labelstudio.token,
        "ALLOWED_IMAGE_HOSTS": image_host,
        "DEVICE": "cpu",
        "MAX_NEW_TOKENS": "6",
        "WORKER_HEARTBEAT_TTL": "5",
        "WORKER_MAINTENANCE_INTERVAL": "2",
        "INTERACTIVE_TIMEOUT": "90",
        "BATCH_PREDICT_DEADLINE": "90",
        "LOG_LEVEL": "INFO",
    })
    worker: Process = start_worker(env, logs / "worker.log", f"{prefix}-worker")
    try:
        api = start_api(env, logs / "api.log")
    except BaseException:
        worker.stop()
        raise
    try:
        yield api
    finally:
        api.stop()
        worker.stop()


def box_item(region_id: str, box: tuple[float, float, float, float], label: str) -> dict[str, Any]:
    """A ``rectanglelabels`` region as Label Studio stores it."""
    x, y, width, height = box
    return {"id": region_id, "from_name": "bbox", "to_name": "image", "type": "rectanglelabels",
            "original_width": IMAGE_SIZE[0], "original_height": IMAGE_SIZE[1], "image_rotation": 0,
            "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0,
                      "rectanglelabels": [label]}}


@pytest.fixture(scope="module")
def connected(ls_client: LabelStudioClient, image_server: ImageServer, our_backend: Api) -> ConnectedProject:
    """The demo project with three tasks (an annotated one, two pre-labeled ones) and our backend connected."""
    label_config = (CONFIG_DIR / CONFIG_NAME).read_text(encoding="utf-8")
    project = ls_client.create_project_from_config(CONFIG_NAME, title="gpt4roi end to end")
    tasks: list[dict[str, Any]] = []
    region_ids: list[str] = []
    for index, (colour, pixels, percent) in enumerate(SCENES):
        name = f"e2e-scene-{index}.png"
        scene(IMAGE_SIZE, pixels, colour).save(image_server.root / name)
        region_id = f"Box{index:03d}"
        item = box_item(region_id, percent, "square")
        task: dict[str, Any] = {"data": {"image": image_server.url(name)}}
        # The first task's box comes from an annotator, the others from an earlier detector's prediction.
        if index == 0:
            task["annotations"] = [{"result": [item]}]
        else:
            task["predictions"] = [{"model_version": "detector", "score": 0.9, "result": [item]}]
        tasks.append(task)
        region_ids.append(region_id)
    task_ids = ls_client.import_tasks(project["id"], tasks)

    setup = our_backend.client.post("/setup", json={
        "project": f"{project['id']}.{int(time.time())}",
        "schema": label_config, "hostname": ls_client.base_url, "access_token": "",
        "model_version": None, "extra_params": None})
    assert setup.status_code == 200, setup.text
    model_version = setup.json()["model_version"]

    ml_backend = ls_client.connect_ml_backend(project["id"], our_backend.url, title="gpt4roi",
                                              is_interactive=True)
    assert ml_backend["state"] == "CO", ml_backend
    return ConnectedProject(project=project, label_config=label_config, ml_backend=ml_backend,
                            task_ids=task_ids, region_ids=dict(zip(task_ids, region_ids, strict=True)),
                            model_version=model_version)


def assert_filled_region(result: list[dict[str, Any]], region_id: str, label_config: str) -> None:
    """The region ``region_id`` has its rectangle, a non-empty caption and one valid choice per attribute."""
    items = {item["from_name"]: item for item in result if item["id"] == region_id}
    assert set(items) == {"bbox", *PER_REGION}, f"region {region_id} has items {sorted(items)}: {result}"
    controls = {control.name: control for control in LabelInterface(label_config).controls}
    for name, kind in PER_REGION.items():
        item = items[name]
        assert item["type"] == kind and item["to_name"] == "image", item
        for key in ("x", "y", "width", "height"):
            assert item["value"][key] == pytest.approx(items["bbox"]["value"][key]), (name, key)
        if kind == "textarea":
            (text,) = item["value"]["text"]
            assert isinstance(text, str) and text.strip(), item
        else:
            (choice,) = item["value"]["choices"]
            assert choice in controls[name].labels, item


def test_connecting_answers_the_version_our_setup_reports(connected: ConnectedProject,
                                                          ls_client: LabelStudioClient):
    (stored,) = ls_client.list_ml_backends(connected.project["id"])
    assert stored["id"] == connected.ml_backend["id"]
    assert stored["state"] == "CO", stored
    assert stored["model_version"] == connected.model_version
    assert stored["is_interactive"] is True


def test_retrieve_predictions_stores_one_filled_prediction_per_task(connected: ConnectedProject,
                                                                    ls_client: LabelStudioClient):
    answer = ls_client.retrieve_predictions(connected.project["id"])
    assert answer["processed_items"] == len(connected.task_ids), answer

    interface = LabelInterface(connected.label_config)
    for task_id in connected.task_ids:
        # Imported detector predictions stay; ours is the one extra carrying our model version.
        already = 0 if task_id == connected.task_ids[0] else 1
        predictions = ls_client.wait_for_predictions(task_id, count=already + 1, timeout_s=PREDICTION_TIMEOUT_S)
        ours = [p for p in predictions if p["model_version"] == connected.model_version]
        assert len(ours) == 1, predictions
        assert len(predictions) == already + 1, predictions
        (prediction,) = ours
        assert {item["id"] for item in prediction["result"]} == {connected.region_ids[task_id]}
        assert_filled_region(prediction["result"], connected.region_ids[task_id], connected.label_config)
        assert 0.0 <= prediction["score"] <= 1.0, prediction
        errors = interface.validate_prediction(
            {"model_version": prediction["model_version"], "score": prediction["score"],
             "result": prediction["result"]}, return_errors=True)
        assert errors == [], errors


def test_a_drawn_rectangle_comes_back_with_caption_and_choices(connected: ConnectedProject,
                                                              ls_client: LabelStudioClient):
    task_id = connected.task_ids[1]
    before = len(ls_client.list_predictions(task_id=task_id))
    drawn = region_result(connected.label_config, "Drawn01", (40.0, 10.0, 55.0, 80.0), IMAGE_SIZE)[0]

    answer = ls_client.interactive_annotating(connected.ml_backend["id"], task_id, {"result": [drawn]})

    assert "errors" not in answer, answer
    data = answer["data"]
    assert data["model_version"] == connected.model_version, data
    result = data["result"]
    assert {item["id"] for item in result} == {"Drawn01"}, result
    (box,) = [item for item in result if item["from_name"] == "bbox"]
    for key in ("x", "y", "width", "height"):
        assert box["value"][key] == pytest.approx(drawn["value"][key]), key
    assert box["value"]["rectanglelabels"] == drawn["value"]["rectanglelabels"], box
    assert_filled_region(result, "Drawn01", connected.label_config)
    assert LabelInterface(connected.label_config).validate_prediction(data, return_errors=True) == []
    assert len(ls_client.list_predictions(task_id=task_id)) == before, "interactive answers are not stored"
