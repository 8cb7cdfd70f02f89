"""The GPU worker: one resident model, RQ jobs executed in-process, results pushed or returned.

`python -m backend worker` loads the current model version once, then takes jobs from the interactive
queue first and the batch queue second. Each job is one task: its image is fetched (or taken from the
LRU cache, keeping the same `PIL.Image` object per URL so the model's per-image feature cache hits), every
region of the job goes into one `answer` call (captions) and one `score` call (choices and labels), and
the answers come back as JSON. When the registry's current version changes, the next job loads it.

A worker that dies mid-job stops sending heartbeats; after WORKER_HEARTBEAT_TTL another worker's sweep
re-queues the job (up to JOB_RETRIES times) or records it as failed, so a job is never silently lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from backend import registry
from backend.corrections import CorrectionsStore
from backend.describe import describe, load_annotator, release_memory, resolve_device
from backend.images import ImageError, ImageLoader
from backend.jobs import JOB_FUNCTION, JobQueue, connect, restricted_job_class
from backend.labelconfig import PredictionInvalid
from backend.labelstudio import LabelStudioClient
from backend.payloads import PayloadError, parse_payload, prediction_from_output
from backend.settings import Settings

log = logging.getLogger(__name__)


class ImageCache:
    """Decoded images by reference, least recently used dropped first."""

    def __init__(self, loader: ImageLoader, size: int):
        self.loader = loader
        self.size = size
        self._images: OrderedDict[tuple[str, int | None], Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, reference: str, task_id: int | None) -> Any:
        """The image for `reference`, the same object on every hit."""
        # Cloud URIs are presigned per task; every other reference names the same bytes for all tasks.
        key = (reference, task_id if reference.startswith(("s3://", "gs://", "azure-blob://")) else None)
        image = self._images.get(key)
        if image is not None:
            self._images.move_to_end(key)
            self.hits += 1
            return image
        self.misses += 1
        image = self.loader.load(reference, task_id)
        self._images[key] = image
        while len(self._images) > self.size:
            self._images.popitem(last=False)
        return image


class Predictor:
    """The model side of a worker: current model version, image cache, and the per-job computation."""

    def __init__(self, settings: Settings, queue: JobQueue | None = None):
        self.settings = settings
        self.queue = queue
        self.images = ImageCache(ImageLoader(settings), settings.image_cache_size)
        self.annotator: Any = None
        self.version: str | None = None
        self._label_studio: LabelStudioClient | None = None

    # ------------------------------------------------------------------ model
    def ensure_model(self) -> str:
        """Load the registry's current version unless it is already resident; returns it."""
        version = registry.current_version(self.settings)
        if version != self.version:
            path = registry.checkpoint_path(self.settings, version)
            started = time.perf_counter()
            self.annotator = None
            release_memory()
            self.annotator = load_annotator(path, resolve_device(self.settings.device), self.settings.dtype,
                                            self.settings.annotator_class)
            log.info("model %s loaded from %s in %.1f s", version, path, time.perf_counter() - started)
            self.version = version
        return version

    # ------------------------------------------------------------------ one job
    def run(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one job payload (see `backend.labelstudio_backend.make_payload`)."""
        started = time.perf_counter()
        version = self.ensure_model()
        try:
            plan, regions, keep_drawn = parse_payload(payload)
        except PayloadError as exc:
            return {"error": {"kind": "input", "message": str(exc)}, "model_version": version}
        fetch_started = time.perf_counter()
        try:
            image = self.images.get(payload["image"], payload.get("task_id"))
        except ImageError as exc:
            return {"error": {"kind": "image", "message": str(exc)}, "model_version": version}
        model_started = time.perf_counter()
        answers = describe(self.annotator, image, plan, regions, keep_drawn,
                           int(payload.get("max_new_tokens") or 32))
        done = time.perf_counter()
        return {
            "model_version": version,
            "image_size": list(image.size),
            "regions": answers,
            "timing": {
                "fetch_ms": round((model_started - fetch_started) * 1000, 3),
                "model_ms": round((done - model_started) * 1000, 3),
                "total_ms": round((done - started) * 1000, 3),
            },
        }

    # ------------------------------------------------------------------ push
    def push(self, payload: Mapping[str, Any], output: Mapping[str, Any]) -> bool:
        """Store the job's prediction in Label Studio (batch hand-off and prelabel runs).

        Tasks without regions are not pushed: an empty prediction would only hide the task from later runs.
        """
        if "error" in output or not output.get("regions"):
            return False
        prediction = prediction_from_output(payload, output)
        if self._label_studio is None:
            self._label_studio = LabelStudioClient(self.settings)
        self._label_studio.create_prediction(payload["task_id"], prediction["result"], prediction["score"],
                                             prediction["model_version"])
        return True


# ---------------------------------------------------------------------- RQ entry point
_predictor: Predictor | None = None
_predictor_lock = threading.Lock()
_shutdown = threading.Event()
# One thread, so proposals are recorded in job order; its queue is drained when the process exits.
_bookkeeping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proposals")


def install(predictor: Predictor) -> None:
    """Make `predictor` the one `run_job` uses in this process."""
    global _predictor
    _predictor = predictor


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job function (enqueued by name as `backend.worker.run_job`): predict one task.

    Returns the answers as JSON. If the API stopped waiting and claimed the job for push, the prediction
    is stored in Label Studio instead and the returned JSON says `"pushed": true`.
    """
    global _predictor
    with _predictor_lock:
        if _predictor is None:
            settings = Settings.from_env()
            _predictor = Predictor(settings, JobQueue(settings, connect(settings.effective_redis_url, settings)))
    predictor = _predictor
    output = predictor.run(payload)
    # Off the answer's path: the proposal record is a disk write the waiting annotator does not need.
    _bookkeeping.submit(_remember_proposals, predictor.settings, payload, dict(output))
    if predictor.queue is not None and not predictor.queue.claim_return(_current_job_id()):
        try:
            output["pushed"] = predictor.push(payload, output)
        except PredictionInvalid as exc:
            output["error"] = {"kind": "invalid", "message": str(exc)}
    return output


def _remember_proposals(settings: Settings, payload: dict[str, Any], output: dict[str, Any]) -> None:
    # What each region was proposed, so an annotation can later be compared with it (acceptance
    # statistics); bookkeeping must never fail the prediction itself.
    try:
        CorrectionsStore.for_settings(settings).record_job_output(payload, output)
    except Exception:
        log.warning("could not record the proposals of task %s", payload.get("task_id"), exc_info=True)


def _current_job_id() -> str:
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        raise RuntimeError("run_job must run inside an RQ worker")
    return job.id


class PredictionWorker(SimpleWorker):
    """RQ worker that runs jobs in its own process (the model stays resident, nothing is forked) and keeps
    a running job's heartbeat fresh from a side thread, so a dead worker's job is detected within
    WORKER_HEARTBEAT_TTL instead of the job's whole timeout."""

    def __init__(self, *args: Any, heartbeat_ttl: int = 10, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.heartbeat_ttl = heartbeat_ttl

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: finish the current job, then stop (and do not restart the loop)."""
        _shutdown.set()
        super().request_stop(signum, frame)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Time after which a job without a heartbeat counts as abandoned."""
        return self.heartbeat_ttl

    @property
    def dequeue_timeout(self) -> int:
        """Idle waits are cut at the maintenance interval so sweeps for abandoned jobs keep running."""
        return max(1, min(int(self.maintenance_interval), self.worker_ttl - 15))

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job in this process while a side thread sends its heartbeats."""
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), daemon=True,
                                name="job-heartbeat")
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Any, stop: threading.Event) -> None:
        while not stop.wait(max(0.5, self.heartbeat_ttl / 3)):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:
                log.warning("heartbeat for job %s failed", job.id, exc_info=True)


def run_worker(settings: Settings, redis_url: str | None = None, *, burst: bool = False,
               name: str | None = None) -> None:
    """Load the model, then process jobs until stopped (or, with `burst`, until the queues are empty).

    RQ's work loop ends on any Redis error outside a job; the model stays loaded and a fresh loop starts
    once Redis answers again, so an outage never needs a restart (or a model reload).
    """
    url = redis_url or settings.effective_redis_url
    connection = connect(url, settings)
    queue = JobQueue(settings, connection, url)
    predictor = Predictor(settings, queue)
    predictor.ensure_model()
    install(predictor)
    _shutdown.clear()
    pause = 1.0
    while True:
        worker = PredictionWorker(
            [queue.interactive, queue.batch],
            connection=connection,
            serializer=JSONSerializer,
            job_class=restricted_job_class(JOB_FUNCTION),
            name=name,
            heartbeat_ttl=settings.worker_heartbeat_ttl,
            maintenance_interval=settings.worker_maintenance_interval,
        )
        log.info("worker %s listening on %s, %s", worker.name, queue.interactive.name, queue.batch.name)
        started = time.monotonic()
        try:
            worker.work(burst=burst, logging_level=settings.log_level.upper())
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("worker %s lost Redis at %s: %s", worker.name, queue.url, exc)
        if burst or _shutdown.is_set():
            return
        # A loop that ran a while before failing restarts at once; one failing right away backs off.
        pause = 1.0 if time.monotonic() - started > 60 else min(pause * 2, 30.0)
        if not _wait_for_redis(connection, pause):
            return
        with contextlib.suppress(redis.RedisError):
            worker.register_death()


def _wait_for_redis(connection: redis.Redis, pause: float) -> bool:
    """Block until Redis answers; False if a shutdown was requested meanwhile."""
    while not _shutdown.wait(pause):
        try:
            connection.ping()
            return True
        except (redis.ConnectionError, redis.TimeoutError):
            pause = min(pause * 2, 30.0)
    return False
