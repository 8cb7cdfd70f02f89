"""What the backend fills in a labeling config, which boxes it reads, and the results it builds."""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.label_interface import LabelInterface

from backend.labelconfig import (
    MIN_VISIBLE,
    ConfigError,
    FillPlan,
    PredictionInvalid,
    Region,
    TaskError,
    build_prediction,
    regions_from_context,
    regions_from_task,
    select_choices,
    validate_prediction,
    wants_label,
)
from model.gpt4roi.processing_gpt4roi import MIN_BOX_SIZE, sanitize_boxes
from tests.support import capture, config_xml

CAPTURED_CONFIG = capture("04")["request"]["json"]["label_config"]


def answers_for(plan: FillPlan, regions: list[Region], label: str | None = None) -> list[dict]:
    """Worker answers that favour the first candidate of every control (or `label` for the rectangle)."""
    out = []
    for region in regions:
        choices = {c.name: {v: (0.7 if i == 0 else 0.3 / (len(c.candidates) - 1)) for i, v in enumerate(c.candidates)}
                   for c in plan.choices}
        labels = None
        if plan.labels:
            best = label or plan.labels[0]
            labels = {v: (0.8 if v == best else 0.2 / (len(plan.labels) - 1)) for v in plan.labels}
        out.append({"id": region.id, "caption": f"caption of {region.id}", "choices": choices, "label": labels})
    return out


class TestFillPlan:
    def test_captured_config_fills_caption_multi_choice_and_label(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        assert (plan.image, plan.image_key, plan.rectangle, plan.rectangle_type) == (
            "image", "image", "bbox", "rectanglelabels")
        assert plan.labels == ("Object", "Text")
        assert plan.captions == ("caption",)
        (attrs,) = plan.choices
        assert (attrs.name, attrs.candidates, attrs.multiple) == ("attrs", ("occluded", "truncated", "clear"), True)

    @pytest.mark.parametrize("name", ["demo_shapes.xml", "region_captioning.xml", "interactive.xml"])
    def test_shipped_configs_ask_about_each_choices_control(self, name):
        plan = FillPlan.from_label_config(config_xml(name))
        interface = LabelInterface(config_xml(name))
        per_region_choices = [c.name for c in interface.controls
                              if c.tag == "Choices" and c.attr.get("perRegion") == "true"]
        assert [c.name for c in plan.choices] == per_region_choices
        assert all(not c.multiple for c in plan.choices)
        assert plan.captions == ("caption",)

    def test_referring_config_has_labels_only(self):
        plan = FillPlan.from_label_config(config_xml("referring_classification.xml"))
        assert plan.captions == () and plan.choices == ()
        assert plan.labels == ("circle", "square", "triangle", "star", "cross")

    def test_plain_rectangle_tool_gets_no_label(self):
        plan = FillPlan.from_label_config(
            '<View><Image name="img" value="$url"/><Rectangle name="box" toName="img"/>'
            '<TextArea name="desc" toName="img" perRegion="true"/></View>')
        assert (plan.rectangle_type, plan.labels, plan.image_key) == ("rectangle", (), "url")
        assert not wants_label(plan, Region("r", 1, 1, 5, 5), keep_drawn_label=False)

    @pytest.mark.parametrize("xml, reason", [
        ('<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>',
         "no <Image>"),
        ('<View><Image name="img" value="$image"/><Text name="t" value="$t"/>'
         '<Choices name="c" toName="t"><Choice value="a"/></Choices></View>', "no region tool"),
        ('<View><Image name="img" valueList="$pages"/><RectangleLabels name="r" toName="img">'
         '<Label value="a"/></RectangleLabels></View>', "list of pages"),
        ("<View><Image name='img' value='$image'>", "cannot be parsed"),
        ("", "empty"),
    ])
    def test_unfillable_configs_are_refused_with_the_reason(self, xml, reason):
        with pytest.raises(ConfigError, match=reason):
            FillPlan.from_label_config(xml)

    def test_json_round_trip(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        assert FillPlan.from_json(plan.to_json()) == plan

    def test_image_reference_errors_name_the_missing_key(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        assert plan.image_reference({"id": 1, "data": {"image": " /data/upload/1/a.png "}}) == "/data/upload/1/a.png"
        with pytest.raises(TaskError, match=r"data\['image'\]"):
            plan.image_reference({"id": 1, "data": {"picture": "x"}})


class TestRegions:
    def test_drawn_rectangle_of_the_interactive_capture(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        context = capture("06")["request"]["json"]["params"]["context"]
        (region,) = regions_from_context(plan, context)
        assert region.id == "Drawn01"
        assert region.labels == ("Object",)
        assert region.drawn == context["result"][0]
        x1, y1, x2, y2 = region.box()
        assert (x1, y1) == pytest.approx((0.09375, 0.20833))
        assert (x2, y2) == pytest.approx((0.40625, 0.625))

    def test_task_boxes_come_from_its_prediction_when_it_has_no_annotation(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        task = capture("07")["request"]["json"]["tasks"][0]
        regions = regions_from_task(plan, task)
        assert [r.id for r in regions] == ["t2r1", "t2r2"]
        assert regions[1].box() == pytest.approx((0.5, 0.1, 0.7, 0.35))
        assert all(r.drawn is None for r in regions)

    def test_newest_annotation_wins_over_predictions_and_cancelled_ones_are_ignored(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        task = copy.deepcopy(capture("07")["request"]["json"]["tasks"][0])
        annotation = capture("09")["request"]["json"]["annotation"]
        old = {**annotation, "updated_at": "2026-01-01T00:00:00Z"}
        new = copy.deepcopy({**annotation, "updated_at": "2026-02-01T00:00:00Z"})
        new["result"][0]["id"] = "Newest"
        cancelled = copy.deepcopy({**annotation, "updated_at": "2026-03-01T00:00:00Z", "was_cancelled": True})
        cancelled["result"][0]["id"] = "Cancelled"
        task["annotations"] = [old, cancelled, new]
        assert [r.id for r in regions_from_task(plan, task)] == ["Newest"]

    def test_batch_capture_tasks_have_no_boxes(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        for task in capture("04")["request"]["json"]["tasks"]:
            assert regions_from_task(plan, task) == []

    def test_rotated_box_uses_axis_aligned_bounds_in_pixel_space(self):
        # 100x50 image, a 20x10 px box at (10, 10) px turned 90° clockwise around its top-left corner
        # covers x 0..10 px and y 10..30 px.
        region = Region("r", x=10, y=20, width=20, height=20, rotation=90, original_width=100, original_height=50)
        assert region.box() == pytest.approx((0.0, 0.2, 0.1, 0.6))

    def test_rotation_by_45_degrees_on_a_non_square_image_is_computed_in_pixels(self):
        region = Region("r", x=50, y=10, width=10, height=10, rotation=45, original_width=400, original_height=200)
        c = math.sqrt(0.5)
        corners = ((0, 0), (40, 0), (0, 20), (40, 20))  # a 40x20 px box at (200, 20) px
        xs = [200 + dx * c - dy * c for dx, dy in corners]
        ys = [20 + dx * c + dy * c for dx, dy in corners]
        assert region.box() == pytest.approx((min(xs) / 400, min(ys) / 200, max(xs) / 400, max(ys) / 200))

    def test_boxes_are_clamped_to_the_image_and_widened_by_the_model_alone(self):
        box = Region("r", x=99.9, y=-5, width=0.01, height=10).box()
        assert box == pytest.approx((0.999, 0.0, 0.9991, 0.05))
        x1, _, x2, _ = sanitize_boxes([box])[0].tolist()
        assert 0 <= x1 < x2 <= 1 and x2 - x1 == pytest.approx(MIN_BOX_SIZE, abs=1e-6)

    def test_a_region_outside_the_image_is_refused(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        item = copy.deepcopy(capture("06")["request"]["json"]["params"]["context"]["result"][0])
        item["value"].update({"x": 120, "y": 10})
        with pytest.raises(TaskError, match="lies outside the image"):
            regions_from_context(plan, {"result": [item]})

    @pytest.mark.parametrize("value, message", [
        ({"x": "a", "y": 0, "width": 1, "height": 1}, "numeric"),
        ({"x": 0, "y": 0, "width": 0, "height": 1}, "positive"),
        ({"x": float("nan"), "y": 0, "width": 1, "height": 1}, "finite"),
        ("not an object", "object"),
    ])
    def test_malformed_rectangles_are_refused(self, value, message):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        item = {"id": "a", "type": "rectanglelabels", "to_name": "image", "value": value}
        with pytest.raises(TaskError, match=message):
            regions_from_context(plan, {"result": [item]})

    def test_non_rectangle_items_are_ignored(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        items = [{"id": "k", "type": "keypointlabels", "to_name": "image", "value": {"x": 1, "y": 1}}]
        assert regions_from_context(plan, {"result": items}) == []


class TestPredictions:
    def test_batch_prediction_is_valid_and_shares_one_id_per_region(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        regions = regions_from_task(plan, capture("07")["request"]["json"]["tasks"][0])
        prediction = build_prediction(plan, regions, answers_for(plan, regions, label="Text"), "v7")
        validate_prediction(CAPTURED_CONFIG, prediction)
        assert prediction["model_version"] == "v7"
        by_id: dict[str, list[str]] = {}
        for item in prediction["result"]:
            by_id.setdefault(item["id"], []).append(item["type"])
            assert item["original_width"] == 64 and item["original_height"] == 48
        assert by_id == {"t2r1": ["rectanglelabels", "textarea", "choices"],
                         "t2r2": ["rectanglelabels", "textarea", "choices"]}
        rect = prediction["result"][0]
        assert rect["value"]["rectanglelabels"] == ["Text"] and rect["score"] == pytest.approx(0.8)
        assert [item["score"] for item in prediction["result"] if item["type"] == "choices"] == [0.7, 0.7]
        # The chance that both regions' label (0.8) and choice (0.7) are all kept.
        assert prediction["score"] == pytest.approx((0.8 * 0.7) ** 2)

    def test_interactive_prediction_echoes_the_drawn_item_and_keeps_its_label(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        context = capture("06")["request"]["json"]["params"]["context"]
        regions = regions_from_context(plan, context)
        prediction = build_prediction(plan, regions, answers_for(plan, regions, label="Text"), "v1")
        validate_prediction(CAPTURED_CONFIG, prediction)
        assert prediction["result"][0] == context["result"][0]
        assert [i["type"] for i in prediction["result"]] == ["rectanglelabels", "textarea", "choices"]
        assert prediction["result"][1]["value"]["text"] == ["caption of Drawn01"]

    def test_interactive_label_is_proposed_when_the_box_has_none_or_when_asked(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        item = copy.deepcopy(capture("06")["request"]["json"]["params"]["context"]["result"][0])
        regions = regions_from_context(plan, {"result": [item]})
        replaced = build_prediction(plan, regions, answers_for(plan, regions, "Text"), "v1", keep_drawn_label=False)
        assert replaced["result"][0]["value"]["rectanglelabels"] == ["Text"]
        item["value"]["rectanglelabels"] = []
        unlabeled = regions_from_context(plan, {"result": [item]})
        assert wants_label(plan, unlabeled[0], keep_drawn_label=True)
        proposed = build_prediction(plan, unlabeled, answers_for(plan, unlabeled, "Text"), "v1")
        assert proposed["result"][0]["value"]["rectanglelabels"] == ["Text"]
        validate_prediction(CAPTURED_CONFIG, proposed)

    def test_no_regions_give_an_empty_valid_prediction(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        prediction = build_prediction(plan, [], [], "v1")
        assert prediction == {"result": [], "score": 0.0, "model_version": "v1"}
        validate_prediction(CAPTURED_CONFIG, prediction)

    def test_a_caption_only_prediction_scores_its_caption_confidence_never_1(self):
        xml = ('<View><Image name="img" value="$image"/><Rectangle name="box" toName="img"/>'
               '<TextArea name="desc" toName="img" perRegion="true"/></View>')
        plan = FillPlan.from_label_config(xml)
        regions = [Region("r1", 10, 10, 20, 20, original_width=50, original_height=50)]
        answer = {"caption": "x", "choices": {}, "label": None, "confidence": {"caption": 0.4}}
        prediction = build_prediction(plan, regions, [answer], "v")
        validate_prediction(xml, prediction)
        assert prediction["score"] == pytest.approx(0.4)
        assert prediction["result"][1]["score"] == pytest.approx(0.4)
        # Nothing known about the caption: the task comes first in the least-certain order, not last.
        unknown = build_prediction(plan, regions, [{"caption": "x", "choices": {}, "label": None}], "v")
        assert unknown["score"] == 0.0

    def test_calibrated_confidences_score_the_results_and_the_task(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        regions = regions_from_task(plan, capture("07")["request"]["json"]["tasks"][0])
        answers = answers_for(plan, regions, label="Text")
        control = plan.choices[0].name
        for answer in answers:
            answer["confidence"] = {"caption": 0.5, "choices": {control: 0.6}, "label": 0.9}
        prediction = build_prediction(plan, regions, answers, "v7")
        validate_prediction(CAPTURED_CONFIG, prediction)
        scores = {(item["id"], item["type"]): item["score"] for item in prediction["result"]}
        assert set(scores.values()) == {0.5, 0.6, 0.9}
        assert prediction["score"] == pytest.approx((0.5 * 0.6 * 0.9) ** 2)

    def test_a_more_probable_answer_never_scores_lower(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        regions = regions_from_task(plan, capture("07")["request"]["json"]["tasks"][0])[:1]
        control = plan.choices[0]

        def score(probability: float) -> float:
            rest = (1 - probability) / (len(control.candidates) - 1)
            distribution = {value: probability if i == 0 else rest for i, value in enumerate(control.candidates)}
            answer = {"caption": "x", "choices": {control.name: distribution}, "label": None}
            return build_prediction(plan, regions, [answer], "v")["score"]

        figures = [score(p / 10) for p in range(4, 11)]
        assert figures == sorted(figures) and all(0.0 <= f <= 1.0 for f in figures)

    def test_missing_image_size_is_taken_from_the_decoded_image(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        regions = [Region("r1", 10, 10, 20, 20)]
        prediction = build_prediction(plan, regions, answers_for(plan, regions), "v", image_size=(640, 480))
        assert {(i["original_width"], i["original_height"]) for i in prediction["result"]} == {(640, 480)}

    def test_validation_rejects_an_unknown_choice(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        regions = [Region("r1", 10, 10, 20, 20, original_width=64, original_height=48)]
        prediction = build_prediction(plan, regions, answers_for(plan, regions), "v")
        prediction["result"][2]["value"]["choices"] = ["sparkly"]
        with pytest.raises(PredictionInvalid, match="attrs"):
            validate_prediction(CAPTURED_CONFIG, prediction)

    def test_answers_must_match_regions(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        with pytest.raises(ValueError, match="1 answers for 2 regions"):
            build_prediction(plan, [Region("a", 1, 1, 1, 1), Region("b", 1, 1, 1, 1)], [{}], "v")


class TestSelectChoices:
    def test_single_choice_takes_the_most_likely(self):
        assert select_choices({"a": 0.2, "b": 0.5, "c": 0.3}, multiple=False) == ["b"]

    def test_multiple_choice_takes_everything_above_chance(self):
        assert select_choices({"a": 0.40, "b": 0.35, "c": 0.25}, multiple=True) == ["a", "b"]

    def test_multiple_choice_always_has_one(self):
        assert select_choices({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, multiple=True) == ["a"]


finite = st.floats(min_value=0.0, max_value=95.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    x=finite, y=finite,
    w=st.floats(min_value=0.01, max_value=100.0), h=st.floats(min_value=0.01, max_value=100.0),
    rotation=st.sampled_from([0.0, 15.0, 90.0, 200.0]),
    probabilities=st.lists(st.floats(min_value=0.01, max_value=1.0), min_size=3, max_size=3),
    label=st.sampled_from(["Object", "Text"]),
)
def test_any_region_gives_a_valid_prediction_with_a_box_inside_the_image(x, y, w, h, rotation, probabilities, label):
    plan = FillPlan.from_label_config(CAPTURED_CONFIG)
    w, h = min(w, 100 - x), min(h, 100 - y)
    region = Region("r", x, y, w, h, rotation=rotation, original_width=64, original_height=48)
    total = sum(probabilities)
    labels = {"Object": 0.6, "Text": 0.4} if label == "Object" else {"Object": 0.1, "Text": 0.9}
    answer = {"caption": "c", "label": labels,
              "choices": {"attrs": {v: p / total for v, p in zip(("occluded", "truncated", "clear"), probabilities,
                                                                  strict=True)}}}
    prediction = build_prediction(plan, [region], [answer], "v")
    validate_prediction(CAPTURED_CONFIG, prediction)
    assert prediction["result"][0]["value"]["rectanglelabels"] == [label]
    box = region.box()
    x1, y1, x2, y2 = box
    assert 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1
    if x2 - x1 >= MIN_VISIBLE and y2 - y1 >= MIN_VISIBLE:  # else parsing refuses it: it is outside the image
        sx1, sy1, sx2, sy2 = sanitize_boxes([box])[0].tolist()
        assert sx2 - sx1 >= MIN_BOX_SIZE - 1e-6 and sy2 - sy1 >= MIN_BOX_SIZE - 1e-6
    assert math.isclose(sum(answer["choices"]["attrs"].values()), 1.0)


# ---------------------------------------------------------------------- shapes other than rectangles
SHAPES_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Labels name="label" toName="image"><Label value="Text"/><Label value="Handwriting"/></Labels>'
    '<Rectangle name="bbox" toName="image"/><Polygon name="poly" toName="image"/>'
    '<EllipseLabels name="ell" toName="image"><Label value="Face"/><Label value="Eye"/></EllipseLabels>'
    '<KeyPointLabels name="kp" toName="image"><Label value="Nose"/><Label value="Ear"/></KeyPointLabels>'
    '<BrushLabels name="brush" toName="image"><Label value="Sky"/><Label value="Road"/></BrushLabels>'
    '<TextArea name="transcription" toName="image" perRegion="true"/>'
    '<Choices name="legible" toName="image" perRegion="true"><Choice value="yes"/><Choice value="no"/></Choices>'
    '<TextArea name="summary" toName="image"/>'
    '<Choices name="scene" toName="image" choice="multiple"><Choice value="street"/><Choice value="shop"/>'
    '<Choice value="road"/></Choices></View>')


def shape_items() -> list[dict]:
    import numpy as np
    from label_studio_sdk.converter.brush import mask2rle

    mask = np.zeros((50, 80), dtype=np.uint8)
    mask[10:30, 20:60] = 255
    common = {"to_name": "image", "original_width": 80, "original_height": 50, "image_rotation": 0}
    return [
        {**common, "id": "p", "from_name": "poly", "type": "polygon",
         "value": {"points": [[10, 10], [50, 20], [30, 70]]}},
        {**common, "id": "e", "from_name": "ell", "type": "ellipselabels",
         "value": {"x": 50, "y": 50, "radiusX": 10, "radiusY": 20, "rotation": 0, "ellipselabels": ["Eye"]}},
        {**common, "id": "k", "from_name": "kp", "type": "keypointlabels",
         "value": {"x": 40, "y": 60, "width": 1, "keypointlabels": ["Nose"]}},
        {**common, "id": "b", "from_name": "brush", "type": "brushlabels",
         "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["Sky"]}},
    ]


def shape_answers(plan: FillPlan, regions: list[Region]) -> list[dict]:
    out = []
    for region in regions:
        choices = {c.name: {v: 1 / len(c.candidates) + (0.1 if i == 0 else -0.1 / (len(c.candidates) - 1))
                            for i, v in enumerate(c.candidates)} for c in plan.choices_for(region)}
        labels = plan.labels_for(region)
        label = {v: (0.9 if i == 1 else 0.1 / (len(labels) - 1)) for i, v in enumerate(labels)} if labels else None
        out.append({"id": region.id, "caption": f"about {region.id}", "choices": choices, "label": label})
    return out


class TestShapes:
    def test_plan_has_every_tool_with_its_labels_and_the_whole_image_controls(self):
        plan = FillPlan.from_label_config(SHAPES_CONFIG)
        tools = {t.name: (t.type, t.labels, t.labels_control) for t in plan.tools}
        assert tools["poly"] == ("polygon", ("Text", "Handwriting"), "label")
        assert tools["ell"] == ("ellipselabels", ("Face", "Eye"), None)
        assert (plan.captions, plan.image_captions) == (("transcription",), ("summary",))
        assert [c.name for c in plan.choices] == ["legible"] and [c.name for c in plan.image_choices] == ["scene"]
        assert FillPlan.from_json(plan.to_json()) == plan

    def test_a_rectangle_only_plan_of_an_earlier_payload_is_read(self):
        plan = FillPlan.from_label_config(CAPTURED_CONFIG)
        old = {"image": "image", "image_key": "image", "image_constant": None, "rectangle": "bbox",
               "rectangle_type": "rectanglelabels", "labels": list(plan.labels), "captions": ["caption"],
               "choices": [{"name": c.name, "candidates": list(c.candidates), "multiple": c.multiple}
                           for c in plan.choices]}
        assert FillPlan.from_json(old) == plan

    def test_drawn_shapes_are_echoed_as_drawn_with_their_results(self):
        plan = FillPlan.from_label_config(SHAPES_CONFIG)
        items = shape_items()
        regions = regions_from_context(plan, {"result": items})
        assert [r.type for r in regions] == ["polygon", "ellipselabels", "keypointlabels", "brushlabels"]
        assert regions[0].box() == pytest.approx((0.1, 0.1, 0.5, 0.7))
        assert regions[3].box() == pytest.approx((0.25, 0.2, 0.75, 0.6))
        prediction = build_prediction(plan, regions, shape_answers(plan, regions), "v1")
        validate_prediction(SHAPES_CONFIG, prediction)
        by_id: dict[str, list[dict]] = {}
        for item in prediction["result"]:
            by_id.setdefault(item["id"], []).append(item)
        for drawn in items:
            echoed = by_id[drawn["id"]]
            assert echoed[0]["value"] == drawn["value"] and echoed[0]["type"] == drawn["type"]
            assert {i["from_name"] for i in echoed[1:]} >= {"transcription", "legible"}
        # The polygon had no label: the model's goes to the separate Labels control, with the polygon's points.
        (label_item,) = [i for i in by_id["p"] if i["type"] == "labels"]
        assert label_item["value"] == {**items[0]["value"], "labels": ["Handwriting"]}
        (caption,) = [i for i in by_id["p"] if i["from_name"] == "transcription"]
        assert caption["value"]["points"] == items[0]["value"]["points"]

    def test_batch_regions_get_their_tool_type_and_the_whole_image_is_added(self):
        plan = FillPlan.from_label_config(SHAPES_CONFIG)
        task = {"id": 1, "data": {"image": "x"}, "annotations": [{"result": shape_items()}]}
        regions = regions_from_task(plan, task)
        assert [r.id for r in regions] == ["p", "e", "k", "b", "image"]
        assert regions[-1].box() == (0.0, 0.0, 1.0, 1.0)
        prediction = build_prediction(plan, regions, shape_answers(plan, regions), "v1")
        validate_prediction(SHAPES_CONFIG, prediction)
        whole = [i for i in prediction["result"] if i["id"] == "image"]
        assert {i["from_name"] for i in whole} == {"summary", "scene"}
        assert all(set(i) <= {"id", "from_name", "to_name", "type", "value", "score"} for i in whole)
        assert [i["value"] for i in whole if i["type"] == "textarea"] == [{"text": ["about image"]}]
        ellipse = next(i for i in prediction["result"] if i["id"] == "e" and i["from_name"] == "ell")
        assert ellipse["value"]["ellipselabels"] == ["Eye"]

    def test_a_task_without_regions_still_gets_the_whole_image(self):
        plan = FillPlan.from_label_config(
            '<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
            '<Choice value="cat"/><Choice value="dog"/></Choices></View>')
        (region,) = regions_from_task(plan, {"id": 1, "data": {"image": "x"}})
        prediction = build_prediction(plan, [region], shape_answers(plan, [region]), "v1")
        assert prediction["result"] == [{"id": "image", "from_name": "c", "to_name": "image", "type": "choices",
                                         "score": pytest.approx(0.6), "value": {"choices": ["cat"]}}]

    def test_keypoint_box_follows_the_setting(self):
        plan = FillPlan.from_label_config(SHAPES_CONFIG)
        item = shape_items()[2]
        (small,) = regions_from_context(plan, {"result": [item]}, keypoint_box=2.0)
        (large,) = regions_from_context(plan, {"result": [item]}, keypoint_box=20.0)
        # 20% of the 50-pixel shorter side is 10 pixels: 12.5% of the width, 20% of the height.
        assert large.box() == pytest.approx((0.4 - 0.0625, 0.5, 0.4 + 0.0625, 0.7))
        assert small.box()[2] - small.box()[0] == pytest.approx((large.box()[2] - large.box()[0]) / 10)
