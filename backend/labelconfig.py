"""What the backend fills in a Label Studio project, and the results it sends back.

From the labeling config (`FillPlan.from_label_config`): the Image, its rectangle tool (Rectangle or
RectangleLabels), the per-region TextAreas (generated captions) and the per-region Choices (closed-set
scoring of their values). From a request: the regions to describe (`regions_from_context`,
`regions_from_task`). From the worker's answers: Label Studio results in the per-region format (one id
shared by the rectangle and its caption and choices, percent coordinates), checked with
`LabelInterface.validate_prediction` before they leave (`build_prediction`).

Pure Python on purpose: the API process uses it and must not import torch. It is one module because the
plan, the regions and the prediction are one vocabulary: what the config asks for decides which questions a
region gets and how their answers become Label Studio results.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from backend.calibration import task_score

RECTANGLE_TAGS = ("Rectangle", "RectangleLabels")
RECTANGLE_TYPES = ("rectangle", "rectanglelabels")
# The data key of files imported as they are (`settings.DATA_UNDEFINED_NAME` in Label Studio).
UNDEFINED_DATA_KEY = "$undefined$"
# A rectangle must show at least this much of the image (normalized, per side) to be described at all.
MIN_VISIBLE = 1e-4


class ConfigError(ValueError):
    """The labeling config has nothing this backend can fill (no Image, no rectangle tool, bad XML)."""


class TaskError(ValueError):
    """A task or interactive context does not have the shape Label Studio sends."""


class PredictionInvalid(ValueError):
    """A built prediction was rejected by `LabelInterface.validate_prediction`."""

    def __init__(self, errors: Sequence[str]):
        super().__init__("prediction rejected by the labeling config: " + "; ".join(errors))
        self.errors = list(errors)


@dataclass(frozen=True)
class ChoiceControl:
    """A per-region Choices control: its name is the attribute asked about, its values the candidates."""

    name: str
    candidates: tuple[str, ...]
    multiple: bool


@dataclass(frozen=True)
class FillPlan:
    """Which controls of a labeling config the backend fills for every rectangle."""

    image: str
    image_key: str | None
    image_constant: str | None
    rectangle: str
    rectangle_type: str
    labels: tuple[str, ...]
    captions: tuple[str, ...]
    choices: tuple[ChoiceControl, ...]

    @classmethod
    def from_label_config(cls, label_config: str) -> FillPlan:
        """Read a labeling config; raises `ConfigError` with the reason when it cannot be filled."""
        return _plan_cached(label_config)

    def check_limits(self, max_candidates: int, max_name_length: int, max_controls: int | None = None,
                     max_region_candidates: int | None = None) -> None:
        """Raise `ConfigError` when a control has more candidate values than `max_candidates`, a name or value
        is longer than `max_name_length`, or one region would be asked more than `max_controls` questions or
        scored against more than `max_region_candidates` values in all (each value is a question to the model,
        per region)."""
        controls = [(c.name, c.candidates) for c in self.choices]
        if self.labels:
            controls.append((self.rectangle, self.labels))
        for name, candidates in controls:
            if len(candidates) > max_candidates:
                raise ConfigError(f"control {_clip(name)!r} has {len(candidates)} values, more than "
                                  f"MAX_CHOICES_PER_CONTROL={max_candidates}")
        per_region = len(self.captions) + len(controls)
        if max_controls is not None and per_region > max_controls:
            raise ConfigError(f"the labeling config fills {per_region} controls per region, more than "
                              f"MAX_CONTROLS_PER_REGION={max_controls}")
        total = sum(len(candidates) for _, candidates in controls)
        if max_region_candidates is not None and total > max_region_candidates:
            raise ConfigError(f"the labeling config gives each region {total} values to score, more than "
                              f"MAX_CANDIDATES_PER_REGION={max_region_candidates}")
        names = [self.image, self.rectangle, *self.captions, *(n for n, c in controls for n in (n, *c))]
        for name in names:
            if len(name) > max_name_length:
                raise ConfigError(f"the labeling config names {_clip(name)!r}, longer than "
                                  f"MAX_NAME_LENGTH={max_name_length} characters")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for a job payload."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FillPlan:
        """Inverse of `to_json`."""
        return cls(
            image=data["image"],
            image_key=data["image_key"],
            image_constant=data["image_constant"],
            rectangle=data["rectangle"],
            rectangle_type=data["rectangle_type"],
            labels=tuple(data["labels"]),
            captions=tuple(data["captions"]),
            choices=tuple(ChoiceControl(c["name"], tuple(c["candidates"]), bool(c["multiple"]))
                          for c in data["choices"]),
        )

    def image_reference(self, task: Mapping[str, Any]) -> str:
        """The image URL or path of a task (`task.data[<Image value>]`)."""
        if self.image_constant is not None:
            return self.image_constant
        data = task.get("data")
        if not isinstance(data, Mapping):
            raise TaskError(f"task {task.get('id')!r} has no 'data' object")
        # A file imported as it is (an uploaded image) sits under Label Studio's placeholder key until Label
        # Studio's own serializers rename it after the one object of the labeling config.
        reference = data.get(self.image_key, data.get(UNDEFINED_DATA_KEY))
        if not isinstance(reference, str) or not reference.strip():
            raise TaskError(
                f"task {task.get('id')!r} has no image: data[{self.image_key!r}] should be the image URL "
                f"(Image tag {self.image!r} reads ${self.image_key})")
        return reference.strip()


@dataclass(frozen=True)
class Region:
    """One rectangle to describe, in Label Studio's terms (percent of the image, top-left corner)."""

    id: str
    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0
    original_width: int | None = None
    original_height: int | None = None
    image_rotation: float = 0.0
    labels: tuple[str, ...] = ()
    drawn: dict[str, Any] | None = field(default=None, compare=False)

    def box(self) -> tuple[float, float, float, float]:
        """Normalized xyxy for the model: the axis-aligned hull of the (possibly rotated) rectangle, clamped
        to the image. Boxes too small for the model are widened by the model itself
        (`model.gpt4roi.processing_gpt4roi.sanitize_boxes`), so there is one rule for that."""
        x1, y1, x2, y2 = self._bounds()
        return (_clamp(x1), _clamp(y1), _clamp(x2), _clamp(y2))

    def _bounds(self) -> tuple[float, float, float, float]:
        x, y, w, h = self.x / 100, self.y / 100, self.width / 100, self.height / 100
        if not self.rotation:
            return (x, y, x + w, y + h)
        # Label Studio rotates around the top-left corner, in pixel space (y down); without the image
        # size the image is treated as square.
        sx = float(self.original_width or 1)
        sy = float(self.original_height or 1)
        theta = math.radians(self.rotation)
        cos, sin = math.cos(theta), math.sin(theta)
        xs, ys = [], []
        for dx, dy in ((0.0, 0.0), (w * sx, 0.0), (w * sx, h * sy), (0.0, h * sy)):
            xs.append(x + (dx * cos - dy * sin) / sx)
            ys.append(y + (dx * sin + dy * cos) / sy)
        return (min(xs), min(ys), max(xs), max(ys))

    def geometry(self) -> dict[str, float]:
        """The `value` geometry keys Label Studio stores for this region."""
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height,
                "rotation": self.rotation}

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for a job payload."""
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Region:
        """Inverse of `to_json`."""
        values = dict(data)
        values["labels"] = tuple(values.get("labels", ()))
        return cls(**values)


def regions_from_context(plan: FillPlan, context: Mapping[str, Any]) -> list[Region]:
    """Drawn rectangles of an interactive request (`params.context.result`), kept verbatim for the echo."""
    items = context.get("result")
    if items is None:
        return []
    if not isinstance(items, list):
        raise TaskError("params.context.result must be a list of regions")
    return _rectangles(plan, items, keep_drawn=True)


def regions_from_task(plan: FillPlan, task: Mapping[str, Any]) -> list[Region]:
    """Rectangles of a task's newest non-cancelled annotation that has any, else of its newest prediction
    that has any (for example a detector's boxes imported as predictions)."""
    for key in ("annotations", "predictions"):
        entries = task.get(key) or []
        if not isinstance(entries, list):
            raise TaskError(f"task {task.get('id')!r}: '{key}' must be a list")
        candidates = [e for e in entries if isinstance(e, Mapping) and not e.get("was_cancelled")]
        candidates.sort(key=lambda e: str(e.get("updated_at") or e.get("created_at") or ""), reverse=True)
        for entry in candidates:
            result = entry.get("result")
            if isinstance(result, list):
                regions = _rectangles(plan, result, keep_drawn=False)
                if regions:
                    return regions
    return []


def _rectangles(plan: FillPlan, items: list[Any], *, keep_drawn: bool) -> list[Region]:
    regions: list[Region] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        if not isinstance(item, Mapping) or str(item.get("type", "")).lower() not in RECTANGLE_TYPES:
            continue
        if item.get("to_name") not in (None, plan.image):
            continue
        value = item.get("value")
        if not isinstance(value, Mapping):
            raise TaskError(f"region {index}: 'value' must be an object with x, y, width, height")
        try:
            x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
            rotation = float(value.get("rotation") or 0.0)
        except (KeyError, TypeError, ValueError):
            raise TaskError(f"region {index}: value needs numeric x, y, width and height (percent)") from None
        if not all(math.isfinite(v) for v in (x, y, w, h, rotation)):
            raise TaskError(f"region {index}: coordinates must be finite numbers")
        if w <= 0 or h <= 0:
            raise TaskError(f"region {index}: width and height must be positive, got {w} x {h}")
        region_id = str(item.get("id") or f"r{index + 1}")
        while region_id in seen:
            region_id += "_"
        seen.add(region_id)
        labels = value.get("rectanglelabels") or value.get("labels") or ()
        region = Region(
            id=region_id, x=x, y=y, width=w, height=h, rotation=rotation,
            original_width=_positive_int(item.get("original_width")),
            original_height=_positive_int(item.get("original_height")),
            image_rotation=float(item.get("image_rotation") or 0.0),
            labels=tuple(str(label) for label in labels) if isinstance(labels, list) else (),
            drawn=dict(item) if keep_drawn else None,
        )
        x1, y1, x2, y2 = region.box()
        if x2 - x1 < MIN_VISIBLE or y2 - y1 < MIN_VISIBLE:
            raise TaskError(f"region {index} lies outside the image (x={x}, y={y}, width={w}, height={h} percent)")
        regions.append(region)
    return regions


def select_choices(distribution: Mapping[str, float], multiple: bool) -> list[str]:
    """The choices proposed from a normalized distribution: the most likely one, and for a multiple-choice
    control also every other candidate more likely than chance (1 / number of candidates)."""
    if not distribution:
        return []
    ranked = sorted(distribution.items(), key=lambda kv: kv[1], reverse=True)
    if not multiple:
        return [ranked[0][0]]
    chance = 1.0 / len(ranked)
    return [name for i, (name, p) in enumerate(ranked) if i == 0 or p > chance]


@dataclass(frozen=True)
class Proposal:
    """What the backend proposes for one region from a worker's answer: the caption, per Choices control the
    chosen values with the probability of the first, and the label with its probability."""

    caption: str | None
    choices: dict[str, tuple[list[str], float]]
    label: tuple[str, float] | None


def propose(plan: FillPlan, region: Region, answer: Mapping[str, Any], keep_drawn_label: bool = True) -> Proposal:
    """The one rule turning a worker's answer (`caption`, `choices` distributions per control, `label`
    distribution) into what is proposed: `select_choices` per control; a label only where `wants_label`."""
    choices: dict[str, tuple[list[str], float]] = {}
    distributions = answer.get("choices") or {}
    for control in plan.choices:
        distribution = distributions.get(control.name)
        if distribution:
            picked = select_choices(distribution, control.multiple)
            choices[control.name] = (picked, float(distribution[picked[0]]))
    label = None
    label_distribution = answer.get("label")
    if label_distribution and wants_label(plan, region, keep_drawn_label):
        best = select_choices(label_distribution, multiple=False)[0]
        label = (best, float(label_distribution[best]))
    return Proposal(answer.get("caption") if plan.captions else None, choices, label)


def predicted_fields(plan: FillPlan, region: Region, answer: Mapping[str, Any],
                     keep_drawn_label: bool = True) -> dict[str, Any]:
    """What a worker answer proposes for one region, as plain fields (the shape annotations are compared
    in): `caption`, `choices` (control → chosen values), `label` (None where nothing is proposed)."""
    proposal = propose(plan, region, answer, keep_drawn_label)
    return {"caption": proposal.caption, "choices": {name: picked for name, (picked, _) in proposal.choices.items()},
            "label": proposal.label[0] if proposal.label else None}


def build_prediction(
    plan: FillPlan,
    regions: Sequence[Region],
    answers: Sequence[Mapping[str, Any]],
    model_version: str,
    image_size: tuple[int, int] | None = None,
    keep_drawn_label: bool = True,
) -> dict[str, Any]:
    """One Label Studio prediction (`{"result", "score", "model_version"}`) from the worker's answers.

    `answers[i]` belongs to `regions[i]` and holds `caption` (text or None), `choices` (control name →
    distribution over its values) and `label` (distribution over the RectangleLabels values, or None).
    A drawn region is echoed with its id, geometry and its annotator's label (unless `keep_drawn_label` is
    false or it has none).

    Scores (`backend.calibration`): every proposed field's result item carries its confidence as `score`
    (the answer's calibrated `confidence`, or else the raw probability of the chosen value), and the
    prediction's `score` is the probability that the annotator keeps all of it (`task_score`), so that
    sorting tasks by it puts the least certain first. A prediction with no field to be sure of scores 0.
    """
    if len(answers) != len(regions):
        raise ValueError(f"{len(answers)} answers for {len(regions)} regions")
    result: list[dict[str, Any]] = []
    scores: list[float] = []
    for region, answer in zip(regions, answers, strict=True):
        proposal = propose(plan, region, answer, keep_drawn_label)
        confidence = answer.get("confidence") or {}
        if proposal.label is not None and confidence.get("label") is not None:
            proposal = dataclasses.replace(proposal, label=(proposal.label[0], float(confidence["label"])))
        common = {
            "id": region.id,
            "to_name": plan.image,
            "original_width": region.original_width or (image_size[0] if image_size else None),
            "original_height": region.original_height or (image_size[1] if image_size else None),
            "image_rotation": region.image_rotation,
        }
        common = {k: v for k, v in common.items() if v is not None}
        rectangle = _rectangle_item(plan, region, common, proposal.label)
        if proposal.label is not None and "score" in rectangle:
            scores.append(proposal.label[1])
        result.append(rectangle)
        if proposal.caption is not None:
            caption_confidence = confidence.get("caption")
            for name in plan.captions:
                item = {**common, "from_name": name, "type": "textarea",
                        "value": {**region.geometry(), "text": [proposal.caption]}}
                if caption_confidence is not None:
                    item["score"] = round(float(caption_confidence), 6)
                result.append(item)
            if caption_confidence is not None:
                scores.append(float(caption_confidence))
        for control in plan.choices:
            if control.name not in proposal.choices:
                continue
            picked, probability = proposal.choices[control.name]
            probability = float((confidence.get("choices") or {}).get(control.name, probability))
            scores.append(probability)
            result.append({**common, "from_name": control.name, "type": "choices", "score": round(probability, 6),
                           "value": {**region.geometry(), "choices": picked}})
    score = task_score(scores) if regions and scores else 0.0
    return {"result": result, "score": round(score, 6), "model_version": model_version}


def _rectangle_item(plan: FillPlan, region: Region, common: dict[str, Any],
                    label: tuple[str, float] | None) -> dict[str, Any]:
    if region.drawn is not None:
        item = dict(region.drawn)
        item["value"] = dict(item.get("value") or {})
    else:
        item = {**common, "from_name": plan.rectangle, "type": plan.rectangle_type,
                "value": region.geometry()}
    if label is not None and item.get("type") == "rectanglelabels":
        item["value"]["rectanglelabels"] = [label[0]]
        item["score"] = round(label[1], 6)
    return item


def wants_label(plan: FillPlan, region: Region, keep_drawn_label: bool) -> bool:
    """Whether the model should score a label for this region."""
    if plan.rectangle_type != "rectanglelabels" or not plan.labels:
        return False
    return not (keep_drawn_label and region.drawn is not None and region.labels)


def validate_prediction(label_config: str, prediction: Mapping[str, Any]) -> None:
    """Raise `PredictionInvalid` unless Label Studio's own validator accepts the prediction."""
    errors = _interface(label_config).validate_prediction(dict(prediction), return_errors=True)
    if errors:
        raise PredictionInvalid(errors)


@functools.lru_cache(maxsize=64)
def _interface(label_config: str) -> LabelInterface:
    try:
        return LabelInterface(label_config)
    except Exception as exc:
        raise ConfigError(f"the labeling config cannot be parsed: {exc}") from None


@functools.lru_cache(maxsize=64)
def _plan_cached(label_config: str) -> FillPlan:
    if not isinstance(label_config, str) or not label_config.strip():
        raise ConfigError("the labeling config is empty")
    interface = _interface(label_config)
    images = [obj for obj in interface.objects if obj.tag == "Image"]
    if not images:
        raise ConfigError("the labeling config has no <Image> tag; this backend describes image regions")
    controls = list(interface.controls)
    for image in images:
        rectangles = [c for c in controls if c.tag in RECTANGLE_TAGS and image.name in c.to_name]
        if not rectangles:
            continue
        rect = rectangles[0]
        per_region = [c for c in controls
                      if image.name in c.to_name and str(c.attr.get("perRegion", "")).lower() == "true"]
        value = str(image.value or "")
        return FillPlan(
            image=image.name,
            image_key=value[1:] if value.startswith("$") else None,
            image_constant=None if value.startswith("$") else value,
            rectangle=rect.name,
            rectangle_type=rect.tag.lower(),
            labels=tuple(getattr(rect, "labels", None) or ()),
            captions=tuple(c.name for c in per_region if c.tag == "TextArea"),
            choices=tuple(ChoiceControl(c.name, tuple(c.labels), c.attr.get("choice") == "multiple")
                          for c in per_region if c.tag == "Choices" and c.labels),
        )
    raise ConfigError(
        "the labeling config has no <Rectangle> or <RectangleLabels> tool on an <Image>; "
        "the backend needs boxes to describe")


def _clip(text: str, length: int = 40) -> str:
    return text if len(text) <= length else text[:length] + "…"


def _clamp(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
