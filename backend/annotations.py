"""Annotators' corrections as data: a Label Studio annotation turned into one sample per region.

Pure functions on plain data (no database, no network): `backend.corrections` stores what
`samples_from_annotation` returns and reads it back as `CorrectedRegion`s.

A sample is one region of a submitted annotation (a rectangle, polygon, ellipse, keypoint, brush mask, or
the whole image): the image reference (the task's data URL), the region (Label Studio's percent geometry,
its normalized xyxy enclosing box and the original image size), the final
caption, choices and label, and what the model had proposed for that region when Label Studio filled the
annotation from a prediction (`annotation.prediction`). Cancelled (skipped) annotations and empty results
give no sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.labelconfig import (
    ANY_TOOLS,
    WHOLE_IMAGE_ID,
    ConfigError,
    FillPlan,
    Region,
    TaskError,
    path_key,
    regions_from_context,
)

log = logging.getLogger(__name__)

ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED"})
# The project object carries its share token and task-data credentials; the store never needs them.
_PROJECT_SECRETS = frozenset({"token", "task_data_login", "task_data_password"})


class AnnotationError(ValueError):
    """An annotation that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class CorrectedRegion:
    """One region of a submitted annotation: where it is, what the annotator kept, what the model said.

    `caption`, `choices` (control name → chosen values) and `label` are the annotation's final values;
    `predicted` holds the same keys for what the model proposed (None when no prediction is known), a key
    being absent (or None) where the model proposed nothing for that field.
    """

    seq: int
    annotation_id: int
    task_id: str | None
    region_id: str
    image: str
    region: Region
    box: tuple[float, float, float, float]
    caption: str | None
    choices: dict[str, list[str]]
    label: str | None
    predicted: dict[str, Any] | None
    predicted_version: str | None
    created_at: float
    plan: FillPlan | None = None
    ground_truth: bool = False
    # The event whose content this is (`events.seq`): what Label Studio is asked about, and what its answer
    # is kept for; a later delivery of the annotation is another event and asked about anew.
    event_seq: int = 0
    # What Label Studio said of the annotation so far (`backend.confirmation`; None: not asked yet).
    confirmation: str | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The annotator's values in the shape of `predicted`."""
        return {"caption": self.caption, "choices": self.choices, "label": self.label}


@dataclass(frozen=True)
class Sample:
    """A region of an annotation, ready to be stored (`CorrectedRegion` without the store's bookkeeping)."""

    region_id: str
    region: Region
    caption: str | None
    choices: dict[str, list[str]]
    label: str | None


@dataclass(frozen=True)
class AnnotationSamples:
    """Everything an annotation contributes: its identity, its samples, and what the annotator was shown
    (`shown`: region id → proposed fields, and `shown_version`) when it started from a prediction; None
    when it did not, and the proposals must be looked up in what the workers recorded."""

    annotation_id: int
    task_id: str | None
    project_id: str | None
    image: str
    updated_at: str | None
    ground_truth: bool
    plan: FillPlan | None
    samples: tuple[Sample, ...]
    shown: dict[str, dict[str, Any]] | None = None
    shown_version: str | None = None


def parse_annotation_regions(result: Sequence[Any], plan: FillPlan | None) -> dict[str, dict[str, Any]]:
    """Group a Label Studio result (annotation or prediction) by region id.

    Returns region id → `{"region": Region | None, "caption", "choices", "label"}`. Regions of every shape
    are read with `backend.labelconfig` (a shape's region is its enclosing box); per-region TextArea,
    Choices and Taxonomy items (a Taxonomy's paths as `path_key`s) are matched to them by id, and those of
    the plan's whole-image controls make the whole-image region. With a fill plan only its controls count;
    without one every textarea, choices and taxonomy item does.
    """
    if not isinstance(result, Sequence) or isinstance(result, (str, bytes)):
        raise AnnotationError("an annotation's 'result' must be a list of result items")
    try:
        rectangles = regions_from_context(plan, {"result": list(result)}) if plan else _any_regions(result)
    except TaskError as exc:
        raise AnnotationError(str(exc)) from None
    fields: dict[str, dict[str, Any]] = {}
    for region in rectangles:
        label = region.labels[0] if region.labels else None
        fields[region.id] = {"region": dataclasses.replace(region, drawn=None), "caption": None, "choices": {},
                             "label": label}
    captions = set(plan.captions) | set(plan.image_captions) if plan else None
    choice_controls = {c.name for c in plan.choices + plan.image_choices} if plan else None
    whole_image = set(plan.image_captions) | {c.name for c in plan.image_choices} if plan else set()
    for item in result:
        if not isinstance(item, Mapping) or item.get("id") is None:
            continue
        name = str(item.get("from_name", ""))
        if name in whole_image and str(item["id"]) not in fields:
            # Label Studio gives each classification of the image an id of its own: they are one region.
            entry = fields.setdefault(WHOLE_IMAGE_ID, {"region": Region.whole_image(), "caption": None,
                                                       "choices": {}, "label": None})
        else:
            entry = fields.setdefault(str(item["id"]), {"region": None, "caption": None, "choices": {},
                                                        "label": None})
        value = item.get("value") if isinstance(item.get("value"), Mapping) else {}
        kind = str(item.get("type", "")).lower()
        if kind == "textarea" and (captions is None or name in captions):
            texts = [str(t).strip() for t in value.get("text") or [] if str(t).strip()]
            if texts:
                entry.setdefault("texts", {}).setdefault(name, " ".join(texts))
        elif kind == "choices" and (choice_controls is None or name in choice_controls):
            picked = [str(c) for c in value.get("choices") or []]
            if picked:
                entry["choices"][name] = picked
        elif kind == "taxonomy" and (choice_controls is None or name in choice_controls):
            paths = [path_key(p) for p in value.get("taxonomy") or [] if isinstance(p, list) and p]
            if paths:
                entry["choices"][name] = paths
    for entry in fields.values():
        texts = entry.pop("texts", {})
        # A region's text is that of its TextAreas of the kind the model is asked (a description or the
        # text written in it); without a plan, any TextArea's.
        names = plan.text_controls(entry["region"]) if plan and entry["region"] is not None else tuple(texts)
        entry["caption"] = next((texts[name] for name in names if name in texts), None)
    return fields


def samples_from_annotation(event: Mapping[str, Any], annotation: Mapping[str, Any]) -> AnnotationSamples | None:
    """The samples of one annotation of a webhook `event`; None when it contributes none (cancelled, empty,
    no rectangle, or a task without an image reference)."""
    annotation_id = int_or_none(annotation.get("id"))
    if annotation_id is None:
        raise AnnotationError("the annotation has no integer 'id'")
    result = annotation.get("result") or []
    if annotation.get("was_cancelled") or not result:
        return None
    project = event.get("project") if isinstance(event.get("project"), Mapping) else {}
    task = event.get("task") if isinstance(event.get("task"), Mapping) else {}
    task_id = text_or_none(task.get("id") if task else annotation.get("task"))
    plan = plan_of(project.get("label_config"))
    image = image_reference(plan, task)
    if image is None:
        log.warning("annotation %s of task %s: no image reference in the task data; not stored", annotation_id,
                    task_id)
        return None
    samples = [Sample(region_id, entry["region"], entry["caption"], entry["choices"], entry["label"])
               for region_id, entry in parse_annotation_regions(result, plan).items() if entry["region"] is not None]
    if not samples:
        return None
    return AnnotationSamples(
        annotation_id=annotation_id, task_id=task_id,
        project_id=text_or_none(project.get("id") or annotation.get("project")), image=image,
        updated_at=text_or_none(annotation.get("updated_at")), ground_truth=bool(annotation.get("ground_truth")),
        plan=plan, samples=tuple(samples), **_shown_prediction(annotation, plan))


def _shown_prediction(annotation: Mapping[str, Any], plan: FillPlan | None) -> dict[str, Any]:
    shown = annotation.get("prediction")
    if not (isinstance(shown, Mapping) and isinstance(shown.get("result"), list) and shown["result"]):
        return {}
    parsed = parse_annotation_regions(shown["result"], plan)
    return {"shown": {rid: {k: e[k] for k in ("caption", "choices", "label")} for rid, e in parsed.items()},
            "shown_version": text_or_none(shown.get("model_version"))}


def _any_regions(result: Sequence[Any]) -> list[Region]:
    # Without a labeling config, any region of any shape on any image is a region.
    names = {str(item.get("to_name")) for item in result if isinstance(item, Mapping)
             and any(plan_tool.type == str(item.get("type", "")).lower() for plan_tool in ANY_TOOLS)}
    regions: list[Region] = []
    for name in sorted(names):
        plan = FillPlan(image=name, image_key=None, image_constant=None, tools=ANY_TOOLS)
        regions += regions_from_context(plan, {"result": [i for i in result if isinstance(i, Mapping)
                                                          and str(i.get("to_name")) == name]})
    return regions


def plan_of(label_config: Any) -> FillPlan | None:
    """The fill plan of a project's labeling config, or None when there is none the backend can fill."""
    if not isinstance(label_config, str) or not label_config.strip():
        return None
    try:
        return FillPlan.from_label_config(label_config)
    except ConfigError as exc:
        log.warning("corrections stored without a fill plan: %s", exc)
        return None


def image_reference(plan: FillPlan | None, task: Mapping[str, Any]) -> str | None:
    """The image a task's annotation is about: through the fill plan, else `data.image`, else the only text
    value of the task's data."""
    if plan is not None:
        with contextlib.suppress(TaskError):
            return plan.image_reference(task)
    data = task.get("data") if isinstance(task, Mapping) else None
    if not isinstance(data, Mapping):
        return None
    values = [v.strip() for v in data.values() if isinstance(v, str) and v.strip()]
    image = data.get("image")
    if isinstance(image, str) and image.strip():
        return image.strip()
    return values[0] if len(values) == 1 else None


def redacted(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event without the project's secrets (share token, task-data credentials)."""
    project = event.get("project")
    if not isinstance(project, Mapping) or not any(key in project for key in _PROJECT_SECRETS):
        return dict(event)
    clean = {k: ("***" if k in _PROJECT_SECRETS and v else v) for k, v in project.items()}
    return {**event, "project": clean}


# Ids are stored in 64-bit columns (SQLite's INTEGER, PostgreSQL's BIGINT).
_ID_RANGE = range(-(2**63), 2**63)


def int_or_none(value: Any) -> int | None:
    """`value` as an int that fits a 64-bit id (booleans, non-numbers and larger numbers: None)."""
    if isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number in _ID_RANGE else None


def text_or_none(value: Any) -> str | None:
    """`value` as text, None kept."""
    return None if value is None else str(value)
