"""Pre-annotate a whole Label Studio project through the queue, without any long HTTP call.

`python -m backend prelabel --project ID` reads the project's labeling config and tasks through Label
Studio's API (`backend.labelstudio`), skips tasks that already have a prediction of the current model
version (so a rerun only does what is missing) and tasks without rectangles, and enqueues one batch job
per remaining task. Each job pushes its prediction to Label Studio as soon as it finishes; the command
shows a progress bar (tasks done, pushed, failed) until every job ended (or `--no-wait`).

The wait never outlasts what a job can take: without a worker alive on the batch queue (a worker on another
Redis or key prefix, none started, or the only one killed: RQ forgets it at most 90 s after it died in a job)
nothing queued can end, and it stops after `NO_WORKER_GRACE_S` saying so; with workers, a wait in which no job
ended for longer than a job may run (BATCH_JOB_TIMEOUT, plus the time a dead worker's job takes to be
noticed) stops too. Either way it names the tasks whose jobs never ended, and the command exits with 1. A
rerun queues only what is still missing.

Label Studio's Data Manager fills its *Prediction score* column (and sorts by it) from the predictions of
the project's chosen prelabeling version only, which `connect` sets to the live model. `--sort-by-score`
makes the version just pushed the chosen one once every job ended, so that the least certain tasks can
be put first; `connect`, or the next promotion, goes back to the live model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backend import registry
from backend.jobs import JobQueue, QueueFull, connect
from backend.labelconfig import FillPlan, TaskError, regions_from_task
from backend.labelstudio import LabelStudioClient
from backend.payloads import make_payload
from backend.settings import Settings

_WAIT_SLICE_S = 1.0
# How long the wait tolerates no worker on the batch queue (one restarting, one still loading its model).
NO_WORKER_GRACE_S = 30.0


@dataclass
class PrelabelSummary:
    """What a prelabel run did."""

    project: int
    model_version: str
    tasks: int = 0
    already_predicted: int = 0
    without_boxes: int = 0
    proposing: int = 0  # tasks whose regions the proposer finds (PROPOSE_WHEN)
    enqueued: int = 0
    pushed: int = 0
    nothing_found: int = 0  # tasks where the proposer found no region: nothing to push
    failed: list[str] = field(default_factory=list)
    pending: int = 0
    # Why the wait stopped before every job ended (no worker, or jobs that never end); empty otherwise.
    stalled: str = ""
    version_chosen: bool | None = None  # None: not asked (`sort_by_score`)

    def describe(self) -> str:
        """One paragraph for the terminal."""
        lines = [
            f"project {self.project}, model version {self.model_version}: {self.tasks} tasks",
            f"  already predicted by this version: {self.already_predicted}",
            f"  without rectangles (nothing to describe): {self.without_boxes}",
            *([f"  with proposed regions (PROPOSE_WHEN): {self.proposing}"] if self.proposing else []),
            *([f"  where the proposer found nothing: {self.nothing_found}"] if self.nothing_found else []),
            f"  enqueued: {self.enqueued}, pushed: {self.pushed}, still running: {self.pending}, "
            f"failed: {len(self.failed)}",
        ]
        lines += [f"  failed: {message}" for message in self.failed[:20]]
        if self.stalled:
            lines.append(f"  stopped waiting: {self.stalled}")
        if self.version_chosen:
            lines.append(f"  prelabeling version of the project: {self.model_version} (the Data Manager's "
                         "Prediction score column shows its scores; `connect` goes back to the live model)")
        elif self.version_chosen is False:
            lines.append("  prelabeling version left as it was: jobs are still running; rerun with "
                         "--sort-by-score once they end")
        return "\n".join(lines)


def run_prelabel(settings: Settings, project: int, *, wait: bool = True, timeout: float | None = None,
                 client: LabelStudioClient | None = None, queue: JobQueue | None = None,
                 progress: bool = True, sort_by_score: bool = False,
                 stall_timeout: float | None = None) -> PrelabelSummary:
    """Enqueue push jobs for every task of `project` that lacks a prediction of the current version; with
    `sort_by_score`, make that version the project's prelabeling version once no job is left running.

    `stall_timeout`: seconds without any job ending after which the wait stops and reports the jobs left
    (default: what one job may take, see the module docstring)."""
    client = client or LabelStudioClient(settings)
    if queue is None:
        queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    version = registry.current_version(settings)
    label_config = client.project(project)["label_config"]
    plan = FillPlan.from_label_config(label_config)
    summary = PrelabelSummary(project=project, model_version=version)
    jobs: dict[str, Any] = {}
    for task in client.tasks(project):
        summary.tasks += 1
        if any(isinstance(p, Mapping) and p.get("model_version") == version for p in task.get("predictions") or []):
            summary.already_predicted += 1
            continue
        try:
            regions = regions_from_task(plan, task, settings.keypoint_box_size)
            image = plan.image_reference(task)
            task_plan = plan.for_task(task, settings.max_choices_per_control)
        except TaskError as exc:
            summary.failed.append(f"task {task.get('id')}: {exc}")
            continue
        propose = settings.proposes_for(regions)  # PROPOSE_WHEN: the worker's proposer finds regions
        if not regions and not propose:
            summary.without_boxes += 1
            continue
        summary.proposing += propose
        payload = make_payload(
            task_id=task["id"], project=str(project), image=image, plan=task_plan, regions=regions,
            label_config=label_config, model_version=version, keep_drawn_label=settings.keep_drawn_label,
            max_new_tokens=settings.max_new_tokens, propose=propose)
        _wait_for_room(queue)
        jobs[queue.submit(payload, interactive=False, push=True)] = task["id"]
    summary.enqueued = len(jobs)
    if wait and jobs:
        if stall_timeout is None:
            stall_timeout = settings.batch_job_timeout + 3 * settings.worker_heartbeat_ttl + _WAIT_SLICE_S
        _wait(queue, jobs, summary, timeout, progress, stall_timeout)
    else:
        summary.pending = len(jobs)
    if sort_by_score:
        if not summary.pending:
            client.update_project(project, model_version=version)
        summary.version_chosen = not summary.pending
    return summary


def _wait_for_room(queue: JobQueue) -> None:
    # A project larger than MAX_QUEUED_JOBS is queued as fast as the workers take jobs.
    while True:
        try:
            queue.ensure_room(1)
            return
        except QueueFull:
            time.sleep(_WAIT_SLICE_S)


def _wait(queue: JobQueue, jobs: Mapping[str, Any], summary: PrelabelSummary, timeout: float | None,
          progress: bool, stall_timeout: float) -> None:
    from tqdm import tqdm

    remaining = dict(jobs)
    now = time.monotonic()
    deadline = None if timeout is None else now + timeout
    last_end = now  # when a job last ended (or the wait began)
    worker_seen = now  # when a worker on the batch queue was last seen
    with tqdm(total=len(jobs), unit="task", desc="prelabel", disable=not progress) as bar:
        while remaining and (deadline is None or time.monotonic() < deadline):
            for job_id, outcome in queue.wait(list(remaining), _WAIT_SLICE_S).items():
                task_id = remaining.pop(job_id)
                value = outcome.value or {}
                if not outcome.ok or "error" in value:
                    error = outcome.error or value["error"].get("message")
                    summary.failed.append(f"task {task_id}: {error}")
                elif value.get("pushed"):
                    summary.pushed += 1
                elif not value.get("regions"):
                    summary.nothing_found += 1
                else:
                    summary.failed.append(f"task {task_id}: finished but was not pushed")
                last_end = time.monotonic()
                bar.set_postfix_str(f"pushed {summary.pushed}, failed {len(summary.failed)}", refresh=False)
                bar.update(1)
            if not remaining:
                break
            now = time.monotonic()
            if queue.batch_workers():
                worker_seen = now
            elif now - worker_seen > NO_WORKER_GRACE_S:
                summary.stalled = (
                    f"no worker has listened on the batch queue {queue.batch.name} (Redis at {queue.url}) for "
                    f"{NO_WORKER_GRACE_S:.0f} s, so the jobs of tasks {_some(remaining)} cannot end. Start "
                    "`python -m backend worker` with this REDIS_URL and REDIS_KEY_PREFIX (a `serve` without "
                    "REDIS_URL keeps its Redis to itself: give it and prelabel the same REDIS_URL), then rerun "
                    "prelabel: it queues only the tasks still without a prediction")
                break
            if now - last_end > stall_timeout:
                summary.stalled = (
                    f"no job ended for {stall_timeout:.0f} s, longer than a job may run (BATCH_JOB_TIMEOUT): "
                    f"the jobs of tasks {_some(remaining)} never ended. Check the workers' logs; a rerun "
                    "queues the tasks still without a prediction")
                break
    summary.pending = len(remaining)


def _some(remaining: Mapping[str, Any], shown: int = 20) -> str:
    """The tasks of the jobs left, the first `shown` of them, and how many in all."""
    tasks = ", ".join(str(task) for task in list(remaining.values())[:shown])
    return tasks if len(remaining) <= shown else f"{tasks} … ({len(remaining)} in all)"
