"""What the backend fills in a Label Studio project, and the results it sends back.

From the labeling config (`FillPlan.from_label_config`): the Image, its region tools (rectangles, polygons,
ellipses, keypoints, brush masks; `backend.regions`) with the labels scored for them (their own, or those of
a separate Labels control), the per-region TextAreas (generated captions) and Choices (closed-set scoring of
their values), and the TextAreas and Choices about the whole image (its region is the whole image). From a
request: the regions to describe (`regions_from_context`, `regions_from_task`). From the worker's answers:
Label Studio results in the per-region format (one id shared by the region as drawn and its label, caption
and choices, percent coordinates; whole-image results carry no geometry), checked with
`LabelInterface.validate_prediction` before they leave (`build_prediction`).

Pure Python on purpose: the API process uses it and must not import torch. It is one module because the
plan, the regions and the prediction are one vocabulary: what the config asks for decides which questions a
region gets and how their answers become Label Studio results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from label_studio_sdk.label_interface import LabelInterface
from lxml import etree

from backend.calibration import task_score
from backend.regions import (
    DEFAULT_KEYPOINT_BOX,
    SHAPE_OF_TAG,
    SHAPE_OF_TYPE,
    ShapeError,
    enclosing_box,
    geometry,
)
from model.engine import CAPTION, TRANSCRIPTION

RECTANGLE_TAGS = ("Rectangle", "RectangleLabels")
RECTANGLE_TYPES = ("rectangle", "rectanglelabels")
# The id of the region that is the whole image (the one TextAreas and Choices not drawn per region are about).
WHOLE_IMAGE_ID = "image"
WHOLE_IMAGE = "image"
# The data key of files imported as they are (`settings.DATA_UNDEFINED_NAME` in Label Studio).
UNDEFINED_DATA_KEY = "$undefined$"
# A rectangle must show at least this much of the image (normalized, per side) to be described at all.
MIN_VISIBLE = 1e-4


class ConfigError(ValueError):
    """The labeling config has nothing this backend can fill (no Image, nothing on it to fill, bad XML)."""


class TaskError(ValueError):
    """A task or interactive context does not have the shape Label Studio sends."""


class PredictionInvalid(ValueError):
    """A built prediction was rejected by `LabelInterface.validate_prediction`."""

    def __init__(self, errors: Sequence[str]):
        super().__init__("prediction rejected by the labeling config: " + "; ".join(errors))
        self.errors = list(errors)


# A Taxonomy's tree: (value, children) per node, children in the same shape.
TaxonomyTree = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class ChoiceControl:
    """A Choices or Taxonomy control: its name is the attribute asked about, its values the candidates.

    A Taxonomy has a `tree` and is scored level by level down it (the best value of each level decides which
    children are asked next); its candidates are the paths from the root, each one written as `path_key`."""

    name: str
    candidates: tuple[str, ...]
    multiple: bool
    tree: TaxonomyTree = ()

    @property
    def kind(self) -> str:
        """The result type Label Studio writes for this control."""
        return "taxonomy" if self.tree else "choices"

    @property
    def widest(self) -> int:
        """The most values the model is asked to choose between at once."""
        return _widest(self.tree) if self.tree else len(self.candidates)

    @property
    def cost(self) -> int:
        """The most values scored for one region (for a Taxonomy, along its most expensive path)."""
        return _path_cost(self.tree) if self.tree else len(self.candidates)

    @property
    def values(self) -> tuple[str, ...]:
        """Every value as written in the config (the nodes of a Taxonomy)."""
        return tuple(_node_values(self.tree)) if self.tree else self.candidates

    def result_value(self, picked: Sequence[str]) -> dict[str, Any]:
        """The `value` key Label Studio stores for these picked candidates."""
        if self.tree:
            return {"taxonomy": [path_of(key) for key in picked]}
        return {"choices": list(picked)}


def path_key(path: Sequence[str]) -> str:
    """One Taxonomy path as a candidate: the values from the root, as a JSON list (any value may hold any
    separator a plain join would use)."""
    return json.dumps([str(value) for value in path], ensure_ascii=False)


def path_of(key: str) -> list[str]:
    """Inverse of `path_key`."""
    return [str(value) for value in json.loads(key)]


@dataclass(frozen=True)
class Tool:
    """A region tool on the Image: its name, the result `type` it writes, the labels scored for its regions
    and, when those belong to a separate Labels control, that control's name (the label is then a result
    item of its own, of type `labels`). Labels read from the task data are known per task (`for_task`)."""

    name: str
    type: str
    labels: tuple[str, ...] = ()
    labels_control: str | None = None
    # Labels that come from each task's data (`value="$objects"`): the data key they are read from.
    labels_key: str | None = None
    # A smart KeyPoint tool (`smart="true"` or `smartOnly="true"`): its points ask for the region found there.
    smart: bool = False

    @property
    def shape(self) -> str:
        return SHAPE_OF_TYPE[self.type]


# Without a labeling config (corrections of an unknown project) any region of any shape is read.
ANY_TOOLS = tuple(Tool("", kind) for kind in SHAPE_OF_TYPE)


@dataclass(frozen=True)
class FillPlan:
    """Which controls of a labeling config the backend fills: for every drawn region (`tools`, `captions`,
    `choices`) and for the whole image (`image_captions`, `image_choices`)."""

    image: str
    image_key: str | None
    image_constant: str | None
    tools: tuple[Tool, ...]
    captions: tuple[str, ...] = ()
    choices: tuple[ChoiceControl, ...] = ()
    image_captions: tuple[str, ...] = ()
    image_choices: tuple[ChoiceControl, ...] = ()
    # The TextAreas (of `captions` and `image_captions`) that hold the text written in a region (`is_transcription`).
    transcriptions: tuple[str, ...] = ()
    # Per-region controls shown only for some regions (`visibleWhen="region-selected"`): (control name,
    # "label" or "tag", the label value or the labels control's name).
    conditions: tuple[tuple[str, str, str], ...] = ()

    @property
    def rectangle(self) -> str:
        """The first rectangle tool's name (else the first tool's; "" without tools)."""
        return self._first_tool().name if self.tools else ""

    @property
    def rectangle_type(self) -> str:
        """The result type of `rectangle`."""
        return self._first_tool().type if self.tools else ""

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels of the first tool that has any."""
        return next((t.labels for t in self.tools if t.labels), ())

    def _first_tool(self) -> Tool:
        return next((t for t in self.tools if t.shape == "rectangle"), self.tools[0])

    def tool_for(self, name: Any, kind: str) -> Tool | None:
        """The tool a result item of `from_name` `name` and `type` `kind` was drawn with: the one of that
        name, else the first of the same shape; None when the plan has no tool of that shape."""
        shape = SHAPE_OF_TYPE.get(kind)
        same_shape = [t for t in self.tools if t.shape == shape]
        return next((t for t in same_shape if t.name == name), same_shape[0] if same_shape else None)

    def labels_for(self, region: Region) -> tuple[str, ...]:
        """The labels scored for a region (none for the whole image)."""
        if region.shape == WHOLE_IMAGE:
            return ()
        tool = self.tool_for(region.tool, region.type)
        return tool.labels if tool else ()

    def captions_for(self, region: Region) -> tuple[str, ...]:
        """The TextAreas filled for a region."""
        return self.image_captions if region.shape == WHOLE_IMAGE else self.captions

    def choices_for(self, region: Region) -> tuple[ChoiceControl, ...]:
        """The Choices and Taxonomy controls scored for a region."""
        return self.image_choices if region.shape == WHOLE_IMAGE else self.choices

    @property
    def proposal_tool(self) -> Tool | None:
        """The tool regions are proposed for: the first rectangle or polygon tool that has labels, else the
        first without; None when there is none."""
        usable = [tool for tool in self.tools if tool.shape in ("rectangle", "polygon")]
        return next((tool for tool in usable if tool.labels), usable[0] if usable else None)

    def is_prompt(self, region: Region) -> bool:
        """Whether a drawn region is a prompt rather than a region to describe: a point placed with a smart
        KeyPoint tool in a config whose regions are boxes or polygons (the region found there is the answer)."""
        tool = self.tool_for(region.tool, region.type)
        return (region.shape == "keypoint" and tool is not None and tool.smart
                and self.proposal_tool is not None)

    def text_kind(self, region: Region) -> str:
        """What a region's TextAreas are asked: the text written in it when they all hold transcriptions,
        else a description (and then only the description TextAreas are filled)."""
        names = self.captions_for(region)
        return TRANSCRIPTION if names and set(names) <= set(self.transcriptions) else CAPTION

    def text_controls(self, region: Region) -> tuple[str, ...]:
        """The TextAreas of a region that are of its `text_kind`."""
        transcribed = self.text_kind(region) == TRANSCRIPTION
        return tuple(name for name in self.captions_for(region) if (name in self.transcriptions) == transcribed)

    def shown_captions(self, region: Region, label: str | None) -> tuple[str, ...]:
        """The TextAreas filled for a region labelled `label` (None: it has no label): those of its
        `text_kind` that Label Studio shows for it."""
        return tuple(name for name in self.text_controls(region) if self.visible(name, region, label))

    def shown_choices(self, region: Region, label: str | None) -> tuple[ChoiceControl, ...]:
        """The Choices and Taxonomy controls Label Studio shows for a region labelled `label`."""
        return tuple(c for c in self.choices_for(region) if self.visible(c.name, region, label))

    def visible(self, control: str, region: Region, label: str | None) -> bool:
        """Whether Label Studio shows the per-region `control` for a region labelled `label`."""
        condition = next(((kind, value) for name, kind, value in self.conditions if name == control), None)
        if condition is None or region.shape == WHOLE_IMAGE:
            return True
        kind, value = condition
        if label is None:
            return False
        if kind == "label":
            return label == value
        tool = self.tool_for(region.tool, region.type)
        return tool is not None and (tool.labels_control or tool.name) == value

    def control(self, name: str) -> ChoiceControl | None:
        """The Choices or Taxonomy control of that name."""
        return next((c for c in self.choices + self.image_choices if c.name == name), None)

    @property
    def fills_whole_image(self) -> bool:
        return bool(self.image_captions or self.image_choices)

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
        labelled = {t.labels_control or t.name: t.labels for t in self.tools if t.labels}
        region_controls = [(c.name, c.values, c.widest) for c in self.choices]
        region_controls += [(name, labels, len(labels)) for name, labels in labelled.items()]
        image_controls = [(c.name, c.values, c.widest) for c in self.image_choices]
        for name, _, widest in region_controls + image_controls:
            if widest > max_candidates:
                raise ConfigError(f"control {_clip(name)!r} has {widest} values, more than "
                                  f"MAX_CHOICES_PER_CONTROL={max_candidates}")
        # A region of one tool is asked about its own labels only, so the largest label set counts.
        largest_labels = max((len(labels) for labels in labelled.values()), default=0)
        per_region = max(len(self.captions) + len(self.choices) + (1 if labelled else 0),
                         len(self.image_captions) + len(self.image_choices))
        if max_controls is not None and per_region > max_controls:
            raise ConfigError(f"the labeling config fills {per_region} controls per region, more than "
                              f"MAX_CONTROLS_PER_REGION={max_controls}")
        total = max(sum(c.cost for c in self.choices) + largest_labels, sum(c.cost for c in self.image_choices))
        if max_region_candidates is not None and total > max_region_candidates:
            raise ConfigError(f"the labeling config gives each region {total} values to score, more than "
                              f"MAX_CANDIDATES_PER_REGION={max_region_candidates}")
        names = [self.image, *(t.name for t in self.tools), *self.captions, *self.image_captions,
                 *(n for n, c, _ in region_controls + image_controls for n in (n, *c))]
        for name in names:
            if len(name) > max_name_length:
                raise ConfigError(f"the labeling config names {_clip(name)!r}, longer than "
                                  f"MAX_NAME_LENGTH={max_name_length} characters")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for a job payload."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FillPlan:
        """Inverse of `to_json` (also of the earlier rectangle-only plans that jobs queued before an upgrade
        carry)."""
        if "tools" in data:
            tools = tuple(Tool(t["name"], t["type"], tuple(t.get("labels") or ()), t.get("labels_control"),
                               t.get("labels_key"), bool(t.get("smart"))) for t in data["tools"])
        else:
            tools = (Tool(data["rectangle"], data["rectangle_type"], tuple(data["labels"])),)
        return cls(
            image=data["image"],
            image_key=data["image_key"],
            image_constant=data["image_constant"],
            tools=tools,
            captions=tuple(data["captions"]),
            choices=_choice_controls(data["choices"]),
            image_captions=tuple(data.get("image_captions") or ()),
            image_choices=_choice_controls(data.get("image_choices") or ()),
            transcriptions=tuple(data.get("transcriptions") or ()),
            conditions=tuple((str(n), str(k), str(v)) for n, k, v in data.get("conditions") or ()),
        )

    def for_task(self, task: Mapping[str, Any], max_labels: int) -> FillPlan:
        """The plan for one task: tools whose labels come from the task data (`value="$objects"`, a list of
        `{"value": …}` as Label Studio reads it) get that task's labels. Raises `TaskError` when they are
        missing, malformed or more than `max_labels`."""
        if not any(t.labels_key for t in self.tools):
            return self
        data = task.get("data")
        tools = []
        for tool in self.tools:
            if tool.labels_key is None:
                tools.append(tool)
                continue
            listed = data.get(tool.labels_key) if isinstance(data, Mapping) else None
            labels = _task_labels(listed)
            if labels is None:
                raise TaskError(f"task {task.get('id')!r}: data[{tool.labels_key!r}] should list the labels of "
                                f"{tool.labels_control or tool.name!r} as [{{\"value\": \"…\"}}, …]")
            if len(labels) > max_labels:
                raise TaskError(f"task {task.get('id')!r}: data[{tool.labels_key!r}] lists {len(labels)} labels, "
                                f"more than MAX_CHOICES_PER_CONTROL={max_labels}")
            tools.append(dataclasses.replace(tool, labels=labels))
        return dataclasses.replace(self, tools=tuple(tools))

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
    """One region to describe, in Label Studio's terms (percent of the image, top-left corner).

    `x`, `y`, `width`, `height` (and `rotation`) are a rectangle's own geometry, or the enclosing box of any
    other shape (`backend.regions`), whose geometry as drawn is kept in `value` to be sent back unchanged.
    `type` is the result type it was drawn as (`rectangle`, `polygonlabels`, …; `image` for the whole image)
    and `tool` the tool's name."""

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
    type: str = "rectangle"
    tool: str = ""
    value: dict[str, Any] | None = None

    @classmethod
    def whole_image(cls, region_id: str = WHOLE_IMAGE_ID) -> Region:
        """The region that is the whole image."""
        return cls(region_id, 0.0, 0.0, 100.0, 100.0, type=WHOLE_IMAGE)

    @property
    def shape(self) -> str:
        """`rectangle`, `polygon`, `ellipse`, `keypoint`, `brush` or `image`."""
        return SHAPE_OF_TYPE.get(self.type, self.type)

    def box(self) -> tuple[float, float, float, float]:
        """Normalized xyxy for the model: the axis-aligned hull of the region (of the possibly rotated
        rectangle, or of the shape's enclosing box), clamped to the image. Boxes too small for the model are
        widened by the model itself (`model.gpt4roi.processing_gpt4roi.sanitize_boxes`), so there is one rule
        for that."""
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

    def geometry(self) -> dict[str, Any]:
        """The `value` geometry keys Label Studio stores for this region (none for the whole image)."""
        if self.shape == WHOLE_IMAGE:
            return {}
        if self.shape != "rectangle":
            return dict(self.value or {})
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


def regions_from_context(plan: FillPlan, context: Mapping[str, Any],
                         keypoint_box: float = DEFAULT_KEYPOINT_BOX) -> list[Region]:
    """Drawn regions of an interactive request (`params.context.result`), kept verbatim for the echo.
    `keypoint_box` is the side of a keypoint's box, in percent of the image's shorter side."""
    items = context.get("result")
    if items is None:
        return []
    if not isinstance(items, list):
        raise TaskError("params.context.result must be a list of regions")
    return _regions(plan, items, keep_drawn=True, keypoint_box=keypoint_box)


def regions_from_task(plan: FillPlan, task: Mapping[str, Any],
                      keypoint_box: float = DEFAULT_KEYPOINT_BOX) -> list[Region]:
    """Regions of a task's newest non-cancelled annotation that has any, else of its newest prediction
    that has any (for example a detector's boxes imported as predictions); and the whole image when the
    labeling config asks about it."""
    whole = [Region.whole_image()] if plan.fills_whole_image else []
    for key in ("annotations", "predictions"):
        entries = task.get(key) or []
        if not isinstance(entries, list):
            raise TaskError(f"task {task.get('id')!r}: '{key}' must be a list")
        candidates = [e for e in entries if isinstance(e, Mapping) and not e.get("was_cancelled")]
        candidates.sort(key=lambda e: str(e.get("updated_at") or e.get("created_at") or ""), reverse=True)
        for entry in candidates:
            result = entry.get("result")
            if isinstance(result, list):
                regions = _regions(plan, result, keep_drawn=False, keypoint_box=keypoint_box,
                                   taken={r.id for r in whole})
                if regions:
                    return regions + whole
    return whole


def _regions(plan: FillPlan, items: list[Any], *, keep_drawn: bool, keypoint_box: float,
             taken: set[str] | None = None) -> list[Region]:
    regions: list[Region] = []
    seen: set[str] = set(taken or ())
    # A tool drawn with a separate Labels control writes its label as an item of its own, with the region's id.
    separate_labels = {str(item.get("id")): item["value"].get("labels") for item in items
                       if isinstance(item, Mapping) and str(item.get("type", "")).lower() == "labels"
                       and isinstance(item.get("value"), Mapping)}
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            continue
        kind = str(item.get("type", "")).lower()
        tool = plan.tool_for(item.get("from_name"), kind) if kind in SHAPE_OF_TYPE else None
        if tool is None or item.get("to_name") not in (None, plan.image):
            continue
        value = item.get("value")
        if not isinstance(value, Mapping):
            raise TaskError(f"region {index}: 'value' must be an object with the region's geometry")
        width, height = _positive_int(item.get("original_width")), _positive_int(item.get("original_height"))
        shape = SHAPE_OF_TYPE[kind]
        if shape == "rectangle":
            x, y, w, h, rotation = _rectangle(index, value)
            drawn_value = None
        else:
            try:
                size = (width, height) if width and height else None
                x, y, w, h = enclosing_box(shape, value, size, keypoint_box)
            except ShapeError as exc:
                raise TaskError(f"region {index}: {exc}") from None
            rotation, drawn_value = 0.0, geometry(shape, value)
        region_id = str(item.get("id") or f"r{index + 1}")
        labels = value.get(kind) or value.get("labels") or separate_labels.get(str(item.get("id"))) or ()
        while region_id in seen:
            region_id += "_"
        seen.add(region_id)
        region = Region(
            id=region_id, x=x, y=y, width=w, height=h, rotation=rotation,
            original_width=width, original_height=height,
            image_rotation=float(item.get("image_rotation") or 0.0),
            labels=tuple(str(label) for label in labels) if isinstance(labels, list) else (),
            drawn=dict(item) if keep_drawn else None, type=kind, tool=tool.name, value=drawn_value,
        )
        x1, y1, x2, y2 = region.box()
        if x2 - x1 < MIN_VISIBLE or y2 - y1 < MIN_VISIBLE:
            raise TaskError(f"region {index} lies outside the image (x={x}, y={y}, width={w}, height={h} percent)")
        regions.append(region)
    return regions


def _rectangle(index: int, value: Mapping[str, Any]) -> tuple[float, float, float, float, float]:
    try:
        x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
        rotation = float(value.get("rotation") or 0.0)
    except (KeyError, TypeError, ValueError):
        raise TaskError(f"region {index}: value needs numeric x, y, width and height (percent)") from None
    if not all(math.isfinite(v) for v in (x, y, w, h, rotation)):
        raise TaskError(f"region {index}: coordinates must be finite numbers")
    if w <= 0 or h <= 0:
        raise TaskError(f"region {index}: width and height must be positive, got {w} x {h}")
    return x, y, w, h, rotation


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
    """What the backend proposes for one region from a worker's answer: the caption (and the TextAreas that
    show it), per Choices or Taxonomy control the chosen values with the probability of the first, and the
    label with its probability."""

    caption: str | None
    choices: dict[str, tuple[list[str], float]]
    label: tuple[str, float] | None
    caption_controls: tuple[str, ...] = ()


def propose(plan: FillPlan, region: Region, answer: Mapping[str, Any], keep_drawn_label: bool = True) -> Proposal:
    """The one rule turning a worker's answer (`caption`, `choices` distributions per control, `label`
    distribution) into what is proposed: `select_choices` per control; a label only where `wants_label`;
    only the controls Label Studio shows for the region's label (drawn or proposed)."""
    label = None
    label_distribution = answer.get("label")
    if label_distribution and wants_label(plan, region, keep_drawn_label):
        best = select_choices(label_distribution, multiple=False)[0]
        label = (best, float(label_distribution[best]))
    final_label = label[0] if label else (region.labels[0] if region.labels else None)
    choices: dict[str, tuple[list[str], float]] = {}
    distributions = answer.get("choices") or {}
    for control in plan.shown_choices(region, final_label):
        distribution = distributions.get(control.name)
        if distribution:
            picked = select_choices(distribution, control.multiple)
            choices[control.name] = (picked, float(distribution[picked[0]]))
    caption_controls = plan.shown_captions(region, final_label)
    caption = answer.get("caption") if caption_controls else None
    return Proposal(caption, choices, label, caption_controls if caption is not None else ())


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
        if region.shape == WHOLE_IMAGE:
            # Results about the whole image are classifications: no geometry, no image size.
            common: dict[str, Any] = {"id": region.id, "to_name": plan.image}
        else:
            common = {
                "id": region.id,
                "to_name": plan.image,
                "original_width": region.original_width or (image_size[0] if image_size else None),
                "original_height": region.original_height or (image_size[1] if image_size else None),
                "image_rotation": region.image_rotation,
            }
            common = {k: v for k, v in common.items() if v is not None}
            drawn_items = _region_items(plan, region, common, proposal.label)
            if proposal.label is not None and any("score" in item for item in drawn_items):
                scores.append(proposal.label[1])
            result.extend(drawn_items)
        geometry_keys = region.geometry()
        if proposal.caption is not None:
            caption_confidence = confidence.get("caption")
            for name in proposal.caption_controls:
                item = {**common, "from_name": name, "type": "textarea",
                        "value": {**geometry_keys, "text": [proposal.caption]}}
                if caption_confidence is not None:
                    item["score"] = round(float(caption_confidence), 6)
                result.append(item)
            if caption_confidence is not None:
                scores.append(float(caption_confidence))
        for control in plan.choices_for(region):
            if control.name not in proposal.choices:
                continue
            picked, probability = proposal.choices[control.name]
            probability = float((confidence.get("choices") or {}).get(control.name, probability))
            scores.append(probability)
            result.append({**common, "from_name": control.name, "type": control.kind,
                           "score": round(probability, 6), "value": {**geometry_keys, **control.result_value(picked)}})
    score = task_score(scores) if regions and scores else 0.0
    return {"result": result, "score": round(score, 6), "model_version": model_version}


def _region_items(plan: FillPlan, region: Region, common: dict[str, Any],
                  label: tuple[str, float] | None) -> list[dict[str, Any]]:
    """The region as drawn (its tool's item) and, for a tool labelled by a separate Labels control, its
    label item; the proposed label replaces the drawn one."""
    tool = plan.tool_for(region.tool, region.type)
    if region.drawn is not None:
        item = dict(region.drawn)
        item["value"] = dict(item.get("value") or {})
    else:
        kind = tool.type if tool else region.type
        item = {**common, "from_name": tool.name if tool else region.tool, "type": kind, "value": region.geometry()}
        if kind.endswith("labels") and region.labels:
            item["value"][kind] = list(region.labels)
    labels_control = tool.labels_control if tool else None
    if labels_control is None:
        kind = str(item.get("type", "")).lower()
        if label is not None and kind.endswith("labels") and kind in SHAPE_OF_TYPE:
            item["value"][kind] = [label[0]]
            item["score"] = round(label[1], 6)
        return [item]
    picked = [label[0]] if label is not None else list(region.labels)
    if not picked:
        return [item]
    labels_item = {**common, "from_name": labels_control, "type": "labels",
                   "value": {**region.geometry(), "labels": picked}}
    if label is not None:
        labels_item["score"] = round(label[1], 6)
    return [item, labels_item]


def wants_label(plan: FillPlan, region: Region, keep_drawn_label: bool) -> bool:
    """Whether the model should score a label for this region."""
    if not plan.labels_for(region):
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
    reasons: list[str] = []
    for image in images:
        plan = _plan_of_image(label_config, image, list(interface.controls), reasons)
        if plan is not None:
            return plan
    raise ConfigError("; ".join(dict.fromkeys(reasons)))


def _plan_of_image(label_config: str, image: Any, controls: list[Any], reasons: list[str]) -> FillPlan | None:
    value = str(image.value or "")
    if image.attr.get("valueList") is not None or not value:
        # valueList: a multi-page document shown one page at a time; a region belongs to one page.
        reasons.append(f"the <Image> {image.name!r} shows a list of pages (valueList), not one image; this "
                       "backend describes regions of single images")
        return None
    on_image = [c for c in controls if image.name in c.to_name]
    separate = next((c for c in on_image if c.tag == "Labels"), None)
    tools = []
    for control in on_image:
        if control.tag not in SHAPE_OF_TAG:
            continue
        # A smart KeyPoint tool's points are prompts (`is_prompt`); other smart tools draw regions as usual.
        smart = SHAPE_OF_TAG[control.tag] == "keypoint" and any(
            str(control.attr.get(key, "")).lower() == "true" for key in ("smart", "smartOnly"))
        if control.tag.endswith("Labels"):
            tools.append(Tool(control.name, control.tag.lower(), tuple(getattr(control, "labels", None) or ()),
                              labels_key=_data_key(control), smart=smart))
        else:
            tools.append(Tool(control.name, control.tag.lower(), tuple(separate.labels) if separate else (),
                              separate.name if separate else None, _data_key(separate) if separate else None,
                              smart))
    per_region = [c for c in on_image if str(c.attr.get("perRegion", "")).lower() == "true"]
    whole = [c for c in on_image if str(c.attr.get("perRegion", "")).lower() != "true"]
    trees = _taxonomy_trees(label_config, {c.name for c in on_image if c.tag == "Taxonomy"})
    plan = FillPlan(
        image=image.name,
        image_key=value[1:] if value.startswith("$") else None,
        image_constant=None if value.startswith("$") else value,
        tools=tuple(tools),
        captions=tuple(c.name for c in per_region if c.tag == "TextArea") if tools else (),
        choices=_choices_of(per_region, trees) if tools else (),
        image_captions=tuple(c.name for c in whole if c.tag == "TextArea"),
        image_choices=_choices_of(whole, trees),
        conditions=tuple(filter(None, map(_condition, per_region))) if tools else (),
    )
    plan = dataclasses.replace(plan, transcriptions=tuple(
        name for name in (*plan.captions, *plan.image_captions) if is_transcription(name)))
    if not tools and not plan.fills_whole_image:
        reasons.append(
            f"the labeling config has no region tool (Rectangle, Polygon, Ellipse, KeyPoint, Brush or their "
            f"Labels variants) and no TextArea or Choices on the <Image> {image.name!r}: nothing to fill")
        return None
    if not (plan.captions or plan.choices or plan.labels or plan.fills_whole_image
            or any(t.labels_key for t in tools)):
        reasons.append(f"nothing to fill on the <Image> {image.name!r}: its region tools have no labels, and "
                       "there is no TextArea or Choices to fill")
        return None
    return plan


_DESCRIPTION_WORDS = frozenset({"caption", "captions", "description", "describe", "desc", "comment", "note", "notes"})
_TRANSCRIPTION_WORDS = frozenset({"transcription", "transcriptions", "transcript", "transcribed", "ocr", "text"})


def is_transcription(name: str) -> bool:
    """Whether a TextArea's name asks for the text written in the region (`transcription`, `ocr_text`,
    `recognizedText`, …) rather than a description of it (`caption`, `description_text`, …)."""
    words = {w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name)}
    return not words & _DESCRIPTION_WORDS and bool(words & _TRANSCRIPTION_WORDS)


def _data_key(control: Any) -> str | None:
    value = str(control.attr.get("value") or "")
    return value[1:] if value.startswith("$") and len(value) > 1 else None


def _task_labels(listed: Any) -> tuple[str, ...] | None:
    if not isinstance(listed, list):
        return None
    labels = [item.get("value") if isinstance(item, Mapping) else item for item in listed]
    if not all(isinstance(label, str) and label for label in labels):
        return None
    return tuple(dict.fromkeys(labels))


def _choices_of(controls: list[Any], trees: Mapping[str, TaxonomyTree]) -> tuple[ChoiceControl, ...]:
    found = []
    for c in controls:
        if c.tag == "Choices" and c.labels:
            found.append(ChoiceControl(c.name, tuple(c.labels), c.attr.get("choice") == "multiple"))
        elif c.tag == "Taxonomy" and trees.get(c.name):
            found.append(ChoiceControl(c.name, tuple(path_key(p) for p in _paths(trees[c.name])), False,
                                       trees[c.name]))
    return tuple(found)


def _choice_controls(data: Sequence[Mapping[str, Any]]) -> tuple[ChoiceControl, ...]:
    return tuple(ChoiceControl(c["name"], tuple(c["candidates"]), bool(c["multiple"]),
                               _tree_from_json(c.get("tree") or ())) for c in data)


def _condition(control: Any) -> tuple[str, str, str] | None:
    """A per-region control's visibility rule (`whenLabelValue`, `whenTagName`), None when always shown."""
    if control.attr.get("whenLabelValue"):
        return (control.name, "label", str(control.attr["whenLabelValue"]))
    if control.attr.get("whenTagName"):
        return (control.name, "tag", str(control.attr["whenTagName"]))
    return None


# The label config is a stranger's XML: no entities, no network, no huge trees.
_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, load_dtd=False)


def _taxonomy_trees(label_config: str, names: set[str]) -> dict[str, TaxonomyTree]:
    """The Choice trees of the config's Taxonomy controls named in `names` (the SDK flattens them). A
    Taxonomy whose values come from the task data or an API has no tree here and is not filled."""
    if not names:
        return {}
    root = etree.fromstring(label_config.encode(), _XML_PARSER)

    def nodes(element: Any) -> TaxonomyTree:
        return tuple((str(child.get("alias") or child.get("value")), nodes(child))
                     for child in element if child.tag == "Choice" and (child.get("alias") or child.get("value")))

    return {str(e.get("name")): nodes(e) for e in root.iter("Taxonomy") if e.get("name") in names}


def _tree_from_json(data: Sequence[Any]) -> TaxonomyTree:
    return tuple((str(value), _tree_from_json(children)) for value, children in data)


def _paths(tree: TaxonomyTree, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    return [path for value, children in tree for path in [(*prefix, value), *_paths(children, (*prefix, value))]]


def _node_values(tree: TaxonomyTree) -> list[str]:
    return [value for value, children in tree for value in [value, *_node_values(children)]]


def _widest(tree: TaxonomyTree) -> int:
    return max([len(tree), *(_widest(children) for _, children in tree)])


def _path_cost(tree: TaxonomyTree) -> int:
    return len(tree) + max((_path_cost(children) for _, children in tree), default=0) if tree else 0


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
