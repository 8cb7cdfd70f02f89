"""The JSON a prediction job carries, and the prediction made from a worker's answer to it.

Both sides use this module: the API builds payloads (`make_payload`) and turns answers into Label Studio
predictions (`prediction_from_output`); the worker reads payloads (`parse_payload`) and, when it pushes a
prediction itself, builds it the same way.

Payload (version 1), plain JSON only:

    {"v": 1, "task_id": 7, "project": "3", "image": "/data/upload/3/a.png",
     "plan": {...FillPlan...}, "regions": [{...Region...}], "keep_drawn_label": true,
     "max_new_tokens": 32, "model_version": "demo-1", "label_config": "<View>…</View>"}

plus `"propose": true` when the worker should also propose regions (`backend.proposals`), or
`"propose": {"points": [[x, y, label], …]}` (normalized; label or null) for the regions found at points an
annotator placed with a smart KeyPoint tool.

Answer: `{"model_version", "image_size": [w, h], "regions": [{"id", "caption", "choices", "label"}],
"timing": {...}, "batch": {"jobs", "regions"}}` (`batch`: the model call the job was answered in; with
`"proposed": [{...Region...}]`, the regions the worker proposed, answered after the payload's own), or
`{"error": {"kind": "image" | "input" | "invalid", "message"}, "model_version"}` when the job's input cannot
be used (retrying would not help).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from backend.labelconfig import FillPlan, Region, build_prediction, validate_prediction

PAYLOAD_VERSION = 1


class PayloadError(ValueError):
    """A job payload of an unknown format or with missing fields."""


def make_payload(
    *,
    task_id: Any,
    project: str | None,
    image: str,
    plan: FillPlan,
    regions: Sequence[Region],
    label_config: str,
    model_version: str,
    keep_drawn_label: bool,
    max_new_tokens: int,
    propose: bool | Mapping[str, Any] = False,
) -> dict[str, Any]:
    """The payload of a job predicting `regions` of one task (and, with `propose`, the regions the worker's
    proposer finds: `True` for all of them, `{"points": [[x, y, label], …]}` for those at prompt points)."""
    payload = {
        "v": PAYLOAD_VERSION,
        "task_id": task_id,
        "project": project,
        "image": image,
        "plan": plan.to_json(),
        "regions": [r.to_json() for r in regions],
        "keep_drawn_label": keep_drawn_label,
        "max_new_tokens": max_new_tokens,
        "model_version": model_version,
        "label_config": label_config,
    }
    if propose:
        payload["propose"] = dict(propose) if isinstance(propose, Mapping) else True
    return payload


def parse_payload(payload: Mapping[str, Any]) -> tuple[FillPlan, list[Region], bool]:
    """The fill plan, regions and drawn-label policy of a payload."""
    if not isinstance(payload, Mapping) or payload.get("v") != PAYLOAD_VERSION:
        raise PayloadError(f"job payload of an unknown format (expected v={PAYLOAD_VERSION})")
    try:
        plan = FillPlan.from_json(payload["plan"])
        regions = [Region.from_json(r) for r in payload["regions"]]
        return plan, regions, bool(payload.get("keep_drawn_label", True))
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"malformed job payload: {exc!r}") from None


def prediction_from_output(payload: Mapping[str, Any], output: Mapping[str, Any]) -> dict[str, Any]:
    """The Label Studio prediction for a payload and the worker's answer, validated against the labeling
    config (raises `backend.labelconfig.PredictionInvalid`)."""
    plan, regions, keep_drawn = parse_payload(payload)
    regions += [Region.from_json(data) for data in output.get("proposed") or ()]
    size = output.get("image_size")
    prediction = build_prediction(
        plan, regions, output["regions"], output["model_version"],
        image_size=(int(size[0]), int(size[1])) if size else None, keep_drawn_label=keep_drawn)
    label_config = payload.get("label_config")
    if label_config:
        validate_prediction(label_config, prediction)
    return prediction
