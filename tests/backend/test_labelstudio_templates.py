"""Label Studio's own computer-vision templates, as installed with Label Studio: each one is either filled
through the real API and worker with predictions Label Studio's validator accepts, or skipped with the reason
the backend cannot fill it (pytest's `-ra` summary lists them).

The templates are found in the Label Studio venv that `scripts/ensure_labelstudio.sh` installs, so a new
Label Studio version's templates are tested as they come.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.label_interface import LabelInterface

from backend.labelconfig import ConfigError, FillPlan, Tool, validate_prediction
from tests.e2e.labelstudio import default_venv_path
from tests.support import capture
from tests.support.model_factory import MODEL_VERSION

# The stand-in Label Studio's red.png (`tests.support.images.scene`).
IMAGE_SIZE = (96, 64)


def templates_folder() -> Path | None:
    """The installed Label Studio's `computer-vision` templates folder, None without the venv."""
    found = sorted(default_venv_path().glob(
        "lib/python3*/site-packages/label_studio/annotation_templates/computer-vision"))
    return found[-1] if found else None


def find_templates() -> list[Path]:
    folder = templates_folder()
    return sorted(p for p in folder.iterdir() if (p / "config.yml").is_file()) if folder else []


TEMPLATES = find_templates()


def template_config(folder: Path) -> str:
    return yaml.safe_load((folder / "config.yml").read_text())["config"]


def test_label_studio_templates_are_installed():
    if not TEMPLATES:
        pytest.fail(f"no Label Studio templates under {default_venv_path()}: run scripts/ensure_labelstudio.sh "
                    "to install Label Studio (GPT4ROI_LS_VENV points at another venv)")


def region_items(plan: FillPlan, tool: Tool, region_id: str) -> list[dict[str, Any]]:
    """A region drawn with `tool` as Label Studio writes it (and its label, where the tool has labels)."""
    shape_values = {
        "rectangle": {"x": 10.0, "y": 15.0, "width": 40.0, "height": 50.0, "rotation": 0},
        "polygon": {"points": [[10.0, 15.0], [50.0, 20.0], [30.0, 70.0]], "closed": True},
        "ellipse": {"x": 40.0, "y": 45.0, "radiusX": 20.0, "radiusY": 25.0, "rotation": 0},
        "keypoint": {"x": 30.0, "y": 40.0, "width": 0.6},
    }
    if tool.shape == "brush":
        mask = np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0]), dtype=np.uint8)
        mask[10:40, 12:50] = 255
        geometry: dict[str, Any] = {"format": "rle", "rle": mask2rle(mask)}
    else:
        geometry = shape_values[tool.shape]
    common = {"id": region_id, "to_name": plan.image, "original_width": IMAGE_SIZE[0],
              "original_height": IMAGE_SIZE[1], "image_rotation": 0}
    value = dict(geometry)
    if tool.labels and tool.labels_control is None:
        value[tool.type] = [tool.labels[0]]
    items = [{**common, "from_name": tool.name, "type": tool.type, "value": value}]
    if tool.labels and tool.labels_control is not None:
        items.append({**common, "from_name": tool.labels_control, "type": "labels",
                      "value": {**geometry, "labels": [tool.labels[0]]}})
    return items


def check(config: str, prediction: dict[str, Any]) -> None:
    assert prediction.get("model_version") == MODEL_VERSION, prediction
    assert prediction["result"], "the prediction filled nothing"
    validate_prediction(config, prediction)


@pytest.mark.usefixtures("worker", "redis_db")
@pytest.mark.parametrize("folder", TEMPLATES, ids=[p.name for p in TEMPLATES])
def test_template_is_filled_or_skipped_with_the_reason(folder: Path, api, fake_ls):
    config = template_config(folder)
    try:
        plan = FillPlan.from_label_config(config)
    except ConfigError as exc:
        pytest.skip(f"template {folder.name!r} cannot be filled: {exc}")
    image = f"{fake_ls.url}/img/red.png"
    # The template's own sample task (labels listed in the task data, for one), with an image served here.
    sample, _, _ = LabelInterface.get_task_from_labeling_config(config)
    data = {**(sample or {}), plan.image_key or "image": image}
    task: dict[str, Any] = {"id": 900, "data": data, "annotations": [], "predictions": []}
    plan = plan.for_task(task, max_labels=64)
    if plan.tools:
        task["annotations"] = [{"id": 1, "result": region_items(plan, plan.tools[0], "tpl1")}]

    body = copy.deepcopy(capture("04")["request"]["json"])
    body.update(tasks=[task], label_config=config)
    response = api.client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["results"]
    check(config, prediction)
    if plan.fills_whole_image:
        assert "image" in {item["id"] for item in prediction["result"]}

    for tool in plan.tools:
        drawn = region_items(plan, tool, f"drawn-{tool.name}")
        body = copy.deepcopy(capture("06")["request"]["json"])
        body.update(label_config=config)
        body["tasks"] = [{"id": 901, "data": data, "annotations": [], "predictions": []}]
        body["params"]["context"] = {"result": drawn}
        response = api.client.post("/predict", json=body)
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["results"]
        check(config, prediction)
        echoed = next(item for item in prediction["result"] if item["from_name"] == tool.name)
        assert (echoed["id"], echoed["type"], echoed["value"]) == (drawn[0]["id"], tool.type, drawn[0]["value"])
