"""The GPU worker: one resident model, RQ jobs executed in-process, results pushed or returned.

`python -m backend worker` loads the current model version once, then takes jobs from the interactive
queue first and the batch queue second. Each job is one task: its image is fetched (or taken from the
LRU cache, keeping the same `PIL.Image` object per URL so the model's per-image feature cache hits; a
batch's images are fetched several at a time), and the answers come back as JSON. When the registry's
current version changes, the next job loads it.

Jobs are answered in batches: with a job the worker takes whatever else is waiting in the same queue, up
to BATCH_MAX_REGIONS regions (waiting at most BATCH_WAIT_MS for more), and every region of them all goes
into one `answer` call (captions) and one `score` call (choices and labels). The predictions the batch's
jobs push (prelabel's) go to Label Studio in one import request per project rather than one request per
task; when Label Studio refuses or fails that request, each job pushes its own. Each job still ends on its
own, through RQ: its own result, its own error (a bad image fails only its job), its own retries. A
job being retried runs alone, and so does every job of a batch whose model call failed.

A worker that dies mid-job stops sending heartbeats; after WORKER_HEARTBEAT_TTL another worker's sweep
re-queues the job (up to JOB_RETRIES times) or records it as failed, so a job is never silently lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from rq import SimpleWorker, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.worker import WorkerStatus

from backend import registry
from backend.calibration import Calibration
from backend.corrections import CorrectionsStore
from backend.describe import Description, load_engine, release_memory, resolve_device
from backend.images import ImageError, ImageLoader
from backend.jobs import JOB_FUNCTION, JobQueue, connect, restricted_job_class
from backend.labelconfig import PredictionInvalid
from backend.labelstudio import LabelStudioClient, LabelStudioError
from backend.payloads import PayloadError, parse_payload, prediction_from_output
from backend.proposals import describe_jobs
from backend.settings import Settings
from model.engine import ENGINES, Engine

log = logging.getLogger(__name__)

# Images of one batch downloaded at a time (Label Studio serves uploads one request each).
PREFETCH_THREADS = 4


class ImageCache:
    """Decoded images by reference, least recently used dropped first once there are more than `size` of them
    or they hold more than `max_bytes` decoded bytes (the newest is always kept)."""

    def __init__(self, loader: ImageLoader, size: int, max_bytes: int):
        self.loader = loader
        self.size = size
        self.max_bytes = max_bytes
        self._images: OrderedDict[tuple[str, int | None], Any] = OrderedDict()
        self.bytes = 0
        # Fetched ahead by `prefetch` for the next `get`: the image, or why it could not be had.
        self._loaded: dict[tuple[str, int | None], Any] = {}
        self._failed: dict[tuple[str, int | None], ImageError] = {}
        self.hits = 0
        self.misses = 0

    def get(self, reference: str, task_id: int | None) -> Any:
        """The image for `reference`, the same object on every hit."""
        key = _cache_key(reference, task_id)
        image = self._images.get(key)
        if image is not None:
            self._images.move_to_end(key)
            self.hits += 1
            return image
        self.misses += 1
        failed = self._failed.pop(key, None)
        if failed is not None:
            raise failed
        image = self._loaded.pop(key, None) or self.loader.load(reference, task_id)
        self._images[key] = image
        self.bytes += _decoded_bytes(image)
        while len(self._images) > 1 and (len(self._images) > self.size or self.bytes > self.max_bytes):
            _, dropped = self._images.popitem(last=False)
            self.bytes -= _decoded_bytes(dropped)
        return image

    def prefetch(self, wanted: Sequence[tuple[str, int | None]]) -> None:
        """Download and decode the images of `wanted` that are not cached, `PREFETCH_THREADS` at a time (a
        batch's images from Label Studio arrive together instead of one after another); each is handed to
        the next `get` for it, a failure raised there."""
        missing: dict[tuple[str, int | None], tuple[str, int | None]] = {}
        for reference, task_id in wanted:
            key = _cache_key(reference, task_id)
            if key not in self._images and key not in missing:
                missing[key] = (reference, task_id)
        missing = dict(list(missing.items())[:self.size])
        if len(missing) < 2:
            return
        with ThreadPoolExecutor(max_workers=min(PREFETCH_THREADS, len(missing)),
                                thread_name_prefix="images") as pool:
            futures = {key: pool.submit(self.loader.load, *item) for key, item in missing.items()}
        for key, future in futures.items():
            error = future.exception()
            if error is None:
                self._loaded[key] = future.result()
            elif isinstance(error, ImageError):
                self._failed[key] = error

    def forget_prefetched(self) -> None:
        """Drop what `prefetch` fetched and no `get` took."""
        self._loaded.clear()
        self._failed.clear()


def _cache_key(reference: str, task_id: int | None) -> tuple[str, int | None]:
    # Cloud URIs are presigned per task; every other reference names the same bytes for all tasks.
    return reference, task_id if reference.startswith(("s3://", "gs://", "azure-blob://")) else None


def _decoded_bytes(image: Any) -> int:
    return image.width * image.height * len(image.getbands())


class Predictor:
    """The model side of a worker: current model version, image cache, and the per-job computation."""

    def __init__(self, settings: Settings, queue: JobQueue | None = None):
        self.settings = settings
        self.queue = queue
        self.images = ImageCache(ImageLoader(settings), settings.image_cache_size, settings.image_cache_bytes)
        self.engine: Engine | None = None
        # PROPOSER's engine, resident beside the describing one (it never changes with the version).
        self.proposer: Engine | None = None
        self.calibration = Calibration()
        self.version: str | None = None
        self._label_studio: LabelStudioClient | None = None
        self._bulk_refused = False

    # ------------------------------------------------------------------ model
    def ensure_model(self) -> str:
        """Load the registry's current version unless it is already resident; returns it."""
        version = registry.current_version(self.settings)
        if version != self.version:
            path = registry.checkpoint_path(self.settings, version)
            started = time.perf_counter()
            self.engine = None
            release_memory()
            # A registered engine name only chooses the first version; a dotted path serves every version.
            own = self.settings.engine if "." in self.settings.engine else None
            self.engine = load_engine(path, resolve_device(self.settings.device), self.settings.dtype, own,
                                      self.settings.engine_option_values)
            self.calibration = Calibration.load(path)
            log.info("model %s loaded from %s in %.1f s", version, path, time.perf_counter() - started)
            self.version = version
        if self.settings.proposer and self.proposer is None:
            self.proposer = self._load_proposer()
        return version

    def _load_proposer(self) -> Engine:
        name = self.settings.proposer
        source = self.settings.proposer_model or (ENGINES[name].default_base_model if name in ENGINES else "")
        started = time.perf_counter()
        proposer = load_engine(source, resolve_device(self.settings.device), self.settings.dtype, name,
                               self.settings.engine_option_values)
        log.info("proposer %s loaded from %s in %.1f s", name, source, time.perf_counter() - started)
        return proposer

    # ------------------------------------------------------------------ jobs
    def run(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one job payload (see `backend.labelstudio_backend.make_payload`)."""
        return self.run_many([payload])[0]

    def run_many(self, payloads: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Answer several job payloads with one model call per answer length; one answer per payload, an
        `error` answer for a payload whose input or image cannot be used."""
        started = time.perf_counter()
        version = self.ensure_model()
        outputs: list[dict[str, Any]] = [{} for _ in payloads]
        ready: dict[int, list[tuple[int, Description, float]]] = {}
        prefetch_started = time.perf_counter()
        self.images.prefetch([(p["image"], p.get("task_id")) for p in payloads
                              if isinstance(p, Mapping) and isinstance(p.get("image"), str)])
        # Shared by the images fetched together; each job's own fetch time is added to it.
        prefetch_ms = (time.perf_counter() - prefetch_started) * 1000 / len(payloads)
        for index, payload in enumerate(payloads):
            fetch_started = time.perf_counter()
            try:
                plan, regions, keep_drawn = parse_payload(payload)
                image = self.images.get(payload["image"], payload.get("task_id"))
            except PayloadError as exc:
                outputs[index] = {"error": {"kind": "input", "message": str(exc)}, "model_version": version}
                continue
            except ImageError as exc:
                outputs[index] = {"error": {"kind": "image", "message": str(exc)}, "model_version": version}
                continue
            fetch_ms = (time.perf_counter() - fetch_started) * 1000 + prefetch_ms
            ready.setdefault(int(payload.get("max_new_tokens") or 32), []).append(
                (index, Description(image, plan, regions, keep_drawn), fetch_ms))
        self.images.forget_prefetched()
        for max_new_tokens, group in ready.items():
            model_started = time.perf_counter()
            # Jobs whose payload asks for proposals get the proposer's regions too (backend.proposals).
            described = describe_jobs(self.engine, self.proposer,
                                      [(item, payloads[index].get("propose")) for index, item, _ in group],
                                      max_new_tokens, self.settings, self.calibration)
            done = time.perf_counter()
            batch = {"jobs": len(group), "regions": sum(len(regions) for regions, _ in described)}
            for (index, item, fetch_ms), (regions, found) in zip(group, described, strict=True):
                outputs[index] = {
                    "model_version": version,
                    "image_size": list(item.image.size),
                    "regions": regions,
                    "timing": {"fetch_ms": round(fetch_ms, 3), "model_ms": round((done - model_started) * 1000, 3),
                               "total_ms": round((done - started) * 1000, 3)},
                    "batch": batch,
                }
                if found:
                    outputs[index]["proposed"] = [region.to_json() for region in found]
        return outputs

    # ------------------------------------------------------------------ push
    def push(self, payload: Mapping[str, Any], output: Mapping[str, Any]) -> bool:
        """Store the job's prediction in Label Studio (batch hand-off and prelabel runs).

        Tasks without regions are not pushed: an empty prediction would only hide the task from later runs.
        """
        if "error" in output or not output.get("regions"):
            return False
        prediction = prediction_from_output(payload, output)
        self._client().create_prediction(payload["task_id"], prediction["result"], prediction["score"],
                                         prediction["model_version"])
        return True

    def push_together(self, jobs: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[str, dict]:
        """Store the predictions of several jobs (by id: payload and output) in Label Studio with one request
        per project instead of one per task; returns, by job id, what each job's output gains (`pushed`, and
        its share of the request's time in `timing.push_ms`, or the `error` of an invalid prediction).

        A job left out pushes on its own (`push`): one whose project is unknown, one alone in its project,
        and every job of a request Label Studio refused or failed, so one bad task never fails the others."""
        outcomes: dict[str, dict] = {}
        by_project: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        for job_id, (payload, output) in jobs.items():
            if "error" in output or not output.get("regions"):
                outcomes[job_id] = {"pushed": False}
                continue
            project = _project_number(payload.get("project"))
            if project is None:
                continue
            try:
                prediction = prediction_from_output(payload, output)
            except PredictionInvalid as exc:
                outcomes[job_id] = {"pushed": False, "error": {"kind": "invalid", "message": str(exc)}}
                continue
            by_project.setdefault(project, []).append((job_id, {
                "task": payload["task_id"], "result": prediction["result"], "score": prediction["score"],
                "model_version": prediction["model_version"]}))
        for project, group in by_project.items():
            if len(group) < 2 or self._bulk_refused:
                continue
            started = time.perf_counter()
            try:
                self._client().import_predictions(project, [prediction for _, prediction in group])
            except LabelStudioError as exc:
                # A Label Studio without the route, or a token that may not change the project: never again.
                self._bulk_refused = exc.status in (403, 404, 405)
                log.info("pushing %d predictions of project %s in one request failed (%s); each job pushes "
                         "its own", len(group), project, exc)
                continue
            share_ms = round((time.perf_counter() - started) * 1000 / len(group), 3)
            for job_id, _ in group:
                outcomes[job_id] = {"pushed": True, "push_ms": share_ms}
        return outcomes

    def _client(self) -> LabelStudioClient:
        if self._label_studio is None:
            self._label_studio = LabelStudioClient(self.settings)
        return self._label_studio


def _project_number(project: Any) -> int | None:
    """A payload's project id as a number (None when it has none)."""
    try:
        return int(str(project))
    except ValueError:
        return None


# ---------------------------------------------------------------------- RQ entry point
_predictor: Predictor | None = None
_predictor_lock = threading.Lock()
_shutdown = threading.Event()
# Answers computed for a batch, by job id; each job's own run takes its answer from here.
_answered: dict[str, dict[str, Any]] = {}
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
    job = get_current_job()
    output = _answered.pop(job.id, None) if job is not None else None
    if output is None:
        output = predictor.run(payload)
    # Off the answer's path: the proposal record is a disk write the waiting annotator does not need.
    _bookkeeping.submit(_remember_proposals, predictor.settings, payload, dict(output))
    # Pushed already with the other jobs of its batch (`PredictionWorker._push_together`), or to push now.
    if "pushed" not in output and predictor.queue is not None \
            and not predictor.queue.claim_return(_current_job_id(job)):
        pushing = time.perf_counter()
        try:
            output["pushed"] = predictor.push(payload, output)
            if isinstance(output.get("timing"), dict):
                output["timing"]["push_ms"] = round((time.perf_counter() - pushing) * 1000, 3)
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


def _current_job_id(job: Job | None) -> str:
    if job is None:
        raise RuntimeError("run_job must run inside an RQ worker")
    return job.id


class PredictionWorker(SimpleWorker):
    """RQ worker that runs jobs in its own process (the model stays resident, nothing is forked), answers
    the jobs waiting together in one model call (see the module docstring), and keeps running jobs'
    heartbeats fresh from a side thread, so a dead worker's jobs are detected within WORKER_HEARTBEAT_TTL
    instead of their whole timeout."""

    def __init__(self, *args: Any, predictor: Predictor, heartbeat_ttl: int = 10, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.predictor = predictor
        self.heartbeat_ttl = heartbeat_ttl

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: finish the current batch, then stop (and do not restart the loop)."""
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
        """Run `job` and the jobs taken with it in this process while a side thread sends their heartbeats:
        one model call for them all, then each job performed by RQ on its own."""
        batch = [(job, queue), *self._companions(job, queue)]
        running = [(each, each_queue, self.prepare_execution(each)) for each, each_queue in batch]
        if len(batch) > 1:
            # Started from now on (RQ would mark each only when performing it): nobody may cancel a job as
            # still queued while the batch answers it.
            for each, _ in batch:
                self.prepare_job_execution(each)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(running, stop), daemon=True, name="job-heartbeat")
        beat.start()
        try:
            if len(batch) > 1:
                self._answer_together([each for each, _ in batch])
                self._push_together([each for each, _ in batch])
            for each, each_queue, execution in running:
                self.perform_job(each, each_queue, execution)
        finally:
            stop.set()
            beat.join()
            _answered.clear()
        self.set_state(WorkerStatus.IDLE)

    def _companions(self, job: Job, queue: Queue) -> list[tuple[Job, Queue]]:
        """The jobs waiting behind `job` in its queue that fit in one batch with it (none for a job being
        retried: it runs alone)."""
        settings = self.predictor.settings
        if settings.batch_max_regions <= 1 or not _batchable(job, settings.job_retries):
            return []
        budget = settings.batch_max_regions - _region_count(job)
        deadline = time.monotonic() + settings.batch_wait_ms / 1000
        taken: list[tuple[Job, Queue]] = []
        while budget > 0:
            job_id = self.connection.lpop(queue.key)
            if job_id is None:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.002)
                continue
            try:
                companion = self.job_class.fetch(job_id.decode(), connection=self.connection,
                                                 serializer=self.serializer)
            except NoSuchJobError:  # expired or deleted while it waited
                continue
            regions = _region_count(companion)
            if not _batchable(companion, settings.job_retries) or regions > budget:
                # Back at the front, where it was: it starts the next batch.
                self.connection.lpush(queue.key, companion.id)
                break
            taken.append((companion, queue))
            budget -= regions
        return taken

    def _answer_together(self, jobs: Sequence[Job]) -> None:
        """Answer `jobs` in one `run_many`; if that fails, nothing is kept and each job runs alone."""
        timeout = min(job.timeout or self.queue_class.DEFAULT_TIMEOUT for job in jobs)
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=jobs[0].id):
                outputs = self.predictor.run_many([job.args[0] for job in jobs])
        except Exception:
            log.warning("a batch of %d jobs failed together; each runs alone", len(jobs), exc_info=True)
            return
        _answered.update({job.id: output for job, output in zip(jobs, outputs, strict=True)})

    def _push_together(self, jobs: Sequence[Job]) -> None:
        """Push the predictions of the answered jobs that must push (prelabel's) in one request per project;
        what this does not push, each job pushes on its own when it is performed."""
        answered = {job.id: job for job in jobs if job.id in _answered}
        queue = self.predictor.queue
        if queue is None or len(answered) < 2:
            return
        timeout = min(job.timeout or self.queue_class.DEFAULT_TIMEOUT for job in jobs)
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=jobs[0].id):
                claimed = queue.claimed_for_push(list(answered))
                outcomes = self.predictor.push_together(
                    {job_id: (answered[job_id].args[0], _answered[job_id]) for job_id in answered if job_id in claimed})
        except Exception:
            log.warning("pushing a batch of %d predictions failed; each job pushes its own", len(answered),
                        exc_info=True)
            return
        for job_id, outcome in outcomes.items():
            output = _answered[job_id]
            push_ms = outcome.pop("push_ms", None)
            output.update(outcome)
            if push_ms is not None and isinstance(output.get("timing"), dict):
                output["timing"]["push_ms"] = push_ms

    def _beat(self, running: Sequence[tuple[Job, Queue, Any]], stop: threading.Event) -> None:
        while not stop.wait(max(0.5, self.heartbeat_ttl / 3)):
            for job, _, execution in running:
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception:
                    log.warning("heartbeat for job %s failed", job.id, exc_info=True)


def _payload(job: Job) -> dict[str, Any] | None:
    """The payload of a prediction job of ours (one JSON object), else None."""
    try:
        args, kwargs = job.args, job.kwargs
    except Exception:  # undecodable: it fails on its own when performed
        return None
    if job.func_name != JOB_FUNCTION or len(args) != 1 or not isinstance(args[0], dict) or kwargs:
        return None
    return args[0]


def _batchable(job: Job, retries: int) -> bool:
    """A prediction job of ours that is not being retried."""
    retried = job.retries_left is not None and job.retries_left < retries
    return _payload(job) is not None and not retried


def _region_count(job: Job) -> int:
    regions = (_payload(job) or {}).get("regions")
    return max(1, len(regions)) if isinstance(regions, list) else 1


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
            predictor=predictor,
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
