"""How likely an annotator is to keep what the model proposed: calibrated confidences, and how reliable they are.

The model gives a raw confidence for every field it proposes for a region:

- a Choices control or the RectangleLabels label: the probability of the chosen value in the model's
  distribution over the control's candidates;
- a caption: the geometric mean of its tokens' probabilities (`exp` of the mean token log-probability),
  so that a long caption is not less certain merely for being long;
- a proposed region (PROPOSER): the proposer's score for it, which becomes its label's confidence.

Raw probabilities are over- or under-confident in ways that change with every fine-tune, so each version
carries a `Calibration`: per field kind (`caption`, `choice`, `label`, `proposal`) a monotone curve from the
raw probability to the share of such fields annotators kept (isotonic regression), fitted on held-out
corrections by the fine-tune that made the version (`fit`): for each proposed field, did the annotator keep
it unchanged? For proposed regions: did a region of the annotation match it (IoU 0.5)? A version without one
(the first model) uses the raw probabilities.

A task's score is the probability that the annotator keeps the whole prediction: the product of its
fields' calibrated confidences (`task_score`). Sorting tasks by it, lowest first, puts first the tasks the
model most likely got wrong. `reliability` measures a calibration the way it is used: the expected
calibration error (ECE, 10 equal-width bins) and the AUROC of "kept unchanged" against the confidence.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

CALIBRATION_FILE = "calibration.json"
KINDS = ("caption", "choice", "label", "proposal")


@dataclass(frozen=True)
class Observation:
    """One proposed field of a held-out region: its kind, the model's raw confidence, and whether the
    annotator kept it unchanged."""

    kind: str
    confidence: float
    kept: bool


@dataclass(frozen=True)
class Curve:
    """A monotone map from raw to calibrated confidence: straight lines between the points `(raw, kept)`,
    flat beyond the first and last (isotonic regression's blocks, see `fit`)."""

    raw: tuple[float, ...]
    calibrated: tuple[float, ...]

    def __call__(self, probability: float) -> float:
        xs, ys = self.raw, self.calibrated
        if probability <= xs[0]:
            return ys[0]
        if probability >= xs[-1]:
            return ys[-1]
        high = bisect.bisect_right(xs, probability)
        x0, x1, y0, y1 = xs[high - 1], xs[high], ys[high - 1], ys[high]
        return y0 + (y1 - y0) * (probability - x0) / (x1 - x0)


@dataclass(frozen=True)
class Calibration:
    """The curves of one model version (see the module docstring), and what they were fitted on."""

    curves: dict[str, Curve] = field(default_factory=dict)
    fitted_on: dict[str, int] = field(default_factory=dict)

    def confidence(self, kind: str, raw: float) -> float:
        """The calibrated confidence of a field of `kind` whose raw confidence is `raw`."""
        if kind not in KINDS:
            raise ValueError(f"unknown field kind {kind!r}; expected one of {KINDS}")
        curve = self.curves.get(kind)
        return _clip01(curve(raw) if curve is not None else raw)

    def to_json(self) -> dict[str, Any]:
        return {"curves": {kind: {"raw": list(c.raw), "calibrated": list(c.calibrated)}
                           for kind, c in self.curves.items()},
                "fitted_on": dict(self.fitted_on)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        curves = {}
        for kind, c in (data.get("curves") or {}).items():
            raw, calibrated = tuple(map(float, c["raw"])), tuple(map(float, c["calibrated"]))
            if kind in KINDS and raw and len(raw) == len(calibrated) and list(raw) == sorted(raw):
                curves[str(kind)] = Curve(raw, calibrated)
        return cls(curves, {str(k): int(v) for k, v in (data.get("fitted_on") or {}).items()})

    def save(self, folder: Path) -> Path:
        """Write `calibration.json` into a version folder being staged."""
        path = Path(folder) / CALIBRATION_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: Path) -> Calibration:
        """The calibration of a version folder; the identity when it has none (or an unreadable one)."""
        path = Path(folder) / CALIBRATION_FILE
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()


def confidences(answer: Mapping[str, Any], calibration: Calibration | None = None) -> dict[str, Any]:
    """The calibrated confidence of everything the model answered for one region (a `backend.describe`
    answer): `caption` (from `caption_confidence`, the raw one), `choices` (control → the probability of
    its most likely value) and `label`; None where nothing was answered."""
    calibration = calibration or Calibration()
    raw_caption = answer.get("caption_confidence")
    label = answer.get("label")
    return {
        "caption": None if raw_caption is None else calibration.confidence("caption", float(raw_caption)),
        "choices": {str(name): calibration.confidence("choice", max(distribution.values()))
                    for name, distribution in (answer.get("choices") or {}).items() if distribution},
        "label": calibration.confidence("label", max(label.values())) if label else None,
    }


def field_confidence(confidence: Mapping[str, Any], name: str) -> tuple[str, float | None]:
    """(kind, confidence) of one field as `backend.acceptance.compare_fields` names it: `caption`, `label`,
    or a Choices control's name."""
    if name in ("caption", "label"):
        return name, confidence.get(name)
    return "choice", (confidence.get("choices") or {}).get(name)


def observe(kept: Mapping[str, bool], confidence: Mapping[str, Any]) -> list[Observation]:
    """One region's observations: for each field compared (`backend.acceptance.compare_fields`), its kind,
    the confidence the answer gave it and whether the annotator kept it (fields without one are skipped)."""
    observations = []
    for name, ok in kept.items():
        kind, value = field_confidence(confidence, name)
        if value is not None:
            observations.append(Observation(kind, float(value), bool(ok)))
    return observations


def calibration_report(calibration: Calibration, regions: Sequence[tuple[Sequence[Observation], bool]], *,
                       cross_fit: bool = False) -> dict[str, Any]:
    """What `versions`, `report` and the benches show of a calibration on `regions` (each: its fields'
    observations, and whether it was accepted unchanged): fields per kind, reliability raw and calibrated,
    and the AUROC of "accepted unchanged" against the region's score.

    `regions` are corrections `calibration` was not fitted on, unless `cross_fit`: then they are the ones it
    was fitted on, and each half of them (alternate regions) is measured with curves fitted the same way on
    the other half. Measured on its own data, isotonic regression looks better calibrated than it will be on
    the next corrections."""
    scored = _cross_fitted(regions) if cross_fit else [
        ([_calibrated(calibration, o) for o in observations], ok) for observations, ok in regions]

    def region_auroc(scored_regions: Sequence[tuple[Sequence[Observation], bool]]) -> float | None:
        scores = [task_score(o.confidence for o in observations) for observations, _ in scored_regions]
        return auroc(scores, [ok for _, ok in scored_regions])

    return {"fitted_on": dict(calibration.fitted_on),
            "measured_on": "the fitted corrections, cross-fitted in halves" if cross_fit else "held-out corrections",
            "raw": reliability(Calibration(), [o for observations, _ in regions for o in observations]),
            "calibrated": reliability(Calibration(), [o for observations, _ in scored for o in observations]),
            "region_auroc": {"raw": region_auroc(regions), "calibrated": region_auroc(scored)},
            "regions": len(regions)}


def _calibrated(calibration: Calibration, observation: Observation) -> Observation:
    return replace(observation, confidence=calibration.confidence(observation.kind, observation.confidence))


def _cross_fitted(regions: Sequence[tuple[Sequence[Observation], bool]]
                  ) -> list[tuple[list[Observation], bool]]:
    halves = [[region for index, region in enumerate(regions) if index % 2 == half] for half in (0, 1)]
    other_half = [fit(o for observations, _ in halves[1 - half] for o in observations) for half in (0, 1)]
    return [([_calibrated(other_half[index % 2], o) for o in observations], ok)
            for index, (observations, ok) in enumerate(regions)]


def fit(observations: Iterable[Observation], min_per_kind: int = 20, min_block: int = 5) -> Calibration:
    """Fit one curve per kind with at least `min_per_kind` observations of both outcomes (too few, and the
    raw probabilities are kept: a curve fitted on a handful of regions would be noise).

    The curve is isotonic regression (pool adjacent violators) of "kept" on the raw confidence, whose blocks
    hold at least `min_block` observations each; each block becomes a point (its mean raw confidence, its
    share kept), and the curve joins the points with straight lines, so that tasks keep their order within
    a block instead of tying."""
    by_kind: dict[str, list[Observation]] = {}
    for item in observations:
        by_kind.setdefault(item.kind, []).append(item)
    curves, counts = {}, {}
    for kind, items in by_kind.items():
        kept = sum(item.kept for item in items)
        counts[kind] = len(items)
        if len(items) >= min_per_kind and 0 < kept < len(items):
            curves[kind] = _isotonic(sorted((i.confidence, float(i.kept)) for i in items), min_block)
    return Calibration(curves, counts)


def task_score(confidences: Iterable[float]) -> float:
    """The probability that every proposed field is kept (independent fields): their product; 1.0 for a task
    with nothing proposed is never used (an empty prediction scores 0, see `backend.labelconfig`)."""
    score = 1.0
    for confidence in confidences:
        score *= _clip01(confidence)
    return score


def reliability_bins(confidences: Sequence[float], kept: Sequence[bool], bins: int = 10) -> list[list[float]]:
    """The reliability diagram: per non-empty equal-width bin of confidence, [fields, mean confidence,
    share kept]."""
    if len(confidences) != len(kept):
        raise ValueError("one outcome per confidence")
    totals = [[0, 0.0, 0.0] for _ in range(bins)]
    for confidence, outcome in zip(confidences, kept, strict=True):
        row = totals[min(int(_clip01(confidence) * bins), bins - 1)]
        row[0] += 1
        row[1] += confidence
        row[2] += float(outcome)
    return [[count, total / count, right / count] for count, total, right in totals if count]


def expected_calibration_error(confidences: Sequence[float], kept: Sequence[bool], bins: int = 10) -> float:
    """Σ over equal-width bins of (share of fields in the bin) × |mean confidence − share kept|."""
    rows = reliability_bins(confidences, kept, bins)
    return sum(count * abs(mean - share) for count, mean, share in rows) / len(confidences) if rows else 0.0


def auroc(confidences: Sequence[float], kept: Sequence[bool]) -> float | None:
    """The probability that a kept field has a higher confidence than a corrected one (ties count half);
    None when either outcome is missing."""
    positives = [c for c, k in zip(confidences, kept, strict=True) if k]
    negatives = [c for c, k in zip(confidences, kept, strict=True) if not k]
    if not positives or not negatives:
        return None
    # Mann–Whitney U through ranks (average ranks for ties).
    ordered = sorted((c, k) for c, k in zip(confidences, kept, strict=True))
    rank_sum, i = 0.0, 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j][0] == ordered[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2
        rank_sum += average_rank * sum(1 for _, k in ordered[i:j] if k)
        i = j
    u = rank_sum - len(positives) * (len(positives) + 1) / 2
    return u / (len(positives) * len(negatives))


def reliability(calibration: Calibration, observations: Sequence[Observation]) -> dict[str, dict[str, Any]]:
    """Per kind (and `all`): fields, share kept, ECE, AUROC and the reliability diagram's bins of the
    calibrated confidences."""
    groups: dict[str, list[Observation]] = {"all": list(observations)}
    for item in observations:
        groups.setdefault(item.kind, []).append(item)
    report = {}
    for name, items in groups.items():
        confidences = [calibration.confidence(i.kind, i.confidence) for i in items]
        outcomes = [i.kept for i in items]
        report[name] = {"fields": len(items), "kept": sum(outcomes) / len(items) if items else None,
                        "ece": expected_calibration_error(confidences, outcomes),
                        "auroc": auroc(confidences, outcomes), "bins": reliability_bins(confidences, outcomes)}
    return report


def _isotonic(points: Sequence[tuple[float, float]], min_block: int) -> Curve:
    """Pool adjacent violators over `points` sorted by raw confidence: blocks of [count, Σ raw, Σ kept]
    whose shares kept never decrease, the first ones merged until each holds `min_block` points."""
    blocks: list[list[float]] = []
    for raw, kept in points:
        blocks.append([1, raw, kept])
        while len(blocks) > 1 and (blocks[-2][2] / blocks[-2][0] >= blocks[-1][2] / blocks[-1][0]
                                   or blocks[-2][0] < min_block):
            count, raw_sum, kept_sum = blocks.pop()
            blocks[-1][0] += count
            blocks[-1][1] += raw_sum
            blocks[-1][2] += kept_sum
    while len(blocks) > 1 and blocks[-1][0] < min_block:
        count, raw_sum, kept_sum = blocks.pop()
        blocks[-1] = [blocks[-1][0] + count, blocks[-1][1] + raw_sum, blocks[-1][2] + kept_sum]
    raw = tuple(b[1] / b[0] for b in blocks)
    calibrated = tuple(b[2] / b[0] for b in blocks)
    return Curve(raw, calibrated)


def _clip01(value: float) -> float:
    return min(max(float(value), 0.0), 1.0)
