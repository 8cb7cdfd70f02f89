"""Prometheus metrics of the API (`GET /metrics`): requests, job latencies, failures, queues, model version.

Queue depth, running and failed job counts are read from Redis at scrape time, so every API replica reports
the same shared queues; per-request and per-job figures are this replica's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from backend.jobs import JobQueue, QueueUnavailable

PREFIX = "gpt4roi"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Counters and histograms of one API process, plus a live view of the queues."""

    def __init__(self, queue: JobQueue, version: Callable[[], str]):
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
