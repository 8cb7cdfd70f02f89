"""Proposed regions end to end through real processes: `python -m backend serve` (API, Redis, worker) with a
tiny Florence-2 describing and a tiny Florence-2 proposing (`tests.support.scripted_proposer`). Tasks without
regions, sent by Retrieve Predictions or queued by `prelabel`, come back with regions labelled from the
config, captioned and scored, in predictions Label Studio's validator accepts; a point placed with a smart
KeyPoint tool comes back as the region found there."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest

from backend.labelconfig import validate_prediction
from tests.backend.test_proposals import BOXES, POLYGONS, SMART
from tests.support import REPO, free_port
from tests.support.florence2_factory import save_tiny_florence2
from tests.support.processes import backend_env, start_serve
from tests.support.redis_server import KEY_PREFIX
from tests.support.requests import batch_body, batch_task, interactive_body
from tests.support.scripted_proposer import WORDS

pytestmark = pytest.mark.slow

SCRIPTED = "tests.support.scripted_proposer.ScriptedFlorence2"


def check_proposed(prediction: dict[str, Any], config: str, kind: str, version: str) -> None:
    """A prediction made of proposed regions only: each with a label of the scripted proposer's words (all in
    the config), the region's own score, and a caption."""
    assert prediction["model_version"] == version
    validate_prediction(config, prediction)
    shapes = [item for item in prediction["result"] if item["type"] == kind]
    assert shapes, prediction
    for shape in shapes:
        assert shape["id"].startswith("proposed")
        [label] = shape["value"][kind]
        assert label in WORDS
        assert 0.0 < shape["score"] <= 1.0
    captions = {item["id"] for item in prediction["result"] if item["type"] == "textarea"}
    assert captions == {shape["id"] for shape in shapes}


def test_proposed_regions_through_the_api_the_queue_prelabel_and_a_smart_keypoint(
        base_env, fake_ls, tmp_path, redis_db):
    tiny = save_tiny_florence2(tmp_path / "tiny-florence-2")
    env = backend_env(
        base_env, ENGINE="florence-2", BASE_MODEL=str(tiny), MODEL_DIR=str(tmp_path / "models"),
        DATA_DIR=str(tmp_path / "data"), REDIS_KEY_PREFIX=f"{KEY_PREFIX}-proposals", PORT=str(free_port()),
        HOST="127.0.0.1", MAX_NEW_TOKENS="4", PROPOSER=SCRIPTED, PROPOSER_MODEL=str(tiny),
        PROPOSAL_MAX_NEW_TOKENS="40", PROPOSAL_NMS_IOU="1", PROPOSAL_MIN_SIZE="0")
    proc, client = start_serve(env, tmp_path / "serve.log")
    try:
        version = client.post("/setup", json={"project": "1", "schema": BOXES}).json()["model_version"]
        assert version == tiny.name

        # Retrieve Predictions on tasks that have no regions.
        for config, kind in [(BOXES, "rectanglelabels"), (POLYGONS, "polygonlabels")]:
            tasks = [batch_task(31, f"{fake_ls.url}/img/red.png", None),
                     batch_task(32, f"{fake_ls.url}/img/blue.png", None)]
            response = client.post("/predict", json=batch_body(tasks, config))
            assert response.status_code == 200, response.text + proc.tail()
            results = response.json()["results"]
            assert len(results) == 2
            for prediction in results:
                check_proposed(prediction, config, kind, version)

        # A point placed with a smart KeyPoint tool: the region the proposer finds there comes back, described.
        image = f"{fake_ls.url}/img/red.png"
        found = client.post("/predict", json=batch_body([batch_task(33, image, None)], SMART)).json()["results"][0]
        box = next(item for item in found["result"] if item["type"] == "rectanglelabels")
        x, y = box["value"]["x"] + box["value"]["width"] / 2, box["value"]["y"] + box["value"]["height"] / 2
        body = copy.deepcopy(interactive_body(image))
        body["label_config"] = SMART
        body["params"]["context"] = {"result": [{
            "id": "click1", "from_name": "click", "to_name": "image", "type": "keypointlabels",
            "original_width": 96, "original_height": 64, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": box["value"]["rectanglelabels"]}}]}
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.text + proc.tail()
        (answer,) = response.json()["results"]
        validate_prediction(SMART, answer)
        assert "click" not in {item["from_name"] for item in answer["result"]}, "the prompt is not a region"
        (region,) = [item for item in answer["result"] if item["type"] == "rectanglelabels"]
        assert region["value"] == box["value"]
        assert {item["from_name"] for item in answer["result"] if item["id"] == region["id"]} == {"bbox", "caption"}

        # prelabel queues the tasks without regions; the worker proposes, describes and pushes.
        project = 701
        fake_ls.add_project(project, BOXES, [batch_task(41, f"{fake_ls.url}/img/red.png", None),
                                             batch_task(42, f"{fake_ls.url}/img/blue.png", None)])
        done = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(project),
                               "--timeout", "120"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "with proposed regions (PROPOSE_WHEN): 2" in done.stdout and "pushed: 2" in done.stdout
        pushed = fake_ls.predictions_for(project)
        assert sorted(p["task"] for p in pushed) == [41, 42]
        for prediction in pushed:
            check_proposed(prediction, BOXES, "rectanglelabels", version)

        # Where the proposer finds nothing (it names none of these labels) nothing is pushed, and nothing failed.
        others = ('<View><Image name="image" value="$image"/><RectangleLabels name="bbox" toName="image">'
                  '<Label value="tree"/><Label value="house"/></RectangleLabels></View>')
        fake_ls.add_project(702, others, [batch_task(51, f"{fake_ls.url}/img/red.png", None)])
        done = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", "702", "--timeout", "120"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "where the proposer found nothing: 1" in done.stdout and "failed: 0" in done.stdout, done.stdout
        assert fake_ls.predictions_for(702) == []
    finally:
        client.close()
        proc.stop()
