"""Proposed regions in the backend: when they are asked for, the thresholds, and jobs answered with them (the
proposer's regions, labelled from the config, captioned and scored by the describing engine) giving
predictions Label Studio's own validator accepts."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.calibration import Observation, fit
from backend.describe import Description, load_engine
from backend.labelconfig import FillPlan, Region, Tool, validate_prediction
from backend.payloads import make_payload, prediction_from_output
from backend.proposal_stats import ProposalStats, iou, matches, proposal_outcomes, proposal_stats_by_version
from backend.proposals import at_points, describe_jobs, region_of, select
from backend.settings import Settings, SettingsError
from model.engine import Proposal
from tests.support.florence2_factory import save_tiny_florence2
from tests.support.scripted_proposer import WORDS, ScriptedFlorence2

BOXES = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="bbox" toName="image">
    <Label value="car"/><Label value="dog"/><Label value="tree"/>
  </RectangleLabels>
  <TextArea name="caption" toName="image" perRegion="true"/>
  <Choices name="attrs" toName="image" perRegion="true" choice="multiple">
    <Choice value="occluded"/><Choice value="clear"/>
  </Choices>
</View>"""

POLYGONS = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="outline" toName="image">
    <Label value="car"/><Label value="dog"/>
  </PolygonLabels>
  <TextArea name="caption" toName="image" perRegion="true"/>
</View>"""


def settings(**overrides) -> Settings:
    return Settings(**{"proposer": "florence-2", "proposal_nms_iou": 1.0, "proposal_min_size": 0.0, **overrides})


def test_proposals_are_off_by_default_and_asked_where_propose_when_says():
    assert Settings().propose_mode == "never" and not Settings().proposes_for([])
    drawn = Region("a", 1, 1, 10, 10)
    whole = Region.whole_image()
    empty = settings()
    assert empty.propose_mode == "empty"
    assert empty.proposes_for([]) and empty.proposes_for([whole]) and not empty.proposes_for([drawn])
    assert settings(propose_when="always").proposes_for([drawn])
    assert not settings(propose_when="never").proposes_for([])
    assert Settings(proposer="none").propose_mode == "never"
    for wrong, message in [({"proposer": "gpt4roi"}, "PROPOSER must be an engine that can propose"),
                           ({"propose_when": "empty"}, "needs a PROPOSER"),
                           ({"proposer": "florence-2", "propose_when": "sometimes"}, "never, empty or always"),
                           ({"proposer": "florence-2", "proposal_min_score": 2.0}, "PROPOSAL_MIN_SCORE")]:
        with pytest.raises(SettingsError, match=message):
            Settings(**wrong)


def test_thresholds_drop_weak_small_overlapping_and_surplus_regions():
    proposals = [Proposal("car", (0, 0, 50, 50), 0.9), Proposal("car", (2, 2, 50, 50), 0.8),
                 Proposal("dog", (60, 60, 62, 90), 0.7), Proposal("dog", (60, 0, 99, 40), 0.2),
                 Proposal("tree", (10, 60, 40, 99), 0.6), Proposal("tree", (70, 50, 99, 99), 0.5)]
    chosen = select(proposals, Settings(proposer="florence-2", proposal_min_score=0.3, proposal_min_size=4,
                                        proposal_nms_iou=0.7, proposal_max_regions=2))
    assert [p.score for p in chosen] == [0.9, 0.6]
    # Regions the task has count as taken.
    assert [p.score for p in select(proposals[:1], settings(proposal_nms_iou=0.5), taken=[(0, 0, 49, 49)])] == []
    assert len(select(proposals, settings())) == len(proposals)
    assert len(select(proposals, settings(max_regions_per_task=3), taken=[(0, 0, 1, 1)])) == 2


SMART = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="bbox" toName="image"><Label value="car"/><Label value="dog"/></RectangleLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="car"/><Label value="dog"/></KeyPointLabels>
  <KeyPointLabels name="joints" toName="image"><Label value="car"/></KeyPointLabels>
  <TextArea name="caption" toName="image" perRegion="true"/>
</View>"""


def test_a_point_of_a_smart_keypoint_tool_is_a_prompt_for_the_boxes():
    plan = FillPlan.from_label_config(SMART)
    assert [t.smart for t in plan.tools] == [False, True, False]
    assert plan.proposal_tool.name == "bbox"

    def point(tool: str) -> Region:
        return Region("k", 49.0, 49.0, 2.0, 2.0, type="keypointlabels", tool=tool, value={"x": 50, "y": 50})

    assert plan.is_prompt(point("click")) and not plan.is_prompt(point("joints"))
    assert not plan.is_prompt(Region("r", 1, 1, 10, 10, type="rectanglelabels", tool="bbox"))
    keypoints_only = FillPlan.from_label_config(
        '<View><Image name="i" value="$image"/><KeyPointLabels name="k" toName="i" smart="true">'
        '<Label value="nose"/></KeyPointLabels></View>')
    assert not keypoints_only.is_prompt(Region("k", 1, 1, 2, 2, type="keypointlabels", tool="k"))


def test_the_region_found_at_a_point_is_the_best_scored_one_holding_it_with_the_points_label():
    tool = FillPlan.from_label_config(SMART).proposal_tool
    proposals = [Proposal("car", (0, 0, 60, 60), 0.5), Proposal("car", (20, 20, 40, 40), 0.9),
                 Proposal("dog", (10, 10, 50, 50), 0.95), Proposal("dog", (70, 70, 90, 90), 0.4)]
    size = (100, 100)
    assert at_points(proposals, [[0.3, 0.3, "car"]], size, tool) == [proposals[1]]
    assert at_points(proposals, [[0.3, 0.3, None]], size, tool) == [proposals[2]]
    assert at_points(proposals, [[0.05, 0.05, "car"], [0.3, 0.3, "car"], [0.25, 0.25, "car"]], size, tool) == \
        [proposals[0], proposals[1]]
    assert at_points(proposals, [[0.95, 0.05, None]], size, tool) == []


def test_a_proposal_becomes_a_region_of_the_configs_tool():
    boxes, polygons = FillPlan.from_label_config(BOXES), FillPlan.from_label_config(POLYGONS)
    assert boxes.proposal_tool == Tool("bbox", "rectanglelabels", ("car", "dog", "tree"))
    assert polygons.proposal_tool.shape == "polygon"
    box = region_of(Proposal("dog", (10, 20, 50, 60), 0.5), boxes.proposal_tool, (200, 100), "p1")
    assert (box.x, box.y, box.width, box.height, box.labels, box.type) == (5, 20, 20, 40, ("dog",), "rectanglelabels")
    outline = region_of(Proposal("car", (10, 10, 30, 50), 0.5, ((10, 10), (30, 10), (20, 50))),
                        polygons.proposal_tool, (100, 100), "p2")
    assert outline.value == {"points": [[10, 10], [30, 10], [20, 50]], "closed": True}
    assert (outline.x, outline.y, outline.width, outline.height) == (10, 10, 20, 40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_florence2(tmp_path_factory.mktemp("proposals") / "tiny")


@pytest.fixture(scope="module")
def engines(tiny):
    describer = load_engine(tiny, "cpu")
    proposer = load_engine(tiny, "cpu", engine="tests.support.scripted_proposer.ScriptedFlorence2")
    assert isinstance(proposer, ScriptedFlorence2)
    return describer, proposer


def picture(seed: int, size=(96, 64)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("config", [BOXES, POLYGONS])
def test_a_task_without_regions_gets_proposed_regions_captioned_and_valid(engines, config):
    describer, proposer = engines
    plan = FillPlan.from_label_config(config)
    drawn = Region("drawn1", 60, 5, 30, 30, original_width=96, original_height=64, labels=("car",),
                   type=plan.proposal_tool.type, tool=plan.proposal_tool.name,
                   value=None if plan.proposal_tool.shape == "rectangle" else
                   {"points": [[60, 5], [90, 5], [75, 35]], "closed": True})
    jobs = [(Description(picture(1), plan, [], True), True),
            (Description(picture(2), plan, [drawn], True), True),
            (Description(picture(3), plan, [drawn], True), False)]
    answered = describe_jobs(describer, proposer, jobs, 6, settings(propose_when="always"))
    for (item, wanted), (answers, proposed) in zip(jobs, answered, strict=True):
        assert len(answers) == len(item.regions) + len(proposed)
        if not wanted:
            assert proposed == []
            continue
        assert proposed, "the scripted proposer grounds regions"
        assert {r.labels for r in proposed} <= {(word,) for word in WORDS}
        payload = make_payload(task_id=1, project="1", image="/data/upload/1/x.png", plan=plan, regions=item.regions,
                               label_config=config, model_version="v1", keep_drawn_label=True, max_new_tokens=6,
                               propose=True)
        output = {"model_version": "v1", "image_size": list(item.image.size), "regions": answers,
                  "proposed": [r.to_json() for r in proposed]}
        prediction = prediction_from_output(payload, output)
        validate_prediction(config, prediction)
        items = {(r["id"], r["type"]): r for r in prediction["result"]}
        for region, answer in zip(proposed, answers[len(item.regions):], strict=True):
            shape = items[(region.id, plan.proposal_tool.type)]
            assert shape["value"][plan.proposal_tool.type] == list(region.labels)
            assert shape["score"] == pytest.approx(answer["proposal_score"], abs=1e-6)
            assert items[(region.id, "textarea")]["value"]["text"] == [answer["caption"]]


# ---------------------------------------------------------------------- how proposals fared
def test_kept_moved_deleted_added_and_precision_recall_at_iou_half():
    stats = ProposalStats()
    proposed = {"a": (0.0, 0.0, 0.5, 0.5), "b": (0.5, 0.5, 1.0, 1.0), "c": (0.0, 0.6, 0.2, 0.9)}
    final = {"a": (0.0, 0.0, 0.5, 0.5), "b": (0.55, 0.55, 1.0, 1.0), "drawn": (0.6, 0.0, 0.9, 0.3),
             "x": (0.0, 0.62, 0.2, 0.9)}
    stats.add(proposed, ["drawn"], final)
    assert (stats.kept, stats.moved, stats.deleted, stats.added) == (1, 1, 1, 1)
    # c was deleted but x was drawn where it was: the boxes match, whatever the ids.
    assert (stats.matched, stats.precision, stats.recall, stats.drawn_share) == (3, 1.0, 0.75, 0.25)
    assert matches([(0, 0, 1, 1), (0, 0, 1, 1)], [(0, 0, 1, 1)]) == [(0, 0)]
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)


def test_the_store_remembers_proposals_and_the_report_shows_how_they_fared(tmp_path):
    from backend.corrections import CorrectionsStore
    from backend.report import print_report
    from tests.support.hitl import DEMO_CONFIG, annotation_event, make_tasks

    # Unconfirmed annotations count in the report only where they may be trained on.
    settings_ = Settings.from_env({"TRAIN_ON_UNCONFIRMED": "true"}, data_dir=tmp_path / "data",
                                  model_dir=tmp_path / "models")
    store = CorrectionsStore.for_settings(settings_)
    plan = FillPlan.from_label_config(DEMO_CONFIG)
    [task] = make_tasks(tmp_path / "images", "p", 1, 1, seed=5)
    tool = plan.proposal_tool
    size = (task.width, task.height)
    first, second = task.objects[0].box, task.objects[1].box
    shifted = (second[0] + 0.1 * (second[2] - second[0]), *second[1:])
    proposed = [region_of(Proposal(task.objects[0].shape, first, 0.9), tool, size, task.region_id(0)),
                region_of(Proposal("circle", shifted, 0.6), tool, size, task.region_id(1)),
                region_of(Proposal("circle", (0, 0, 3, 3), 0.2), tool, size, "proposed3")]
    payload = make_payload(task_id=task.task_id, project="1", image=task.reference, plan=plan, regions=[],
                           label_config=DEMO_CONFIG, model_version="v1", keep_drawn_label=True, max_new_tokens=8,
                           propose=True)
    answers = [{"id": r.id, "caption": "a shape", "choices": {}, "label": None, "proposal_score": s}
               for r, s in zip(proposed, (0.9, 0.6, 0.2), strict=True)]
    output = {"model_version": "v1", "image_size": list(size), "regions": answers,
              "proposed": [r.to_json() for r in proposed]}
    assert store.record_job_output(payload, output) == 3
    store.record_event(annotation_event(task, 77, DEMO_CONFIG))

    [stats] = proposal_stats_by_version(store.regions(), store.recorded_proposals()).values()
    objects = len(task.objects)
    assert (stats.tasks, stats.proposed, stats.final) == (1, 3, objects)
    assert (stats.kept, stats.moved, stats.deleted, stats.added) == (1, 1, 1, objects - 2)
    assert (stats.precision, stats.recall) == (pytest.approx(2 / 3), pytest.approx(2 / objects))

    out = io.StringIO()
    print_report(settings_, png=tmp_path / "plot.png", out=out)
    assert "precision@0.5" in out.getvalue() and "0.667" in out.getvalue(), out.getvalue()

    # What calibrating the proposer's scores learns from it: each score, and whether a final region matched.
    assert sorted(proposal_outcomes(store.regions(), store.recorded_proposals())) == [
        (0.2, False), (0.6, True), (0.9, True)]


def test_a_proposed_regions_score_is_calibrated_by_the_versions_proposal_curve(engines):
    describer, proposer = engines
    plan = FillPlan.from_label_config(BOXES)
    jobs = [(Description(picture(1), plan, [], True), True)]
    outcomes = [(score / 40, score >= 20) for score in range(40)]
    calibration = fit(Observation("proposal", score, kept) for score, kept in outcomes)
    assert "proposal" in calibration.curves
    [(raw_answers, proposed)] = describe_jobs(describer, proposer, jobs, 4, settings())
    [(answers, _)] = describe_jobs(describer, proposer, jobs, 4, settings(), calibration)
    assert proposed
    for raw, calibrated in zip(raw_answers, answers, strict=True):
        assert raw["confidence"]["label"] == raw["proposal_score"]
        assert calibrated["confidence"]["label"] == calibration.confidence("proposal", raw["proposal_score"])
        assert calibrated["confidence"]["label"] != raw["proposal_score"]
