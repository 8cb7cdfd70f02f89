"""The job queue between the API and the workers: RQ on Redis, JSON payloads only.

Two prediction queues: `interactive` (drawn boxes, single tasks: someone is waiting) and `batch`; every
worker listens to both and empties `interactive` first. A third queue holds fine-tune jobs
(`enqueue_finetune`), served by `python -m backend finetune-worker`. Jobs name their function by dotted
path (`JOB_FUNCTION`, `FINETUNE_FUNCTION`), so the API never imports the worker or the fine-tune module,
and use RQ's JSON serializer: a payload is plain data (image reference, regions, controls to fill, model
version), never a pickle or a tensor.

A prediction job's id is a hash of its payload, so an identical request while a job is queued, running or
recently finished waits on that job instead of computing it again. Every id, queue and key starts with
REDIS_KEY_PREFIX, so deployments sharing a Redis never see each other's jobs.

Hand-off of slow batch tasks (`claim_push` / `claim_return`): when `/predict` stops waiting for a task,
it claims the job for "push" and the worker pushes the prediction through the Label Studio API when it
finishes; a worker that finishes first claims it for "return" and the API includes the result in its
answer. The claim is one `SET NX`, so each prediction is stored exactly once.

Moves of the current model version take turns through a lock in Redis (`pointer_lock`): a person's
rollback or promotion and a fine-tune's promotion each move the pointer and tell Label Studio before the
next one starts.

A job that fails in the worker is reported as what failed, in plain words, with an incident id
(`log_incident`); its traceback goes to the log of the process that waited on it, under that id, never into
an answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.exceptions import LockError
from rq import Queue, Retry, worker_registration
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from backend.settings import Settings

log = logging.getLogger(__name__)

JOB_FUNCTION = "backend.worker.run_job"
FINETUNE_FUNCTION = "backend.finetune.run_job"
# A finished fine-tune job (and its result: the run's outcome) is kept for a week.
FINETUNE_RESULT_TTL = 7 * 86_400
CLAIM_PUSH = "push"
CLAIM_RETURN = "return"
# Longest single blocking read; waits are sliced so a Redis outage surfaces within a socket timeout.
_BLOCK_SLICE_S = 1.0
_ACTIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
POINTER_LOCK_KEY = "model-pointer:lock"
# A move holds the pointer lock for one database write and a few Label Studio calls per connected project; a
# holder that died frees it after this long.
POINTER_LOCK_TTL_S = 300
# How long a person's rollback or promotion waits for a move in progress (a fine-tune promoting) to end.
POINTER_LOCK_WAIT_S = 120.0


def log_incident(logger: logging.Logger, what: str, details: str = "",
                 exc_info: BaseException | None = None) -> str:
    """Log `what`, with `details` or the traceback of `exc_info`, under a fresh incident id, and return the
    id. Answers name only the id: tracebacks carry paths, settings and tokens that callers must not see."""
    incident = uuid.uuid4().hex[:12]
    logger.error("incident %s: %s%s", incident, what, f"\n{details}" if details else "", exc_info=exc_info)
    return incident


class QueueUnavailable(RuntimeError):
    """Redis cannot be reached; the message names it without its password."""


class QueueFull(RuntimeError):
    """More jobs are waiting than MAX_QUEUED_JOBS allows (HTTP 429)."""


class PointerBusy(RuntimeError):
    """Another move of the current model version did not end within the wait; `holder` names it."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


class ForeignJob(RuntimeError):
    """A job in the queue names a function that is not the backend's own (it fails without running)."""


def restricted_job_class(*functions: str) -> type[Job]:
    """A job class for workers that run only `functions` (dotted paths) and no callbacks: whoever can write to
    Redis cannot make a worker import and call anything else."""
    allowed = frozenset(functions)

    class OwnJob(Job):
        @property
        def func(self) -> Any:
            if self.func_name not in allowed or self.instance is not None:
                raise ForeignJob(f"job {self.id} names {str(self.func_name)[:100]!r}; this worker runs only "
                                 f"{', '.join(sorted(allowed))}")
            return super().func

        # Callbacks are functions named in Redis too; the backend's jobs never set any.
        success_callback = property(lambda self: None)
        failure_callback = property(lambda self: None)
        stopped_callback = property(lambda self: None)

    return OwnJob


@dataclass(frozen=True)
class Outcome:
    """How a job ended: `value` (the job's JSON result) or `error` (why it failed for good)."""

    job_id: str
    value: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the job returned a value (which may still report an input error, see the worker)."""
        return self.error is None


def connect(url: str, settings: Settings) -> redis.Redis:
    """A Redis client with bounded connect and command times, so an outage answers fast."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=settings.redis_socket_timeout,
        socket_timeout=settings.redis_socket_timeout + _BLOCK_SLICE_S,
        health_check_interval=30,
    )


def redacted(url: str) -> str:
    """A Redis URL without its password (in the user info, or redis-py's `?password=`), for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=netloc))
    base, mark, query = url.partition("?")
    if not mark:
        return url
    return base + "?" + "&".join(f"{key}=***" if key.lower() == "password" else item
                                 for item in query.split("&") for key in (item.split("=", 1)[0],))


def job_id_for(payload: Mapping[str, Any], queue_name: str) -> str:
    """The id of the job computing `payload` on `queue_name` (the queue's name starts with the key prefix)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(f"{queue_name}\n{canonical}".encode()).hexdigest()[:32]
    return f"{queue_name}-{digest}"


def enqueue_finetune(settings: Settings, connection: redis.Redis, trigger: str, min_new: int | None = None) -> str:
    """Queue a fine-tune job unless one is already waiting (a running one does not count: corrections that
    arrive during a run are trained by the next). Returns what happened, for logs and the webhook answer."""
    queue = Queue(settings.finetune_queue_name, connection=connection, serializer=JSONSerializer)
    with _RedisGuard(redacted(settings.effective_redis_url)):
        if queue.count:
            return "already queued"
        job = queue.enqueue_call(
            FINETUNE_FUNCTION, args=({"trigger": trigger, "min_new": min_new},),
            timeout=settings.finetune_job_timeout, result_ttl=FINETUNE_RESULT_TTL, failure_ttl=FINETUNE_RESULT_TTL,
            job_id=f"{settings.finetune_queue_name}-{uuid.uuid4().hex[:12]}", description=f"fine-tune ({trigger})")
    return f"queued {job.id}"


def lock_token(who: str = "") -> str:
    """The token a lock is taken with, which is what its holder shows: `who`, host, pid and a random tag."""
    owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return f"{who} ({owner})" if who else owner


@contextlib.contextmanager
def pointer_lock(connection: redis.Redis, settings: Settings, who: str,
                 wait: float = POINTER_LOCK_WAIT_S) -> Iterator[None]:
    """Hold the lock under which the current model version moves (see the module docstring), waiting up to
    `wait` seconds for the holder before raising `PointerBusy`; `QueueUnavailable` when Redis is unreachable."""
    lock = connection.lock(f"{settings.key_prefix}:{POINTER_LOCK_KEY}", timeout=POINTER_LOCK_TTL_S,
                           thread_local=False)
    with _RedisGuard(redacted(settings.effective_redis_url)):
        if not lock.acquire(blocking=True, blocking_timeout=wait, token=lock_token(who)):
            holder = _text(connection.get(lock.name)) or "a move that just ended"
            raise PointerBusy(f"the current model version is being moved by {holder}, still after {wait:g}s; "
                              "try again in a minute (`python -m backend versions` shows the outcome)", holder)
    try:
        yield
    finally:
        # Past its TTL the lock may be gone or another's: nothing left to release then.
        with contextlib.suppress(LockError, redis.RedisError):
            lock.release()


class JobQueue:
    """Enqueue prediction jobs and wait for their results (the API side of the queue)."""

    def __init__(self, settings: Settings, connection: redis.Redis, url: str | None = None):
        self.settings = settings
        self.connection = connection
        self.url = redacted(url or settings.effective_redis_url)
        self.interactive = Queue(settings.interactive_queue_name, connection=connection,
                                 serializer=JSONSerializer)
        self.batch = Queue(settings.batch_queue_name, connection=connection, serializer=JSONSerializer)

    # ------------------------------------------------------------------ submit
    def submit(self, payload: Mapping[str, Any], *, interactive: bool, push: bool = False) -> str:
        """Enqueue a prediction job (or join an identical one) and return its id.

        With `push`, the job's prediction is pushed to Label Studio by the worker (prelabel runs).
        """
        queue = self.interactive if interactive else self.batch
        job_id = job_id_for(payload, queue.name)
        with self._guard():
            if push:
                self.connection.set(self._claim_key(job_id), CLAIM_PUSH, ex=self._claim_ttl)
            # A pushed job must run to push; a finished one may have been answered to nobody.
            if self._reuse_or_clear(job_id, allow_finished=not push):
                return job_id
            settings = self.settings
            timeout = settings.interactive_job_timeout if interactive else settings.batch_job_timeout
            queue.enqueue_call(
                JOB_FUNCTION,
                args=(dict(payload),),
                job_id=job_id,
                timeout=timeout,
                ttl=settings.queued_job_ttl,
                result_ttl=self.settings.result_ttl,
                failure_ttl=self.settings.result_ttl,
                retry=Retry(max=self.settings.job_retries) if self.settings.job_retries else None,
                description=f"predict task {payload.get('task_id')}",
            )
        return job_id

    def ensure_room(self, jobs: int) -> None:
        """Raise `QueueFull` unless `jobs` more prediction jobs fit under MAX_QUEUED_JOBS."""
        with self._guard():
            waiting = self.interactive.count + self.batch.count
        if waiting + jobs > self.settings.max_queued_jobs:
            raise QueueFull(f"{waiting} prediction jobs are waiting; {jobs} more would pass MAX_QUEUED_JOBS="
                            f"{self.settings.max_queued_jobs}. Try again when the workers have caught up")

    def _reuse_or_clear(self, job_id: str, allow_finished: bool) -> bool:
        """True when the job `job_id` can answer (queued, running, or finished well and `allow_finished`);
        otherwise an ended job of that id is deleted with its results, which would else answer `wait` for
        the job enqueued again under the same id before it ran."""
        try:
            job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return False
        status = job.get_status(refresh=False)
        if status in _ACTIVE:
            return True
        if status == JobStatus.FINISHED and allow_finished:
            latest = Result.fetch_latest(job, serializer=JSONSerializer)
            value = latest.return_value if latest is not None else None
            # An input error (say, an image server that was down) is worth another try.
            if isinstance(value, dict) and "error" not in value:
                return True
        job.delete(remove_from_queue=False)
        return False

    # ------------------------------------------------------------------ wait
    def wait(self, job_ids: Sequence[str], timeout: float) -> dict[str, Outcome]:
        """Block until every job ended or `timeout` seconds passed; returns the outcomes of the ended ones."""
        deadline = time.monotonic() + timeout
        cursors = {Result.get_key(job_id): "0-0" for job_id in job_ids}
        ids_by_key = {Result.get_key(job_id): job_id for job_id in job_ids}
        outcomes: dict[str, Outcome] = {}
        with self._guard():
            while cursors:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                block_ms = max(1, int(min(left, _BLOCK_SLICE_S) * 1000))
                response = self.connection.xread(cursors, block=block_ms)
                for key, entries in response or []:
                    key = key.decode() if isinstance(key, bytes) else key
                    for entry_id, fields in entries:
                        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                        cursors[key] = entry_id
                        outcome = self._outcome(ids_by_key[key], entry_id, fields)
                        if outcome is not None:
                            outcomes[outcome.job_id] = outcome
                            cursors.pop(key, None)
                            break
                if not response:
                    self._expire_lost(cursors, ids_by_key, outcomes)
        return outcomes

    def _outcome(self, job_id: str, entry_id: str, fields: dict) -> Outcome | None:
        result = Result.restore(job_id, entry_id, fields, connection=self.connection,
                                serializer=JSONSerializer)
        if result.type == Result.Type.SUCCESSFUL:
            value = result.return_value
            if not isinstance(value, dict):
                return Outcome(job_id, error=f"job {job_id} returned {type(value).__name__}, not an object")
            return Outcome(job_id, value=value)
        if result.type == Result.Type.RETRIED:
            return None
        return Outcome(job_id, error=_failure_message(result))

    def _expire_lost(self, cursors: dict[str, str], ids_by_key: Mapping[str, str],
                     outcomes: dict[str, Outcome]) -> None:
        # A job deleted or cancelled while we wait never writes a result: report it instead of waiting on.
        keys = list(cursors)
        with self.connection.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(Job.key_for(ids_by_key[key]), "status")
            statuses = pipe.execute()
        for key, raw in zip(keys, statuses, strict=True):
            status = _text(raw)
            if status is None or status in {JobStatus.CANCELED.value, JobStatus.STOPPED.value}:
                job_id = ids_by_key[key]
                outcomes[job_id] = Outcome(job_id, error=f"job {job_id} was {status or 'deleted'} before it ended")
                cursors.pop(key)

    def cancel_if_queued(self, job_id: str) -> None:
        """Drop a job nobody waits for any more, unless a worker already started it."""
        with self._guard():
            try:
                job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
            except NoSuchJobError:
                return
            if job.get_status(refresh=False) == JobStatus.QUEUED:
                job.cancel()
                job.delete()

    # ------------------------------------------------------------------ hand-off
    @property
    def _claim_ttl(self) -> int:
        return self.settings.result_ttl + self.settings.batch_job_timeout * (self.settings.job_retries + 1)

    def _claim_key(self, job_id: str) -> str:
        return f"{self.settings.key_prefix}:claim:{job_id}"

    def claim_push(self, job_id: str) -> bool:
        """Ask the worker to push this job's prediction to Label Studio; False if it already finished."""
        with self._guard():
            if self.connection.set(self._claim_key(job_id), CLAIM_PUSH, nx=True, ex=self._claim_ttl):
                return True
            return _text(self.connection.get(self._claim_key(job_id))) == CLAIM_PUSH

    def claimed_for_push(self, job_ids: Sequence[str]) -> set[str]:
        """Those of `job_ids` whose predictions the worker must push (prelabel, or an API that stopped
        waiting). A claim to push is final, so unlike `claim_return` this only looks: one round trip."""
        if not job_ids:
            return set()
        with self._guard():
            claims = self.connection.mget([self._claim_key(job_id) for job_id in job_ids])
        return {job_id for job_id, claim in zip(job_ids, claims, strict=True) if _text(claim) == CLAIM_PUSH}

    def claim_return(self, job_id: str) -> bool:
        """The worker's side: True if the API will return this result, False if the worker must push it."""
        with self._guard():
            if self.connection.set(self._claim_key(job_id), CLAIM_RETURN, nx=True, ex=self._claim_ttl):
                return True
            return _text(self.connection.get(self._claim_key(job_id))) != CLAIM_PUSH

    # ------------------------------------------------------------------ status
    def depths(self) -> dict[str, int]:
        """Jobs waiting in each queue."""
        with self._guard():
            return {q.name: q.count for q in (self.interactive, self.batch)}

    def running(self) -> dict[str, int]:
        """Jobs being executed, per queue."""
        with self._guard():
            return {q.name: StartedJobRegistry(queue=q).count for q in (self.interactive, self.batch)}

    def failed(self) -> dict[str, int]:
        """Jobs that failed for good (kept for JOB_RESULT_TTL), per queue."""
        with self._guard():
            return {q.name: FailedJobRegistry(queue=q).count for q in (self.interactive, self.batch)}

    def batch_workers(self) -> int:
        """Workers alive that listen on the batch queue. A worker that was killed stays registered with the
        queue until another worker cleans up, so only those whose own key has not expired count (RQ keeps
        it while the worker beats: at most 90 s after a worker died in a job)."""
        with self._guard():
            keys = sorted(worker_registration.get_keys(queue=self.batch))
            if not keys:
                return 0
            with self.connection.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(key)
                return sum(1 for alive in pipe.execute() if alive)

    def ping(self) -> None:
        """Raise `QueueUnavailable` unless Redis answers."""
        with self._guard():
            self.connection.ping()

    def _guard(self) -> _RedisGuard:
        return _RedisGuard(self.url)


class _RedisGuard:
    """Turns Redis connection failures into `QueueUnavailable` with a message an operator can act on."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            raise QueueUnavailable(
                f"the job queue (Redis at {self.url}) is unreachable: {exc}. Predictions resume once it is "
                "back; check REDIS_URL and that Redis is running") from None
        return False


def _failure_message(result: Result) -> str:
    text = (result.exc_string or "").strip()
    if "AbandonedJobError" in text:
        return "the worker running this job died and the job ran out of retries (JOB_RETRIES)"
    # The traceback's last line is an exception from inside the worker (paths, settings): it goes to the log.
    incident = log_incident(log, f"job {result.job_id} failed in worker {result.worker_name or '?'}",
                            text or f"it ended as {result.type.name}")
    return (f"the worker failed on this job (incident {incident}; the log of the backend that waited on it "
            "has the details)")


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
