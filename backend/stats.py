"""Acceptance statistics: how much of what each model version proposed the annotators kept.

For every stored region whose prediction is known (see `backend.corrections`), each field the model
proposed is compared with the annotation's final value:

- **accepted unchanged**: every proposed field (caption, each Choices control, the label) was kept;
- **caption edit distance**: normalized Levenshtein distance between proposed and final caption (0: kept,
  1: nothing in common), averaged over regions with a proposed caption;
- **field accuracy**: per field, the share of regions where the proposal equals the final value.

The same comparison scores a fine-tune candidate on held-out corrections (`backend.finetune`), so the
promotion rule and these statistics measure one thing.

`register_metrics(registry, settings)` adds these figures to a Prometheus registry (scraped from the
store, recomputed only when the store changed):

| metric | labels | meaning |
|---|---|---|
| `gpt4roi_corrected_regions` | | regions stored from annotations |
| `gpt4roi_corrections_new` | | regions stored since the last finished fine-tune |
| `gpt4roi_predicted_regions` | `version` | regions whose proposal by `version` is known |
| `gpt4roi_acceptance_ratio` | `version` | share of those accepted unchanged |
| `gpt4roi_caption_edit_distance` | `version` | mean normalized caption edit distance |
| `gpt4roi_field_accuracy` | `version`, `field` | share of proposals kept, per field |
| `gpt4roi_finetune_last_run` | `status`, `parent`, `candidate` | info about the latest fine-tune |
| `gpt4roi_finetune_last_run_timestamp_seconds` | | when it ended (or started, while running) |
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from backend.settings import Settings

PREFIX = "gpt4roi"


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


def _same_text(a: str | None, b: str | None) -> bool:
    return " ".join((a or "").split()) == " ".join((b or "").split()) and (a is None) == (b is None)


def compare_fields(predicted: Mapping[str, Any], final: Mapping[str, Any]) -> dict[str, bool]:
    """Field name → whether the annotator kept the proposal, for every field the model proposed: `caption`
    (whitespace-normalized text), `label`, and each Choices control by name (same set of values)."""
    kept: dict[str, bool] = {}
    if predicted.get("caption") is not None:
        kept["caption"] = _same_text(predicted["caption"], final.get("caption"))
    if predicted.get("label") is not None:
        kept["label"] = predicted["label"] == final.get("label")
    final_choices = final.get("choices") or {}
    for control, values in (predicted.get("choices") or {}).items():
        kept[control] = set(values) == set(final_choices.get(control) or [])
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
                " ".join(str(predicted["caption"]).split()), " ".join(str(final.get("caption") or "").split()))
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


def acceptance_by_version(regions: Iterable[Any]) -> dict[str, AcceptanceStats]:
    """Acceptance per model version over stored regions (`CorrectedRegion`s), in order of first appearance."""
    stats: dict[str, AcceptanceStats] = {}
    for region in regions:
        if region.predicted is None or region.predicted_version is None:
            continue
        stats.setdefault(region.predicted_version, AcceptanceStats()).add(region.predicted, region.final)
    return stats


def collect(settings: Settings) -> dict[str, AcceptanceStats]:
    """Acceptance per model version from the corrections store of `settings`."""
    from backend.corrections import CorrectionsStore

    return acceptance_by_version(CorrectionsStore.for_settings(settings).regions())


# ---------------------------------------------------------------------- Prometheus
class AcceptanceCollector:
    """Prometheus collector over the corrections store (see the module docstring for the metrics)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._key: tuple[int, int] | None = None
        self._stats: dict[str, AcceptanceStats] = {}

    def _current(self) -> tuple[dict[str, AcceptanceStats], int, int, Any]:
        from backend.corrections import CorrectionsStore

        store = CorrectionsStore.for_settings(self.settings)
        key = (store.max_seq(), store.count_regions())
        with self._lock:
            if key != self._key:
                self._stats = acceptance_by_version(store.regions())
                self._key = key
            stats = self._stats
        return stats, key[1], store.new_regions(), store.last_run()

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (called by the Prometheus registry at scrape time)."""
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        stats, total, new, last = self._current()
        yield GaugeMetricFamily(f"{PREFIX}_corrected_regions", "Regions stored from annotations", value=total)
        yield GaugeMetricFamily(f"{PREFIX}_corrections_new", "Regions stored since the last finished fine-tune",
                                value=new)
        regions = GaugeMetricFamily(f"{PREFIX}_predicted_regions", "Corrected regions whose proposal is known",
                                    labels=["version"])
        accepted = GaugeMetricFamily(f"{PREFIX}_acceptance_ratio", "Share of proposed regions accepted unchanged",
                                     labels=["version"])
        distance = GaugeMetricFamily(f"{PREFIX}_caption_edit_distance",
                                     "Mean normalized edit distance from proposed to final caption", labels=["version"])
        fields = GaugeMetricFamily(f"{PREFIX}_field_accuracy", "Share of proposals kept, per field",
                                   labels=["version", "field"])
        for version, item in stats.items():
            regions.add_metric([version], item.regions)
            if item.acceptance_rate is not None:
                accepted.add_metric([version], item.acceptance_rate)
            if item.caption_edit_distance is not None:
                distance.add_metric([version], item.caption_edit_distance)
            for name, value in item.field_accuracy.items():
                fields.add_metric([version, name], value)
        yield from (regions, accepted, distance, fields)
        if last is not None:
            info = InfoMetricFamily(f"{PREFIX}_finetune_last_run", "The latest fine-tune")
            info.add_metric([], {"status": last.status, "parent": last.parent or "", "candidate": last.candidate or ""})
            yield info
            yield GaugeMetricFamily(f"{PREFIX}_finetune_last_run_timestamp_seconds",
                                    "When the latest fine-tune ended (or started, while running)",
                                    value=last.finished_at or last.started_at)


def register_metrics(registry: Any, settings: Settings) -> AcceptanceCollector:
    """Add the acceptance metrics to a `prometheus_client.CollectorRegistry`; returns the collector."""
    collector = AcceptanceCollector(settings)
    registry.register(collector)
    return collector
