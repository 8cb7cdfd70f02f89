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

import pytest

from backend.labelconfig import ConfigError, FillPlan, validate_prediction
from tests.e2e.labelstudio import default_venv_path
from tests.support import capture
from tests.support.model_factory import MODEL_VERSION
from tests.support.templates import find_templates, region_items, template_config, template_data

TEMPLATES = find_templates()


def test_label_studio_templates_are_installed():
    if not TEMPLATES:
        pytest.fail(f"no Label Studio templates under {default_venv_path()}: run scripts/ensure_labelstudio.sh "
                    "to install Label Studio (GPT4ROI_LS_VENV points at another venv)")


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
    data = template_data(config, plan, image)
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
