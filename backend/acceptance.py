"""Acceptance statistics: how much of what each model version proposed the annotators kept.

For every stored region whose prediction is known (see `backend.corrections`), each field the model
proposed is compared with the annotation's final value:

- **accepted unchanged**: every proposed field (caption, each Choices control, the label) was kept;
- **caption edit distance**: normalized Levenshtein distance between proposed and final caption (0: kept,
  1: nothing in common), averaged over regions with a proposed caption;
- **field accuracy**: per field, the share of regions where the proposal equals the final value.

Two answers are the same when they are after `model.metrics.normalize_answer` (case, spacing and end
punctuation aside), the one rule the model's own evaluation uses too. The same comparison scores a
fine-tune candidate on held-out corrections (`backend.finetune`), so the promotion rule and these
statistics measure one thing.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from model.metrics import normalize_answer


def normalized_edit_distance(a: str, b: str) -> float:
    """Levenshtein distance divided by the longer length (0.0 for two empty strings)."""
    if a == b:
        return 0.0
    if not a or not b:
        return 1.0
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1] / max(len(a), len(b))


def same_answer(a: str | None, b: str | None) -> bool:
    """Whether two answers are the same (`normalize_answer`); None equals only None."""
    if a is None or b is None:
        return a is b
    return normalize_answer(a) == normalize_answer(b)


def compare_fields(predicted: Mapping[str, Any], final: Mapping[str, Any]) -> dict[str, bool]:
    """Field name → whether the annotator kept the proposal, for every field the model proposed: `caption`,
    `label`, and each Choices control by name (the same set of values), compared with `same_answer`."""
    kept: dict[str, bool] = {}
    if predicted.get("caption") is not None:
        kept["caption"] = same_answer(predicted["caption"], final.get("caption"))
    if predicted.get("label") is not None:
        kept["label"] = same_answer(predicted["label"], final.get("label"))
    final_choices = final.get("choices") or {}
    for control, values in (predicted.get("choices") or {}).items():
        kept[control] = {normalize_answer(v) for v in values} == {normalize_answer(v)
                                                                 for v in final_choices.get(control) or []}
    return kept


@dataclass
class AcceptanceStats:
    """Acceptance figures of one model version (or of one evaluation)."""

    regions: int = 0
    accepted: int = 0
    caption_regions: int = 0
    caption_distance: float = 0.0
    fields: dict[str, list[int]] = field(default_factory=dict)

    def add(self, predicted: Mapping[str, Any], final: Mapping[str, Any]) -> dict[str, bool]:
        """Count one region; returns its per-field comparison."""
        kept = compare_fields(predicted, final)
        if not kept:
            return kept
        self.regions += 1
        self.accepted += all(kept.values())
        for name, ok in kept.items():
            counts = self.fields.setdefault(name, [0, 0])
            counts[0] += ok
            counts[1] += 1
        if predicted.get("caption") is not None:
            self.caption_regions += 1
            self.caption_distance += normalized_edit_distance(
                normalize_answer(str(predicted["caption"])), normalize_answer(str(final.get("caption") or "")))
        return kept

    @property
    def acceptance_rate(self) -> float | None:
        """Share of regions accepted unchanged."""
        return self.accepted / self.regions if self.regions else None

    @property
    def caption_edit_distance(self) -> float | None:
        """Mean normalized caption edit distance."""
        return self.caption_distance / self.caption_regions if self.caption_regions else None

    @property
    def field_accuracy(self) -> dict[str, float]:
        """Per field, the share of proposals kept."""
        return {name: kept / total for name, (kept, total) in sorted(self.fields.items()) if total}

    @property
    def overall_field_accuracy(self) -> float | None:
        """Share of all proposed fields kept (micro average)."""
        total = sum(t for _, t in self.fields.values())
        return sum(k for k, _ in self.fields.values()) / total if total else None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for reports and `version.json`."""
        return {
            "regions": self.regions,
            "acceptance_rate": self.acceptance_rate,
            "field_accuracy_overall": self.overall_field_accuracy,
            "caption_edit_distance": self.caption_edit_distance,
            "field_accuracy": self.field_accuracy,
        }


def acceptance_by_version(regions: Iterable[Any],
                          name: Callable[[str], str] | None = None) -> dict[str, AcceptanceStats]:
    """Acceptance per model version over stored regions (`CorrectedRegion`s), in order of first appearance;
    `name` maps each version to the one it is counted under (e.g. unknown versions to one bucket)."""
    stats: dict[str, AcceptanceStats] = {}
    for region in regions:
        if region.predicted is None or region.predicted_version is None:
            continue
        version = region.predicted_version if name is None else name(region.predicted_version)
        stats.setdefault(version, AcceptanceStats()).add(region.predicted, region.final)
    return stats


def label_text(text: Any, limit: int = 40) -> str:
    """A string that came with a webhook (a model version, a control name) made safe to show: control and
    other non-printing characters (terminal escapes among them) replaced by `?`, clipped to `limit`
    characters."""
    shown = "".join(c if c == " " or unicodedata.category(c)[0] not in "CZ" else "?" for c in str(text))
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"
