"""Prometheus metrics of the API (`GET /metrics`): requests, job latencies, failures, queues, model version,
and what annotators kept of each version's proposals.

Queue depth, running and failed job counts are read from Redis at scrape time, so every API replica reports
the same shared queues; per-request and per-job figures are this replica's. Metric names start with
`gpt4roi_` whatever REDIS_KEY_PREFIX says, so one dashboard serves every deployment.

Acceptance figures (`backend.acceptance`), scraped from the corrections store and recomputed only when it
changed, count the regions a fine-tune may train on (`backend.confirmation.counted`: confirmed by Label
Studio); the others are counted apart (`gpt4roi_unconfirmed_regions`). Label values that came with webhooks
are bounded: a version not registered in MODEL_DIR is counted as `other`, and at most
`MAX_FIELD_LABELS` fields per version (the most proposed ones), each name made printable and clipped to 40
characters, so that nobody who posts events chooses how many series a scrape holds.

| metric | labels | meaning |
|---|---|---|
| `gpt4roi_corrected_regions` | | regions stored from annotations |
| `gpt4roi_unconfirmed_regions` | | of those, regions not confirmed by Label Studio (not counted below) |
| `gpt4roi_corrections_new` | | regions stored since the last finished fine-tune |
| `gpt4roi_predicted_regions` | `version` | regions whose proposal by `version` is known |
| `gpt4roi_acceptance_ratio` | `version` | share of those accepted unchanged |
| `gpt4roi_caption_edit_distance` | `version` | mean normalized caption edit distance |
| `gpt4roi_field_accuracy` | `version`, `field` | share of proposals kept, per field |
| `gpt4roi_annotations` | `confirmation` | stored annotations by what Label Studio said of them |
| `gpt4roi_finetune_last_run` | `status`, `parent`, `candidate` | info about the latest fine-tune |
| `gpt4roi_finetune_last_run_timestamp_seconds` | | when it ended (or started, while running) |
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from backend import registry
from backend.acceptance import AcceptanceStats, acceptance_by_version, label_text
from backend.confirmation import counted
from backend.confirmation import counts as confirmation_counts
from backend.corrections import CorrectionsStore
from backend.jobs import JobQueue, QueueUnavailable
from backend.runs import FinetuneRun, FinetuneRuns
from backend.settings import Settings

PREFIX = "gpt4roi"
# At most this many `field` label values per version (the most proposed fields).
MAX_FIELD_LABELS = 32
OTHER_VERSION = "other"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Counters and histograms of one API process, plus a live view of the queues."""

    def __init__(self, queue: JobQueue, version: Callable[[], str], settings: Settings | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.request_seconds = Histogram(f"{PREFIX}_http_request_seconds", "HTTP request duration by route",
                                         ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.job_seconds = Histogram(
            f"{PREFIX}_job_wait_seconds", "From enqueue to result, as /predict saw it, by queue kind",
            ["kind"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.model_seconds = Histogram(
            f"{PREFIX}_job_model_seconds", "Worker time spent in the model per job, by queue kind",
            ["kind"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.job_failures = Counter(
            f"{PREFIX}_job_failures", "Jobs that ended without a prediction, by kind and reason",
            ["kind", "reason"], registry=self.registry)
        self.handed_off = Counter(
            f"{PREFIX}_jobs_handed_off", "Batch tasks answered later (pushed or asked again) past the deadline",
            registry=self.registry)
        self.registry.register(_QueueCollector(queue, version))
        if settings is not None:
            self.registry.register(_AcceptanceCollector(settings))

    def job_done(self, kind: str, seconds: float, output: Mapping[str, Any] | None, error: str | None) -> None:
        """Record one job as `/predict` saw it end (see `PredictionObserver`)."""
        if output is None and error is None:
            self.handed_off.inc()
            return
        if error == "timeout":
            self.job_failures.labels(kind, "timeout").inc()
            return
        self.job_seconds.labels(kind).observe(seconds)
        timing = (output or {}).get("timing") or {}
        if "model_ms" in timing:
            self.model_seconds.labels(kind).observe(float(timing["model_ms"]) / 1000)
        if error is not None:
            reason = "input" if output and "error" in output else "failed"
            self.job_failures.labels(kind, reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _QueueCollector(Collector):
    def __init__(self, queue: JobQueue, version: Callable[[], str]):
        self.queue = queue
        self.version = version

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(f"{PREFIX}_queue_up", "1 when Redis answers, 0 when it does not")
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Jobs waiting, per queue", labels=["queue"])
        running = GaugeMetricFamily(f"{PREFIX}_queue_running", "Jobs being executed, per queue", labels=["queue"])
        failed = GaugeMetricFamily(f"{PREFIX}_queue_failed", "Jobs failed for good and still kept, per queue",
                                   labels=["queue"])
        try:
            for name, count in self.queue.depths().items():
                depth.add_metric([name], count)
            for name, count in self.queue.running().items():
                running.add_metric([name], count)
            for name, count in self.queue.failed().items():
                failed.add_metric([name], count)
            up.add_metric([], 1)
        except QueueUnavailable:
            up.add_metric([], 0)
        yield from (up, depth, running, failed)
        info = InfoMetricFamily(f"{PREFIX}_model", "The model version /setup returns")
        try:
            info.add_metric([], {"version": self.version()})
        except LookupError:
            info.add_metric([], {"version": ""})
        yield info


def field_labels(item: AcceptanceStats) -> list[tuple[str, float]]:
    """(label, share kept) of at most MAX_FIELD_LABELS fields of a version, the most proposed ones, their
    names made printable and clipped (`label_text`)."""
    busiest = sorted((n for n, (_, total) in item.fields.items() if total),
                     key=lambda n: (-item.fields[n][1], n))[:MAX_FIELD_LABELS]
    labels: dict[str, float] = {}
    for name in sorted(busiest):
        kept, total = item.fields[name]
        labels.setdefault(label_text(name), kept / total)
    return list(labels.items())


class _AcceptanceCollector(Collector):
    """Acceptance per version from the corrections store, recomputed only when the store changed."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None
        self._stats: dict[str, AcceptanceStats] = {}
        self._apart = 0

    def _current(self) -> tuple[dict[str, AcceptanceStats], int, int, int, FinetuneRun | None]:
        store = CorrectionsStore.for_settings(self.settings)
        runs = FinetuneRuns.for_settings(self.settings)
        versions = frozenset(registry.list_versions(self.settings))
        key = (store.max_seq(), store.count_regions(), store.confirmation_mark(), versions)
        with self._lock:
            if key != self._key:
                kept, apart = counted(self.settings, store.regions())
                self._stats = acceptance_by_version(kept, lambda v: v if v in versions else OTHER_VERSION)
                self._apart = len(apart)
                self._key = key
            stats, apart_count = self._stats, self._apart
        return stats, key[1], apart_count, runs.new_regions(), runs.last()

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (called by the Prometheus registry at scrape time)."""
        stats, total, apart, new, last = self._current()
        yield GaugeMetricFamily(f"{PREFIX}_corrected_regions", "Regions stored from annotations", value=total)
        yield GaugeMetricFamily(f"{PREFIX}_unconfirmed_regions", "Stored regions of annotations Label Studio has "
                                "not confirmed (left out of the acceptance figures)", value=apart)
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
            for label, value in field_labels(item):
                fields.add_metric([version, label], value)
        yield from (regions, accepted, distance, fields)
        annotations = GaugeMetricFamily(f"{PREFIX}_annotations", "Stored annotations by their confirmation with Label "
                                        "Studio (only confirmed ones are trained on)", labels=["confirmation"])
        for state, count in confirmation_counts(self.settings).items():
            annotations.add_metric([state], count)
        yield annotations
        if last is not None:
            info = InfoMetricFamily(f"{PREFIX}_finetune_last_run", "The latest fine-tune")
            info.add_metric([], {"status": last.status, "parent": last.parent or "", "candidate": last.candidate or ""})
            yield info
            yield GaugeMetricFamily(f"{PREFIX}_finetune_last_run_timestamp_seconds",
                                    "When the latest fine-tune ended (or started, while running)",
                                    value=last.finished_at or last.started_at)
