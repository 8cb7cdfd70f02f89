"""Regions nobody drew, in a real Label Studio 1.23.2: a project with a labelled region tool, an imported
image task without any region, our backend connected with a proposer beside the describer (the demo model
describes; a tiny Florence-2 proposes, its generation held to a grammar by `tests.support.scripted_proposer`
so that it grounds something). Retrieve Predictions: the task then holds regions labelled from the config,
each with its own score, a caption and choices, all accepted by Label Studio's validator. A point placed
with a smart KeyPoint tool (Auto-Annotation) brings back the region found there.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from model.demo import demo_version_name
from tests.support import WEBHOOK_SECRET
from tests.support.florence2_factory import save_tiny_florence2
from tests.support.images import png_bytes, scene
from tests.support.processes import Api, backend_env
from tests.support.redis_server import REDIS_URL
from tests.support.scripted_proposer import WORDS

from .labelstudio import ImageServer, LabelStudioClient, LabelStudioServer
from .test_backend_with_labelstudio import (  # noqa: F401 - fixtures used by name
    assert_valid,
    demo_models,
    prediction_of,
    running_backend,
)

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="bbox" toName="image">
    <Label value="car"/><Label value="dog"/><Label value="tree"/>
  </RectangleLabels>
  <TextArea name="caption" toName="image" perRegion="true"/>
  <Choices name="color" toName="image" perRegion="true"><Choice value="red"/><Choice value="blue"/></Choices>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="car"/><Label value="dog"/></KeyPointLabels>
</View>"""


@pytest.fixture(scope="module")
def proposing_backend(labelstudio: LabelStudioServer, image_server: ImageServer,
                      demo_models: Path,  # noqa: F811 - the fixture imported above
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tiny = save_tiny_florence2(tmp_path_factory.mktemp("proposer") / "tiny-florence-2")
    env = backend_env({
        "REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": f"gpt4roi-e2e-{secrets.token_hex(4)}",
        "MODEL_DIR": str(demo_models), "DATA_DIR": str(tmp_path_factory.mktemp("proposals-data")),
        "LABEL_STUDIO_URL": labelstudio.url, "LABEL_STUDIO_API_KEY": labelstudio.token,
        "ALLOWED_IMAGE_HOSTS": urlsplit(image_server.base_url).netloc, "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DEVICE": "cpu", "WORKER_HEARTBEAT_TTL": "5", "INTERACTIVE_TIMEOUT": "90", "BATCH_PREDICT_DEADLINE": "90",
        "PROPOSER": "tests.support.scripted_proposer.ScriptedFlorence2", "PROPOSER_MODEL": str(tiny),
        "PROPOSAL_MAX_NEW_TOKENS": "40", "PROPOSAL_NMS_IOU": "1", "PROPOSAL_MIN_SIZE": "0",
    })
    with running_backend(env, tmp_path_factory.mktemp("proposals-logs")) as (api, _):
        yield api


def test_an_imported_task_without_regions_gets_proposed_described_regions(
        ls_client: LabelStudioClient, image_server: ImageServer, proposing_backend: Api):
    (image_server.root / "proposals-scene.png").write_bytes(png_bytes(scene((96, 64))))
    project = ls_client.create_project("proposed regions", CONFIG)
    (task_id,) = ls_client.import_tasks(project["id"], [{"data": {"image": image_server.url("proposals-scene.png")}}])
    ls_client.connect_ml_backend(project["id"], proposing_backend.url)

    ls_client.retrieve_predictions(project["id"], [task_id])
    prediction = prediction_of(ls_client, task_id, demo_version_name())
    assert_valid(prediction, CONFIG)
    regions = [item for item in prediction["result"] if item["type"] == "rectanglelabels"]
    assert regions, prediction
    for region in regions:
        (label,) = region["value"]["rectanglelabels"]
        assert label in WORDS and 0.0 < region["score"] <= 1.0
        fields = {item["from_name"] for item in prediction["result"] if item["id"] == region["id"]}
        assert fields == {"bbox", "caption", "color"}, prediction["result"]

    # Auto-Annotation with the smart KeyPoint tool: a point inside a proposed region brings that region back.
    value = regions[0]["value"]
    point = {"x": value["x"] + value["width"] / 2, "y": value["y"] + value["height"] / 2, "width": 0.6,
             "keypointlabels": value["rectanglelabels"]}
    [backend] = ls_client.list_ml_backends(project["id"])
    answer = ls_client.interactive_annotating(backend["id"], task_id, {"result": [{
        "id": "click1", "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual",
        "original_width": 96, "original_height": 64, "image_rotation": 0, "value": point}]})
    suggestion = answer["data"]
    assert_valid(suggestion, CONFIG)
    (found,) = [item for item in suggestion["result"] if item["type"] == "rectanglelabels"]
    assert found["value"] == value
