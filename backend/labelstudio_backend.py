"""The Label Studio ML backend itself: `setup`, `predict`, `fit`, `versions`, independent of HTTP.

`predict(tasks, context)` answers Label Studio's two kinds of `/predict`:

- **interactive** (`params.context.result` holds the drawn rectangle(s), one task): one job on the
  interactive queue; the answer is the drawn region echoed, plus its caption, choices and label under the
  same id. Waits at most INTERACTIVE_TIMEOUT, then `PredictionTimeout` (HTTP 504).
- **batch** (no context: "Retrieve Predictions", opening a task, the label stream): one job per task, on
  the interactive queue for a single task and on the batch queue otherwise; boxes come from the task's
  annotations or predictions. Label Studio needs exactly one item per task, in order, in a non-empty list,
  and skips items without a `result` key. So /predict waits up to BATCH_PREDICT_DEADLINE (INTERACTIVE_TIMEOUT
  for a single task); the tasks finished by then get their prediction, the others get an item without
  `result` and their jobs push the prediction through the Label Studio API when they finish (when
  LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are set; otherwise the finished result is kept for
  JOB_RESULT_TTL and returned at once the next time Label Studio asks). A task without any rectangle gets
  an empty prediction (`result: []`, score 0).

Every prediction carries the `/setup` model version and a score, and passes
`LabelInterface.validate_prediction` before it leaves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from backend import registry
from backend.corrections import CorrectionsStore
from backend.jobs import JobQueue, Outcome, QueueUnavailable, enqueue_finetune
from backend.labelconfig import (
    ConfigError,
    FillPlan,
    PredictionInvalid,
    Region,
    TaskError,
    regions_from_context,
    regions_from_task,
)
from backend.labelstudio import upload_project
from backend.payloads import make_payload, prediction_from_output
from backend.runs import FinetuneRuns
from backend.settings import Settings

log = logging.getLogger(__name__)

# How long /predict keeps waiting for a job that its worker finished just as the deadline passed.
_RACE_GRACE_S = 2.0
# Labeling configs and extra params remembered from /setup, for that many projects (the most recent).
_PROJECTS_KEPT = 1024


class RequestError(ValueError):
    """The request cannot be answered as sent (HTTP 4xx with the message)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class PredictionTimeout(RuntimeError):
    """An interactive prediction missed its deadline (HTTP 504)."""


class PredictionFailed(RuntimeError):
    """Jobs failed for good (HTTP 500 with the reason)."""


class PredictionObserver(Protocol):
    """Receives what happened to each job (the API's metrics implement it)."""

    def job_done(self, kind: str, seconds: float, output: Mapping[str, Any] | None, error: str | None) -> None:
        """One job ended (or was handed off / timed out when `output` and `error` are both None)."""


@dataclass
class _TaskJob:
    index: int
    payload: dict[str, Any]
    job_id: str = ""


class GPT4RoIBackend:
    """GPT4RoI region captions and attributes for Label Studio, computed by queue workers."""

    def __init__(self, settings: Settings, queue: JobQueue, observer: PredictionObserver | None = None):
        self.settings = settings
        self.queue = queue
        self.observer = observer
        self._projects: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ setup / versions
    @property
    def model_version(self) -> str:
        """The current model version (read from the registry pointer, never from the model)."""
        return registry.current_version(self.settings)

    def setup(self, project: str | None, schema: str | None, extra_params: Any) -> dict[str, str]:
        """Remember a project's labeling config and extra params; answer the current model version."""
        if schema:
            self._plan(schema)
        if extra_params is not None and not isinstance(extra_params, Mapping):
            raise RequestError("extra_params must be a JSON object or null", status=422)
        self._max_new_tokens({"extra_params": extra_params})
        if project:
            with self._lock:
                key = _project_id(project)
                self._projects[key] = {"schema": schema, "extra_params": dict(extra_params or {})}
                self._projects.move_to_end(key)
                while len(self._projects) > _PROJECTS_KEPT:
                    self._projects.popitem(last=False)
        return {"model_version": self.model_version}

    def versions(self) -> dict[str, Any]:
        """Every registered version and the current one, with the engine that serves each."""
        current = self.model_version
        infos = registry.version_infos(self.settings)
        versions = [info.name for info in infos]
        if current not in versions:
            versions.append(current)
        return {"versions": versions, "current_version": current,
                "engines": {info.name: info.engine for info in infos}}

    # ------------------------------------------------------------------ predict
    def predict(self, tasks: Sequence[Any], context: Mapping[str, Any] | None = None, *,
                label_config: str | None = None, project: str | None = None) -> list[dict[str, Any]]:
        """One prediction item per task, in order (see the module docstring)."""
        if not isinstance(tasks, Sequence) or isinstance(tasks, (str, bytes)) or not tasks:
            raise RequestError("'tasks' must be a non-empty list of tasks", status=400)
        if len(tasks) > self.settings.max_tasks_per_request:
            raise RequestError(f"{len(tasks)} tasks in one request, more than MAX_TASKS_PER_REQUEST="
                               f"{self.settings.max_tasks_per_request}: select fewer, or use "
                               "`python -m backend prelabel` for whole projects", status=413)
        for index, task in enumerate(tasks):
            if not isinstance(task, Mapping) or not isinstance(task.get("data"), Mapping):
                raise RequestError(f"tasks[{index}] is not a Label Studio task (an object with a 'data' object)")
        stored = self._projects.get(_project_id(project)) if project else None
        config = label_config or (stored or {}).get("schema")
        if not config:
            raise RequestError("no labeling config: send 'label_config' (Label Studio does) or call /setup first")
        plan = self._plan(config)
        version = self.model_version
        max_new_tokens = self._max_new_tokens(stored)
        if context is not None and not isinstance(context, Mapping):
            raise RequestError("params.context must be an object or null", status=400)
        if context and context.get("result") is not None:
            if len(tasks) != 1:
                raise RequestError(f"an interactive request carries one task, got {len(tasks)}", status=400)
            return [self._interactive(tasks[0], context, plan, config, version, project, max_new_tokens)]
        return self._batch(tasks, plan, config, version, project, max_new_tokens)

    def _plan(self, config: str) -> FillPlan:
        # Before parsing: the config is parsed, kept per project and copied into every job.
        size = len(config.encode())
        if size > self.settings.max_label_config_bytes:
            raise RequestError(f"the labeling config is {size} bytes, more than MAX_LABEL_CONFIG_BYTES="
                               f"{self.settings.max_label_config_bytes}", status=413)
        try:
            plan = FillPlan.from_label_config(config)
            plan.check_limits(self.settings.max_choices_per_control, self.settings.max_name_length,
                              self.settings.max_controls_per_region, self.settings.max_candidates_per_region)
        except ConfigError as exc:
            raise RequestError(str(exc)) from None
        return plan

    def _regions(self, regions: list[Region], where: str) -> list[Region]:
        if len(regions) > self.settings.max_regions_per_task:
            raise RequestError(f"{where}: {len(regions)} regions, more than MAX_REGIONS_PER_TASK="
                               f"{self.settings.max_regions_per_task}", status=413)
        return regions

    def _max_new_tokens(self, stored: Mapping[str, Any] | None) -> int:
        value = ((stored or {}).get("extra_params") or {}).get("max_new_tokens", self.settings.max_new_tokens)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 512:
            raise RequestError(f"extra_params.max_new_tokens must be an integer in 1..512, got {value!r}")
        return value

    def _payload(self, task: Mapping[str, Any], plan: FillPlan, regions: list, config: str, version: str,
                 project: str | None, max_new_tokens: int,
                 propose: bool | Mapping[str, Any] = False) -> dict[str, Any]:
        try:
            image = plan.image_reference(task)
            plan = plan.for_task(task, self.settings.max_choices_per_control)
        except TaskError as exc:
            raise RequestError(str(exc)) from None
        owner = upload_project(image, self.settings.label_studio_url)
        # The backend's token reads every project's uploads: a request gets only those of the project it names.
        if owner is not None and (not project or owner != _project_id(project)):
            asking = f"project {_project_id(project)}" if project else "a request that names no project"
            raise RequestError(f"the image {image[:200]!r} is an upload of project {owner}; {asking} may use only "
                               "its own uploads", status=403)
        return make_payload(
            task_id=task.get("id"), project=_project_id(project) if project else None, image=image, plan=plan,
            regions=regions, label_config=config, model_version=version,
            keep_drawn_label=self.settings.keep_drawn_label, max_new_tokens=max_new_tokens, propose=propose)

    def _interactive(self, task: Mapping[str, Any], context: Mapping[str, Any], plan: FillPlan, config: str,
                     version: str, project: str | None, max_new_tokens: int) -> dict[str, Any]:
        try:
            drawn = regions_from_context(plan, context, self.settings.keypoint_box_size)
            regions = self._regions(drawn, "the drawn regions")
        except TaskError as exc:
            raise RequestError(str(exc)) from None
        if not regions:
            return _empty(version)
        # A point placed with a smart KeyPoint tool asks for the region the proposer finds there.
        prompts = [r for r in regions if plan.is_prompt(r)] if self.settings.proposer else []
        points = [[float(r.value["x"]) / 100, float(r.value["y"]) / 100, r.labels[0] if r.labels else None]
                  for r in prompts if r.value]
        regions = [r for r in regions if r.id not in {p.id for p in prompts}]
        payload = self._payload(task, plan, regions, config, version, project, max_new_tokens,
                                {"points": points} if points else False)
        started = time.perf_counter()
        self.queue.ensure_room(1)
        job_id = self.queue.submit(payload, interactive=True)
        outcome = self.queue.wait([job_id], self.settings.interactive_timeout).get(job_id)
        if outcome is None:
            self.queue.cancel_if_queued(job_id)
            self._observe("interactive", started, None, "timeout")
            raise PredictionTimeout(
                f"no prediction within INTERACTIVE_TIMEOUT={self.settings.interactive_timeout:g}s: the workers "
                "are busy or not running (start one with `python -m backend worker`)")
        prediction, error = self._finish(payload, outcome)
        self._observe("interactive", started, outcome.value, error)
        if prediction is None:
            # A job that ran but could not use its input (broken image, …) is the request's fault.
            if outcome.ok:
                raise RequestError(error or "prediction failed")
            raise PredictionFailed(error)
        return prediction

    def _batch(self, tasks: Sequence[Mapping[str, Any]], plan: FillPlan, config: str, version: str,
               project: str | None, max_new_tokens: int) -> list[dict[str, Any]]:
        items: list[dict[str, Any] | None] = [None] * len(tasks)
        jobs: list[_TaskJob] = []
        for index, task in enumerate(tasks):
            try:
                found = regions_from_task(plan, task, self.settings.keypoint_box_size)
                regions = self._regions(found, f"tasks[{index}]")
            except TaskError as exc:
                raise RequestError(f"tasks[{index}]: {exc}") from None
            propose = self.settings.proposes_for(regions)  # PROPOSE_WHEN: the worker finds regions
            if not regions and not propose:
                items[index] = _empty(version)
                continue
            jobs.append(_TaskJob(index, self._payload(task, plan, regions, config, version, project,
                                                      max_new_tokens, propose)))
        if not jobs:
            return [item for item in items if item is not None]
        single = len(tasks) == 1
        kind = "interactive" if single else "batch"
        started = time.perf_counter()
        self.queue.ensure_room(len(jobs))
        for job in jobs:
            job.job_id = self.queue.submit(job.payload, interactive=single)
        budget = self.settings.interactive_timeout if single else self.settings.batch_deadline
        outcomes = self.queue.wait([j.job_id for j in jobs], budget)
        late = [j for j in jobs if j.job_id not in outcomes]
        can_push = bool(self.settings.label_studio_url and self.settings.label_studio_api_key)
        racing = [j for j in late if not self.queue.claim_push(j.job_id)] if can_push else []
        if racing:
            # These finished between the deadline and the claim: their results are about to be written.
            outcomes.update(self.queue.wait([j.job_id for j in racing], _RACE_GRACE_S))
        errors: list[str] = []
        for job in jobs:
            outcome = outcomes.get(job.job_id)
            if outcome is None:
                items[job.index] = _pending(version, pushed=can_push)
                self._observe(kind, started, None, None)
                continue
            prediction, error = self._finish(job.payload, outcome)
            self._observe(kind, started, outcome.value, error)
            if prediction is None:
                errors.append(f"task {job.payload.get('task_id')}: {error}")
                items[job.index] = {"model_version": version, "detail": error}
            else:
                items[job.index] = prediction
        if errors and len(errors) == len(jobs):
            all_input = all(outcomes[j.job_id].ok for j in jobs)
            message = "no task could be predicted: " + "; ".join(errors[:5])
            if all_input:
                raise RequestError(message)
            raise PredictionFailed(message)
        for error in errors:
            log.warning("prediction skipped: %s", error)
        return [item for item in items if item is not None]

    def _finish(self, payload: Mapping[str, Any], outcome: Outcome) -> tuple[dict[str, Any] | None, str | None]:
        if not outcome.ok:
            return None, outcome.error
        value = outcome.value or {}
        if "error" in value:
            return None, str(value["error"].get("message") or value["error"])
        try:
            return prediction_from_output(payload, value), None
        except PredictionInvalid as exc:
            log.error("dropping a prediction the labeling config rejects: %s", exc)
            return None, str(exc)

    def _observe(self, kind: str, started: float, output: Mapping[str, Any] | None, error: str | None) -> None:
        if self.observer is not None:
            self.observer.job_done(kind, time.perf_counter() - started, output, error)

    # ------------------------------------------------------------------ fit
    def fit(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Store a Label Studio event (annotation created/updated/deleted, START_TRAINING, …) in the
        corrections store, and queue a fine-tune on START_TRAINING or, with FINETUNE_EVERY_N, once that many
        new corrected regions are stored. Returns what was stored (and queued); training runs elsewhere."""
        summary = CorrectionsStore.for_settings(self.settings).record_event({**data, "action": event})
        trigger, min_new = self._finetune_trigger(event, summary)
        if trigger is not None:
            try:
                summary["finetune"] = enqueue_finetune(self.settings, self.queue.connection, trigger, min_new)
            except QueueUnavailable as exc:
                # The event is stored; the next trigger (or cron) starts the fine-tune.
                log.warning("could not queue a fine-tune (%s): %s", trigger, exc)
                summary["finetune"] = f"not queued: {exc}"
        return summary

    def _finetune_trigger(self, event: str, summary: Mapping[str, Any]) -> tuple[str | None, int | None]:
        if event == "START_TRAINING":
            return "START_TRAINING", self.settings.finetune_min_new
        every = self.settings.finetune_every_n
        if summary.get("samples") and every and \
                FinetuneRuns.for_settings(self.settings).new_regions(attempted=True) >= every:
            return f"every {every} corrections", every
        return None, None


def _project_id(project: str | None) -> str:
    return str(project).split(".", 1)[0]


def _empty(version: str) -> dict[str, Any]:
    return {"result": [], "score": 0.0, "model_version": version}


def _pending(version: str, pushed: bool) -> dict[str, Any]:
    detail = ("still computing: the prediction is pushed through the Label Studio API when ready" if pushed
              else "still computing: ask again later (set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to have it "
              "pushed)")
    return {"model_version": version, "detail": detail}
