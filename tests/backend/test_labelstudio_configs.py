"""The labeling configs shipped in labelstudio_config/ are valid and shaped the way the backend fills them."""

from __future__ import annotations

from typing import Any

import pytest
from label_studio_sdk.label_interface import LabelInterface

from tests.support import REPO

CONFIG_DIR = REPO / "labelstudio_config"

RECTANGLE_TAGS = {"Rectangle", "RectangleLabels"}

# What each config promises: its per-region controls (name -> tag) and whether its rectangle tool is smart.
PROMISED: dict[str, dict[str, Any]] = {
    "demo_shapes.xml": {
        "per_region": {"caption": "TextArea", "color": "Choices", "size": "Choices", "texture": "Choices"},
        "smart": False,
    },
    "region_captioning.xml": {
        "per_region": {"caption": "TextArea", "color": "Choices", "material": "Choices", "action": "Choices"},
        "smart": False,
    },
    "referring_classification.xml": {"per_region": {}, "smart": False},
    "interactive.xml": {
        "per_region": {"caption": "TextArea", "color": "Choices", "size": "Choices", "texture": "Choices"},
        "smart": True,
    },
}

# The demo model answers these words; configs meant for it must not ask for anything else.
DEMO_CONFIGS = ["demo_shapes.xml", "interactive.xml", "referring_classification.xml"]


def load(name: str) -> LabelInterface:
    """Parse one shipped config."""
    return LabelInterface((CONFIG_DIR / name).read_text(encoding="utf-8"))


def rectangle_control(interface: LabelInterface):
    """The single rectangle tool of a config."""
    (control,) = [c for c in interface.controls if c.tag in RECTANGLE_TAGS]
    return control


def per_region_prediction(interface: LabelInterface, region_id: str = "r1") -> dict[str, Any]:
    """A prediction as the backend sends it: one rectangle plus its per-region items, all sharing one id."""
    geometry = {"x": 12.5, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0}
    common = {"id": region_id, "to_name": "image", "original_width": 96, "original_height": 64,
              "image_rotation": 0}
    rect = rectangle_control(interface)
    value: dict[str, Any] = dict(geometry)
    if rect.tag == "RectangleLabels":
        value["rectanglelabels"] = [rect.labels[0]]
    result = [{**common, "from_name": rect.name, "type": rect.tag.lower(), "score": 0.9, "value": value}]
    for control in interface.controls:
        if control.attr.get("perRegion") != "true":
            continue
        if control.tag == "TextArea":
            result.append({**common, "from_name": control.name, "type": "textarea",
                           "value": {**geometry, "text": ["a small red circle"]}})
        elif control.tag == "Choices":
            result.append({**common, "from_name": control.name, "type": "choices",
                           "value": {**geometry, "choices": [control.labels[0]]}})
    return {"model_version": "demo-0001", "score": 0.8, "result": result}


def test_every_shipped_config_is_specified_here():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.xml")) == sorted(PROMISED)


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_config_passes_label_studio_validation(name: str):
    load(name).validate()  # raises with Label Studio's own message when the config is invalid


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_config_opens_with_a_comment_saying_when_to_use_it(name: str):
    text = (CONFIG_DIR / name).read_text(encoding="utf-8").lstrip()
    assert text.startswith("<!--")
    assert "When to use" in text[: text.index("-->")]


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_config_has_one_image_and_one_rectangle_tool_on_it(name: str):
    interface = load(name)
    images = [o for o in interface.objects if o.tag == "Image"]
    assert len(images) == 1, f"{name}: expected one Image, found {[o.tag for o in interface.objects]}"
    assert len(interface.objects) == 1
    rect = rectangle_control(interface)
    assert rect.to_name == [images[0].name]
    assert (rect.attr.get("smart") == "true") is PROMISED[name]["smart"]


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_config_has_the_promised_per_region_controls(name: str):
    interface = load(name)
    per_region = {c.name: c.tag for c in interface.controls if c.attr.get("perRegion") == "true"}
    assert per_region == PROMISED[name]["per_region"]
    rect = rectangle_control(interface)
    for control in interface.controls:
        assert control.to_name == rect.to_name, f"{name}: {control.name} targets {control.to_name}"
        if control.tag == "Choices":
            # The backend proposes one answer per attribute question.
            assert control.attr.get("choice", "single") == "single", f"{name}: {control.name}"
            assert len(control.labels) >= 2
        if control.tag == "TextArea":
            assert control.attr.get("editable") == "true"
            assert control.attr.get("displayMode") == "region-list"


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_per_region_prediction_is_accepted(name: str):
    interface = load(name)
    prediction = per_region_prediction(interface)
    assert interface.validate_prediction(prediction, return_errors=True) == []
    # One region: every item carries the rectangle's id.
    assert {item["id"] for item in prediction["result"]} == {"r1"}


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_prediction_with_an_unknown_choice_or_label_is_rejected(name: str):
    interface = load(name)
    prediction = per_region_prediction(interface)
    choices = [item for item in prediction["result"] if item["type"] == "choices"]
    if choices:
        target = choices[0]
        target["value"]["choices"] = ["not-a-choice"]
    else:
        target = prediction["result"][0]
        target["value"]["rectanglelabels"] = ["not-a-label"]
    errors = interface.validate_prediction(prediction, return_errors=True)
    assert errors, f"{name}: an unknown value was accepted"
    assert any(target["from_name"] in error for error in errors)


def test_demo_configs_share_one_shape_vocabulary():
    vocabularies = {name: rectangle_control(load(name)).labels for name in DEMO_CONFIGS}
    assert len({tuple(v) for v in vocabularies.values()}) == 1, vocabularies
    demo, interactive = load("demo_shapes.xml"), load("interactive.xml")
    assert {c.name: c.labels for c in demo.controls} == {c.name: c.labels for c in interactive.controls}


def test_demo_shapes_offers_exactly_the_synthetic_vocabulary():
    from model.demo import synthetic

    demo = load("demo_shapes.xml")
    # The rectangle's labels are scored as the "category" question, which the demo data answers with shapes.
    assert "category" in synthetic.QUESTION_ATTRIBUTES
    assert rectangle_control(demo).labels == list(synthetic.SHAPES)
    choices = {c.name: c.labels for c in demo.controls if c.tag == "Choices"}
    assert choices == {"color": list(synthetic.COLORS), "size": list(synthetic.SIZES),
                       "texture": list(synthetic.TEXTURES)}
    assert set(choices) <= set(synthetic.QUESTION_ATTRIBUTES)
