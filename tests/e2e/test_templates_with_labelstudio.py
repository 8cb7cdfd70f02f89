"""Label Studio's own computer-vision templates, each in a real Label Studio 1.23.2: a project made from the
template, one task of the template's sample data showing an image of ours (with a detector's region drawn
with the template's first tool, where it has tools), our backend connected as the project's ML backend,
then Retrieve Predictions. The task then holds our pre-annotation: Label Studio's validator accepts it and
it fills the template's controls. Templates the backend cannot fill are skipped with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.labelconfig import ConfigError, FillPlan, regions_from_context
from model.demo import demo_version_name
from tests.support.images import png_bytes, scene
from tests.support.processes import Api
from tests.support.templates import IMAGE_SIZE, find_templates, region_items, template_config, template_data

from .labelstudio import ImageServer, LabelStudioClient
from .test_backend_with_labelstudio import (  # noqa: F401 - fixtures used by name
    assert_valid,
    demo_models,
    our_backend,
    prediction_of,
)

TEMPLATES = find_templates()
IMAGE = "template-scene.png"


@pytest.mark.parametrize("folder", TEMPLATES, ids=[p.name for p in TEMPLATES])
def test_a_project_made_from_the_template_gets_our_pre_annotation(
        folder: Path, ls_client: LabelStudioClient, image_server: ImageServer,
        our_backend: tuple[Api, dict[str, str]]):  # noqa: F811 - the fixture imported above
    config = template_config(folder)
    try:
        plan = FillPlan.from_label_config(config)
    except ConfigError as exc:
        pytest.skip(f"template {folder.name!r} cannot be filled: {exc}")
    (image_server.root / IMAGE).write_bytes(png_bytes(scene(IMAGE_SIZE)))
    api, _ = our_backend
    project = ls_client.create_project(f"template {folder.name}", config)
    data = template_data(config, plan, image_server.url(IMAGE))
    (task_id,) = ls_client.import_tasks(project["id"], [{"data": data}])
    plan = plan.for_task({"id": task_id, "data": data}, max_labels=64)
    expected = {*plan.image_captions, *(c.name for c in plan.image_choices)}
    if plan.tools:
        drawn = region_items(plan, plan.tools[0], "detected1")
        ls_client.request("POST", "/api/predictions/", json_body={
            "task": task_id, "model_version": "detector", "score": 0.9, "result": drawn})
        (region,) = regions_from_context(plan, {"result": drawn})
        expected |= {plan.tools[0].name, *plan.shown_captions(region, None),
                     *(c.name for c in plan.shown_choices(region, None))}

    ls_client.connect_ml_backend(project["id"], api.url)
    ls_client.retrieve_predictions(project["id"], [task_id])
    prediction = prediction_of(ls_client, task_id, demo_version_name())
    assert_valid(prediction, config)
    filled = {item["from_name"] for item in prediction["result"]}
    assert expected <= filled, f"{folder.name}: {sorted(expected - filled)} not filled in {prediction['result']}"
    if plan.tools:
        echoed = next(item for item in prediction["result"] if item["from_name"] == plan.tools[0].name)
        assert (echoed["id"], echoed["type"]) == ("detected1", plan.tools[0].type)
