"""Label Studio's requests to the backend, built from the captures, and what every answer must satisfy."""

from __future__ import annotations

import copy
from typing import Any

from backend.labelconfig import validate_prediction
from tests.support import capture
from tests.support.model_factory import MODEL_VERSION

CAPTURED_CONFIG = capture("04")["request"]["json"]["label_config"]


def interactive_body(image: str, labels: list[str] | None = None) -> dict[str, Any]:
    """The captured interactive request (a drawn box), on `image`; `labels` replaces the drawn label."""
    body = copy.deepcopy(capture("06")["request"]["json"])
    body["tasks"][0]["data"]["image"] = image
    if labels is not None:
        body["params"]["context"]["result"][0]["value"]["rectanglelabels"] = labels
    return body


def batch_task(task_id: int, image: str, source: str | None) -> dict[str, Any]:
    """A batch task whose boxes come from a prediction (`source="predictions"`), an annotation, or nowhere."""
    task = copy.deepcopy(capture("04")["request"]["json"]["tasks"][0])
    task["id"] = task_id
    task["data"]["image"] = image
    if source == "predictions":
        task["predictions"] = copy.deepcopy(capture("07")["request"]["json"]["tasks"][0]["predictions"])
    elif source == "annotations":
        task["annotations"] = [copy.deepcopy(capture("09")["request"]["json"]["annotation"])]
    return task


def batch_body(tasks: list[dict[str, Any]], config: str = CAPTURED_CONFIG) -> dict[str, Any]:
    body = copy.deepcopy(capture("04")["request"]["json"])
    body["tasks"] = tasks
    body["label_config"] = config
    return body


def check_prediction(prediction: dict[str, Any], config: str = CAPTURED_CONFIG) -> None:
    """What every prediction leaving the backend must satisfy."""
    assert prediction["model_version"] == MODEL_VERSION
    assert isinstance(prediction["score"], float) and 0.0 <= prediction["score"] <= 1.0
    validate_prediction(config, prediction)
