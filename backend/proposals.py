"""Regions proposed by an engine, then described in the same job.

A job whose payload asks for proposals (`propose`, set where PROPOSE_WHEN says so: `Settings.proposes_for`)
is answered in two steps by the worker: the proposer (PROPOSER, kept resident beside the describing model)
finds the regions of the image for the labels of the labeling config's region tool, and the describing
engine then captions and scores each of them like a drawn region, in the same call as the job's own regions.

The tool proposed for is the config's first rectangle or polygon tool that has labels (else the first without);
a polygon tool gets polygons. Thresholds (settings): PROPOSAL_MIN_SCORE, PROPOSAL_MIN_SIZE (pixels, per side),
PROPOSAL_NMS_IOU (a region overlapping a better scored one, or one the task already has, is dropped) and
PROPOSAL_MAX_REGIONS (and never beyond MAX_REGIONS_PER_TASK in all). A proposed region carries the proposer's
label with the proposer's score, calibrated by the version's `proposal` curve (`backend.calibration`), as the
label's confidence (the label is not asked again), so the prediction's region item shows the region's own
score.

The job's answer lists the proposed regions under `proposed` (`backend.labelconfig.Region` JSON), answered
after the payload's own regions in `regions`; `backend.payloads.prediction_from_output` reads them back.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from backend.calibration import Calibration
from backend.describe import Description, describe_many
from backend.labelconfig import FillPlan, Region, Tool
from backend.proposal_stats import iou
from backend.settings import Settings
from model.engine import Engine, Proposal, ProposalRequest

log = logging.getLogger(__name__)

SHAPE_OF_TOOL = {"rectangle": "box", "polygon": "polygon"}


def proposal_request(plan: FillPlan, image: Any, settings: Settings) -> ProposalRequest | None:
    tool = plan.proposal_tool
    if tool is None:
        return None
    return ProposalRequest(image, tuple(tool.labels), SHAPE_OF_TOOL[tool.shape],
                           max_regions=None, max_new_tokens=settings.proposal_max_new_tokens)


def select(proposals: Sequence[Proposal], settings: Settings, taken: Sequence[Sequence[float]] = ()) -> list[Proposal]:
    """The proposals kept by the thresholds, best scored first; `taken`: pixel boxes of regions the task
    already has."""
    kept: list[Proposal] = []
    boxes = [tuple(box) for box in taken]
    # A task never holds more regions than a request may carry (MAX_REGIONS_PER_TASK).
    room = min(settings.proposal_max_regions, settings.max_regions_per_task - len(boxes))
    for proposal in sorted(proposals, key=lambda p: p.score, reverse=True):
        if len(kept) >= room:
            break
        x1, y1, x2, y2 = proposal.box
        if proposal.score < settings.proposal_min_score:
            continue
        if min(x2 - x1, y2 - y1) <= 0 or min(x2 - x1, y2 - y1) < settings.proposal_min_size:
            continue
        if settings.proposal_nms_iou < 1 and any(iou(proposal.box, box) > settings.proposal_nms_iou for box in boxes):
            continue
        kept.append(proposal)
        boxes.append(proposal.box)
    return kept


def at_points(proposals: Sequence[Proposal], points: Sequence[Sequence[Any]], size: tuple[int, int],
              tool: Tool) -> list[Proposal]:
    """For each prompt point (`[x, y, label]`, x and y normalized, label None or the point's label), the best
    scored proposal whose box holds the point and, when the label is one of the tool's, has that label;
    points where nothing was found give nothing, and a proposal chosen twice is kept once."""
    chosen: list[Proposal] = []
    for x, y, label in points:
        px, py = float(x) * size[0], float(y) * size[1]
        holding = [p for p in proposals if p.box[0] <= px <= p.box[2] and p.box[1] <= py <= p.box[3]
                   and (label not in tool.labels or p.label == label)]
        best = max(holding, key=lambda p: p.score, default=None)
        if best is not None and best not in chosen:
            chosen.append(best)
    return chosen


def region_of(proposal: Proposal, tool: Tool, size: tuple[int, int], region_id: str) -> Region:
    """A proposal as a region of `tool`, in Label Studio's percent coordinates."""
    width, height = size

    def percent(x: float, y: float) -> list[float]:
        return [round(min(max(100 * x / width, 0.0), 100.0), 4), round(min(max(100 * y / height, 0.0), 100.0), 4)]

    x1, y1 = percent(*proposal.box[:2])
    x2, y2 = percent(*proposal.box[2:])
    labels = (proposal.label,) if proposal.label in tool.labels else ()
    value = None
    if tool.shape == "polygon":
        points = proposal.polygon or ((proposal.box[0], proposal.box[1]), (proposal.box[2], proposal.box[1]),
                                      (proposal.box[2], proposal.box[3]), (proposal.box[0], proposal.box[3]))
        corners = [percent(x, y) for x, y in points]
        value = {"points": corners, "closed": True}
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    return Region(id=region_id, x=x1, y=y1, width=x2 - x1, height=y2 - y1, original_width=width,
                  original_height=height, labels=labels, type=tool.type, tool=tool.name, value=value)


def _pixels(region: Region, size: tuple[int, int]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = region.box()
    return (x1 * size[0], y1 * size[1], x2 * size[0], y2 * size[1])


def _without_labels(plan: FillPlan) -> FillPlan:
    # The proposer named the label: the describing engine is not asked it again.
    return dataclasses.replace(plan, tools=tuple(dataclasses.replace(t, labels=()) for t in plan.tools))


def describe_jobs(engine: Engine, proposer: Engine | None, jobs: Sequence[tuple[Description, Any]],
                  max_new_tokens: int, settings: Settings,
                  calibration: Calibration | None = None) -> list[tuple[list[dict[str, Any]], list[Region]]]:
    """`describe_many` for jobs of which some also get proposed regions (their payload's `propose`: `True`
    for every region the proposer finds, `{"points": [[x, y, label], …]}` for those at prompt points); per
    job its answers (its own regions', then the proposed regions') and the proposed regions."""
    proposed: dict[int, tuple[Tool, list[tuple[Region, Proposal]]]] = {}
    asks = [(index, item) for index, (item, wanted) in enumerate(jobs) if wanted]
    if asks and proposer is None:
        log.warning("%d jobs ask for proposed regions, but this worker has no PROPOSER", len(asks))
        asks = []
    requests = [(index, item, proposal_request(item.plan, item.image, settings)) for index, item in asks]
    requests = [(index, item, request) for index, item, request in requests if request is not None]
    if requests:
        found = proposer.propose([request for _, _, request in requests])
        for (index, item, _), proposals in zip(requests, found, strict=True):
            tool = item.plan.proposal_tool
            size = item.image.size
            taken = [_pixels(r, size) for r in item.regions if r.shape != "image"]
            ids = {r.id for r in item.regions}
            regions = []
            wanted = jobs[index][1]
            points = wanted.get("points") if isinstance(wanted, dict) else None
            kept = at_points(proposals, points, size, tool) if points else select(proposals, settings, taken)
            for proposal in kept:
                region_id = f"proposed{len(regions) + 1}"
                while region_id in ids:
                    region_id += "_"
                regions.append((region_of(proposal, tool, size, region_id), proposal))
            proposed[index] = (tool, regions)
    items = [item for item, _ in jobs]
    extra = [index for index in proposed if proposed[index][1]]
    items += [Description(jobs[index][0].image, _without_labels(jobs[index][0].plan),
                          [region for region, _ in proposed[index][1]], jobs[index][0].keep_drawn_label)
              for index in extra]
    answers = describe_many(engine, items, max_new_tokens, calibration)
    result = [(list(answers[index]), []) for index in range(len(jobs))]
    for index, proposed_answers in zip(extra, answers[len(jobs):], strict=True):
        tool, regions = proposed[index]
        for (region, proposal), answer in zip(regions, proposed_answers, strict=True):
            if region.labels:
                answer["label"] = {proposal.label: proposal.score}
                score = (calibration or Calibration()).confidence("proposal", proposal.score)
                answer["confidence"] = {**answer["confidence"], "label": score}
            answer["proposal_score"] = proposal.score
        result[index] = (result[index][0] + proposed_answers, [region for region, _ in regions])
    return result
