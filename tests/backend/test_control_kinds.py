"""Controls beyond a caption TextArea and Choices: a Taxonomy is scored level by level down its tree;
per-region controls shown only for some labels (`visibleWhen="region-selected"` with `whenLabelValue` /
`whenTagName`) are filled only for the regions Label Studio shows them for; labels listed in the task data
are that task's labels; a TextArea named for the text in a region (an OCR project's `transcription`) is
read, not described. Every prediction passes Label Studio's own validator; a correction of each is read
back and trains what it corrects.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from backend.annotations import CorrectedRegion, parse_annotation_regions
from backend.describe import describe, load_engine
from backend.labelconfig import (
    FillPlan,
    Region,
    TaskError,
    build_prediction,
    is_transcription,
    path_key,
    predicted_fields,
    validate_prediction,
)
from backend.training_data import training_examples
from model.engine import CAPTION, TRANSCRIPTION, CaptionRequest, ChoiceRequest
from model.gpt4roi.engine import region_sample
from model.gpt4roi.prompts import transcription_question
from tests.support.images import scene

TAXONOMY_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Animal"/><Label value="Plant"/></RectangleLabels>
  <Taxonomy name="species" toName="image" perRegion="true">
    <Choice value="Mammal">
      <Choice value="Cat"/>
      <Choice value="Dog"/>
    </Choice>
    <Choice value="Bird">
      <Choice value="Owl"/>
      <Choice value="Parrot"/>
      <Choice value="Crow"/>
    </Choice>
  </Taxonomy>
  <Taxonomy name="scene" toName="image">
    <Choice value="Indoor"/>
    <Choice value="Outdoor"><Choice value="Forest"/><Choice value="Beach"/></Choice>
  </Taxonomy>
</View>"""

CONDITIONAL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
  <Choices name="colour" toName="image" perRegion="true" visibleWhen="region-selected" whenLabelValue="Car">
    <Choice value="red"/><Choice value="blue"/>
  </Choices>
  <TextArea name="plate" toName="image" perRegion="true" visibleWhen="region-selected" whenLabelValue="Car"/>
  <TextArea name="note" toName="image" perRegion="true"/>
</View>"""

TAG_CONDITION_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="vehicle" toName="image"><Label value="Car"/></RectangleLabels>
  <PolygonLabels name="area" toName="image"><Label value="Road"/></PolygonLabels>
  <Choices name="damage" toName="image" perRegion="true" visibleWhen="region-selected" whenTagName="vehicle">
    <Choice value="none"/><Choice value="dented"/>
  </Choices>
</View>"""


def rectangle(region_id: str, label: str | None = None, tool: str = "box") -> Region:
    return Region(region_id, 10.0, 20.0, 30.0, 40.0, original_width=96, original_height=64,
                  labels=(label,) if label else (), type="rectanglelabels", tool=tool)


def test_a_taxonomy_is_read_as_its_tree_with_every_path_a_candidate():
    plan = FillPlan.from_label_config(TAXONOMY_CONFIG)
    species, = plan.choices
    assert species.kind == "taxonomy"
    assert species.tree == (("Mammal", (("Cat", ()), ("Dog", ()))),
                            ("Bird", (("Owl", ()), ("Parrot", ()), ("Crow", ()))))
    assert path_key(["Bird", "Owl"]) in species.candidates and path_key(["Bird"]) in species.candidates
    assert (species.widest, species.cost) == (3, 5)  # the Bird level is the widest; root + birds the dearest
    assert [c.name for c in plan.image_choices] == ["scene"]
    assert FillPlan.from_json(plan.to_json()) == plan


def test_a_taxonomy_answer_becomes_a_taxonomy_result_label_studio_accepts():
    plan = FillPlan.from_label_config(TAXONOMY_CONFIG)
    region = rectangle("r1", "Animal")
    answer = {"caption": None, "label": None,
              "choices": {"species": {path_key(["Bird", "Owl"]): 0.5, path_key(["Bird", "Crow"]): 0.2}}}
    whole = {"caption": None, "label": None, "choices": {"scene": {path_key(["Indoor"]): 0.7,
                                                                   path_key(["Outdoor"]): 0.3}}}
    prediction = build_prediction(plan, [region, Region.whole_image()], [answer, whole], "v1")
    validate_prediction(TAXONOMY_CONFIG, prediction)
    items = {item["from_name"]: item for item in prediction["result"]}
    assert items["species"]["type"] == "taxonomy"
    assert items["species"]["value"]["taxonomy"] == [["Bird", "Owl"]]
    assert items["species"]["score"] == 0.5
    assert items["scene"]["value"] == {"taxonomy": [["Indoor"]]}


def test_a_taxonomy_is_walked_down_level_by_level_by_the_engine(tiny_checkpoint: Path):
    plan = FillPlan.from_label_config(TAXONOMY_CONFIG)
    engine = load_engine(tiny_checkpoint, "cpu")
    image = scene()
    region = rectangle("r1", "Animal")
    answer, = describe(engine, image, plan, [region], keep_drawn_label=True, max_new_tokens=8)
    distribution = answer["choices"]["species"]
    # The engine's own choice at each level decides the branch asked next.
    top = engine.choose([ChoiceRequest(image, region.box(), "species", ("Mammal", "Bird"))])[0]
    branch = max(top, key=top.__getitem__)
    leaves = {"Mammal": ("Cat", "Dog"), "Bird": ("Owl", "Parrot", "Crow")}[branch]
    below = engine.choose([ChoiceRequest(image, region.box(), "species", leaves)])[0]
    assert set(distribution) == {path_key([branch, leaf]) for leaf in leaves}
    for leaf in leaves:
        assert distribution[path_key([branch, leaf])] == pytest.approx(top[branch] * below[leaf], rel=1e-4)
    prediction = build_prediction(plan, [region], [answer], "v1")
    validate_prediction(TAXONOMY_CONFIG, prediction)


def test_a_taxonomy_correction_is_read_and_trains_each_level_of_its_path(tmp_path: Path):
    plan = FillPlan.from_label_config(TAXONOMY_CONFIG)
    result = [
        {"id": "r1", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": 96,
         "original_height": 64, "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rectanglelabels": ["Animal"]}},
        {"id": "r1", "from_name": "species", "to_name": "image", "type": "taxonomy",
         "value": {"x": 10, "y": 20, "width": 30, "height": 40, "taxonomy": [["Mammal", "Dog"]]}},
    ]
    entry = parse_annotation_regions(result, plan)["r1"]
    assert entry["choices"] == {"species": [path_key(["Mammal", "Dog"])]}
    corrected = CorrectedRegion(seq=1, annotation_id=7, task_id="3", region_id="r1", image="img",
                                region=entry["region"], box=entry["region"].box(), caption=None,
                                choices=entry["choices"], label="Animal", predicted=None, predicted_version=None,
                                created_at=0.0, plan=plan)
    examples = training_examples([corrected], {"img": (tmp_path / "img.png", 96, 64)})
    taxonomy = [(e.attribute, e.answer) for e in examples if e.attribute == "species"]
    assert taxonomy == [("species", "Mammal"), ("species", "Dog")]


def test_controls_visible_for_one_label_are_filled_only_for_regions_with_that_label():
    plan = FillPlan.from_label_config(CONDITIONAL_CONFIG)
    answer = {"caption": "a small red car", "caption_confidence": 0.9, "label": None,
              "choices": {"colour": {"red": 0.8, "blue": 0.2}}}
    car, person = rectangle("car", "Car"), rectangle("person", "Person")
    prediction = build_prediction(plan, [car, person], [answer, answer], "v1")
    validate_prediction(CONDITIONAL_CONFIG, prediction)
    filled = {(item["id"], item["from_name"]) for item in prediction["result"]}
    assert {("car", "colour"), ("car", "plate"), ("car", "note")} <= filled
    assert ("person", "note") in filled
    assert ("person", "colour") not in filled and ("person", "plate") not in filled
    assert predicted_fields(plan, person, answer)["choices"] == {}


def test_a_proposed_label_decides_which_conditional_controls_are_filled():
    plan = FillPlan.from_label_config(CONDITIONAL_CONFIG)
    unlabelled = rectangle("r1")
    as_person = {"caption": "x", "label": {"Car": 0.3, "Person": 0.7}, "choices": {"colour": {"red": 0.9, "blue": 0.1}}}
    as_car = {**as_person, "label": {"Car": 0.6, "Person": 0.4}}
    assert predicted_fields(plan, unlabelled, as_person)["choices"] == {}
    assert predicted_fields(plan, unlabelled, as_car)["choices"] == {"colour": ["red"]}


def test_a_control_visible_for_one_labels_tool_is_filled_only_for_that_tools_regions():
    plan = FillPlan.from_label_config(TAG_CONDITION_CONFIG)
    answer = {"caption": None, "label": None, "choices": {"damage": {"none": 0.3, "dented": 0.7}}}
    car = rectangle("car", "Car", tool="vehicle")
    road = Region("road", 0.0, 50.0, 100.0, 50.0, original_width=96, original_height=64, labels=("Road",),
                  type="polygonlabels", tool="area",
                  value={"points": [[0, 50], [100, 50], [100, 100], [0, 100]], "closed": True})
    prediction = build_prediction(plan, [car, road], [answer, answer], "v1")
    validate_prediction(TAG_CONDITION_CONFIG, prediction)
    filled = {(item["id"], item["from_name"]) for item in prediction["result"]}
    assert ("car", "damage") in filled and ("road", "damage") not in filled


def test_questions_hidden_for_a_drawn_label_are_never_asked(tiny_checkpoint: Path):
    plan = FillPlan.from_label_config(CONDITIONAL_CONFIG)
    engine = load_engine(tiny_checkpoint, "cpu")
    drawn = dataclasses.replace(rectangle("p", "Person"), drawn={"id": "p"})  # drawn and labelled interactively
    answer, = describe(engine, scene(), plan, [drawn], keep_drawn_label=True, max_new_tokens=4)
    assert answer["choices"] == {}
    assert answer["caption"] is not None  # `note` is shown for every region


DYNAMIC_CONFIG = """<View>
  <PolygonLabels name="objects" toName="image" value="$objects"/>
  <Image name="image" value="$image"/>
</View>"""


def test_labels_listed_in_the_task_data_are_that_tasks_labels():
    plan = FillPlan.from_label_config(DYNAMIC_CONFIG)
    assert plan.labels == ()
    task = {"id": 5, "data": {"image": "x.png", "objects": [{"value": "CocaCola", "html": "<img/>"},
                                                            {"value": "RedBull"}]}}
    task_plan = plan.for_task(task, max_labels=8)
    assert task_plan.labels == ("CocaCola", "RedBull")
    assert FillPlan.from_json(task_plan.to_json()) == task_plan
    region = Region("r1", 10.0, 10.0, 20.0, 20.0, original_width=96, original_height=64, type="polygonlabels",
                    tool="objects", value={"points": [[10, 10], [30, 10], [30, 30]], "closed": True})
    answer = {"caption": None, "choices": {}, "label": {"CocaCola": 0.2, "RedBull": 0.8}}
    prediction = build_prediction(task_plan, [region], [answer], "v1")
    validate_prediction(DYNAMIC_CONFIG, prediction)
    assert prediction["result"][0]["value"]["polygonlabels"] == ["RedBull"]


@pytest.mark.parametrize("objects, reason", [
    (None, "should list the labels"),
    ("CocaCola", "should list the labels"),
    ([{"html": "<img/>"}], "should list the labels"),
    ([{"value": f"brand {i}"} for i in range(9)], "9 labels, more than MAX_CHOICES_PER_CONTROL=8"),
])
def test_a_task_without_usable_labels_in_its_data_is_refused_with_the_reason(objects, reason):
    plan = FillPlan.from_label_config(DYNAMIC_CONFIG)
    with pytest.raises(TaskError, match=reason):
        plan.for_task({"id": 5, "data": {"image": "x.png", "objects": objects}}, max_labels=8)


# The shape of Label Studio's OCR template: a separate Labels control for two region tools, and a per-region
# TextArea for the text read in each region.
OCR_CONFIG = """<View>
  <Image name="image" value="$ocr"/>
  <Labels name="label" toName="image"><Label value="Text"/><Label value="Handwriting"/></Labels>
  <Rectangle name="bbox" toName="image"/>
  <Polygon name="poly" toName="image"/>
  <TextArea name="transcription" toName="image" editable="true" perRegion="true" required="true"/>
</View>"""

MIXED_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Rectangle name="bbox" toName="image"/>
  <TextArea name="caption" toName="image" perRegion="true"/>
  <TextArea name="ocr_text" toName="image" perRegion="true"/>
</View>"""


@pytest.mark.parametrize("name, reads_text", [
    ("transcription", True), ("text", True), ("ocr", True), ("ocr_text", True), ("recognizedText", True),
    ("caption", False), ("description_text", False), ("notes", False), ("answer", False), ("context", False),
])
def test_a_textarea_named_for_the_text_in_a_region_is_a_transcription(name, reads_text):
    assert is_transcription(name) is reads_text


def test_an_ocr_project_asks_the_engine_to_read_the_text_in_each_region(tiny_checkpoint: Path):
    plan = FillPlan.from_label_config(OCR_CONFIG)
    region = dataclasses.replace(rectangle("r1", "Text", tool="bbox"), type="rectangle")
    assert plan.text_kind(region) == TRANSCRIPTION
    engine = load_engine(tiny_checkpoint, "cpu")
    image = scene()
    answer, = describe(engine, image, plan, [region], keep_drawn_label=True, max_new_tokens=6)
    read, = engine.caption([CaptionRequest(image, region.box(), TRANSCRIPTION)], max_new_tokens=6)
    described, = engine.caption([CaptionRequest(image, region.box())], max_new_tokens=6)
    assert read.text != described.text, "the tiny model should answer the two questions differently"
    assert answer["caption"] == read.text
    prediction = build_prediction(plan, [region], [answer], "v1")
    validate_prediction(OCR_CONFIG, prediction)
    text_item = next(item for item in prediction["result"] if item["from_name"] == "transcription")
    assert text_item["value"]["text"] == [read.text]


def test_a_transcription_correction_trains_reading_not_describing(tmp_path: Path):
    plan = FillPlan.from_label_config(OCR_CONFIG)
    geometry = {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0}
    result = [
        {"id": "r1", "from_name": "bbox", "to_name": "image", "type": "rectangle", "original_width": 96,
         "original_height": 64, "value": geometry},
        {"id": "r1", "from_name": "transcription", "to_name": "image", "type": "textarea",
         "value": {**geometry, "text": ["EXIT 12"]}},
    ]
    entry = parse_annotation_regions(result, plan)["r1"]
    assert entry["caption"] == "EXIT 12"
    corrected = CorrectedRegion(seq=1, annotation_id=7, task_id="3", region_id="r1", image="img",
                                region=entry["region"], box=entry["region"].box(), caption="EXIT 12", choices={},
                                label=None, predicted=None, predicted_version=None, created_at=0.0, plan=plan)
    example, = training_examples([corrected], {"img": (tmp_path / "img.png", 96, 64)})
    assert (example.attribute, example.kind, example.answer) == (None, TRANSCRIPTION, "EXIT 12")
    assert region_sample(example).conversations[0]["value"] == transcription_question()


def test_a_region_with_a_description_and_a_transcription_textarea_gets_its_description_only():
    plan = FillPlan.from_label_config(MIXED_CONFIG)
    region = dataclasses.replace(rectangle("r1", tool="bbox"), type="rectangle")
    assert plan.transcriptions == ("ocr_text",)
    assert plan.text_kind(region) == CAPTION
    prediction = build_prediction(plan, [region], [{"caption": "a red sign", "choices": {}, "label": None}], "v1")
    validate_prediction(MIXED_CONFIG, prediction)
    assert [i["from_name"] for i in prediction["result"] if i["type"] == "textarea"] == ["caption"]
    # A correction's text is read from the TextArea of the kind the model is asked.
    geometry = {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0}
    result = [{"id": "r1", "from_name": "bbox", "to_name": "image", "type": "rectangle", "value": geometry},
              {"id": "r1", "from_name": "ocr_text", "to_name": "image", "type": "textarea",
               "value": {**geometry, "text": ["STOP"]}},
              {"id": "r1", "from_name": "caption", "to_name": "image", "type": "textarea",
               "value": {**geometry, "text": ["a red sign"]}}]
    assert parse_annotation_regions(result, plan)["r1"]["caption"] == "a red sign"
