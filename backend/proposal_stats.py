"""How proposed regions fared: which the annotator kept, moved or deleted, which regions were added by hand,
and the proposals' precision and recall at IoU 0.5, per model version.

The worker records each proposed region (its id, normalized box and label) beside what it predicted for it
(`backend.corrections.CorrectionsStore.record_job_output`). A submitted annotation of such a task is its final
set of regions; Label Studio keeps a prediction's region ids when an annotator accepts and edits it, so:

- kept: a proposed region still there (same id) where it was (IoU with the proposal at least `KEPT_IOU`);
- moved: still there, reshaped or moved (IoU below `KEPT_IOU`);
- deleted: no longer there;
- added: a final region that was neither proposed nor among the task's regions the job described.

Precision and recall count boxes, not ids: a proposal is a true positive when it matches a final region of
the task at IoU 0.5 or more (greedy one-to-one matching, best overlaps first), whatever happened to its id;
precision is the share of proposals matched, recall the share of final regions matched.

Pure Python: the API's report reads it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Box = Sequence[float]
MATCH_IOU = 0.5
KEPT_IOU = 0.95


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matches(proposed: Sequence[Box], final: Sequence[Box], threshold: float = MATCH_IOU) -> list[tuple[int, int]]:
    """(proposal index, final index) pairs matched one-to-one at IoU >= `threshold`, best overlaps first."""
    pairs = sorted((-iou(p, f), i, j) for i, p in enumerate(proposed) for j, f in enumerate(final))
    used_p: set[int] = set()
    used_f: set[int] = set()
    found = []
    for negative, i, j in pairs:
        if -negative < threshold:
            break
        if i in used_p or j in used_f:
            continue
        used_p.add(i)
        used_f.add(j)
        found.append((i, j))
    return found


@dataclass
class ProposalStats:
    """Counts over the annotated tasks whose regions a version's jobs proposed."""

    tasks: int = 0
    proposed: int = 0
    final: int = 0
    kept: int = 0
    moved: int = 0
    deleted: int = 0
    added: int = 0
    matched: int = 0

    def add(self, proposed: Mapping[str, Box], described: Iterable[str], final: Mapping[str, Box]) -> None:
        """One task: its proposals by region id, the ids of the other regions its job described, and the
        annotation's final regions by id."""
        described = set(described)
        self.tasks += 1
        self.proposed += len(proposed)
        self.final += len(final)
        for region_id, box in proposed.items():
            if region_id not in final:
                self.deleted += 1
            elif iou(box, final[region_id]) >= KEPT_IOU:
                self.kept += 1
            else:
                self.moved += 1
        self.added += sum(1 for region_id in final if region_id not in proposed and region_id not in described)
        self.matched += len(matches(list(proposed.values()), list(final.values())))

    @property
    def precision(self) -> float | None:
        return self.matched / self.proposed if self.proposed else None

    @property
    def recall(self) -> float | None:
        return self.matched / self.final if self.final else None

    @property
    def drawn_share(self) -> float | None:
        """The share of final regions annotators drew themselves."""
        return self.added / self.final if self.final else None


Recorded = Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]


def proposal_stats_by_version(regions: Sequence[Any], predictions: Recorded) -> dict[str, ProposalStats]:
    """Per model version, how its proposals fared. `regions`: the stored corrected regions
    (`backend.annotations.CorrectedRegion`: `annotation_id`, `task_id`, `region_id`, `box`, `seq`);
    `predictions`: task id → version → region id → recorded fields, a proposed region's holding `proposal`
    with its `box`. A task counts once, with its newest annotation, for the newest version that proposed for
    it."""
    stats: dict[str, ProposalStats] = {}
    for version, fields, final in _annotated_proposals(regions, predictions):
        proposed = {rid: tuple(f["proposal"]["box"]) for rid, f in fields.items() if "proposal" in f}
        described = [rid for rid, f in fields.items() if "proposal" not in f]
        stats.setdefault(version, ProposalStats()).add(proposed, described, final)
    return stats


def proposal_outcomes(regions: Sequence[Any], predictions: Recorded) -> list[tuple[float, bool]]:
    """Per scored proposal of the annotated tasks (as `proposal_stats_by_version` counts them): its score and
    whether it matched a final region at IoU 0.5, what calibrating proposal scores needs."""
    outcomes = []
    for _, fields, final in _annotated_proposals(regions, predictions):
        scored = [f["proposal"] for f in fields.values()
                  if "proposal" in f and isinstance(f["proposal"].get("score"), (int, float))]
        matched = {i for i, _ in matches([tuple(p["box"]) for p in scored], list(final.values()))}
        outcomes += [(float(p["score"]), index in matched) for index, p in enumerate(scored)]
    return outcomes


def _annotated_proposals(regions: Sequence[Any], predictions: Recorded
                         ) -> Iterable[tuple[str, Mapping[str, Mapping[str, Any]], dict[str, Box]]]:
    """(version, its recorded fields by region id, the final regions by id) per annotated task a version
    proposed for."""
    newest: dict[str, int] = {}
    for region in regions:
        if region.task_id is not None and str(region.task_id) in predictions:
            task = str(region.task_id)
            newest[task] = max(newest.get(task, region.annotation_id), region.annotation_id)
    finals: dict[str, dict[str, Box]] = {}
    for region in regions:
        task = None if region.task_id is None else str(region.task_id)
        if task in newest and region.annotation_id == newest[task]:
            finals.setdefault(task, {})[str(region.region_id)] = tuple(region.box)
    for task, final in finals.items():
        versions = {version: fields for version, fields in predictions[task].items()
                    if any("proposal" in f for f in fields.values())}
        if not versions:
            continue
        version = max(versions, key=lambda v: max(f.get("created_at", 0.0) for f in versions[v].values()))
        yield version, versions[version], final
