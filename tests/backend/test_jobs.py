"""The job queue's own rules, against the real Redis (no worker needed)."""

from __future__ import annotations

import json
import time
import zlib

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.jobs import JOB_FUNCTION, JobQueue, QueueUnavailable, connect, job_id_for, redacted
from backend.settings import Settings
from tests.support import free_port
from tests.support.redis_server import REDIS_URL

# Queues no worker of the test session listens to, so jobs stay where these tests put them.
KEY_PREFIX = "gpt4roi-jobs-test"


@pytest.fixture
def queue(redis_db) -> JobQueue:
    settings = Settings(redis_url=REDIS_URL, key_prefix=KEY_PREFIX)
    return JobQueue(settings, connect(REDIS_URL, settings), REDIS_URL)


PAYLOAD = {"v": 1, "task_id": 3, "image": "http://x/a.png", "regions": [{"id": "r1"}]}


def test_job_ids_follow_the_payload_and_the_queue():
    assert job_id_for(PAYLOAD, "q") == job_id_for(dict(reversed(list(PAYLOAD.items()))), "q")
    assert job_id_for(PAYLOAD, "q") != job_id_for(PAYLOAD, "other")
    assert job_id_for(PAYLOAD, "q") != job_id_for({**PAYLOAD, "task_id": 4}, "q")


def test_an_identical_request_joins_the_queued_job(queue):
    first = queue.submit(PAYLOAD, interactive=True)
    second = queue.submit(PAYLOAD, interactive=True)
    assert first == second
    assert queue.depths() == {f"{KEY_PREFIX}-interactive": 1, f"{KEY_PREFIX}-batch": 0}
    job = Job.fetch(first, connection=queue.connection, serializer=JSONSerializer)
    assert job.func_name == JOB_FUNCTION
    assert list(job.args) == [PAYLOAD]
    assert job.retries_left == queue.settings.job_retries


def test_the_payload_travels_as_json(queue, redis_db):
    job_id = queue.submit(PAYLOAD, interactive=False)
    raw = redis_db.hget(f"rq:job:{job_id}", "data")
    assert json.loads(zlib.decompress(raw))[2] == [PAYLOAD]


def test_waiting_on_a_job_that_no_longer_exists_ends_with_the_reason(queue):
    started = time.perf_counter()
    outcome = queue.wait(["predict-gone"], 10)["predict-gone"]
    assert not outcome.ok and "deleted" in outcome.error
    assert time.perf_counter() - started < 3


def test_a_cancelled_job_is_reported_to_its_waiters(queue):
    job_id = queue.submit(PAYLOAD, interactive=True)
    queue.cancel_if_queued(job_id)
    assert queue.depths()[f"{KEY_PREFIX}-interactive"] == 0
    assert not queue.wait([job_id], 5)[job_id].ok


def test_waiting_times_out_without_an_outcome(queue):
    job_id = queue.submit(PAYLOAD, interactive=True)
    started = time.perf_counter()
    assert queue.wait([job_id], 0.3) == {}
    assert 0.25 < time.perf_counter() - started < 2


def test_hand_off_claims_are_exclusive(queue):
    assert queue.claim_push("predict-a") is True
    assert queue.claim_return("predict-a") is False  # the worker must push
    assert queue.claim_return("predict-b") is True
    assert queue.claim_push("predict-b") is False  # the API must return it itself


def test_redis_down_is_a_clear_error_without_the_password():
    port = free_port()
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    settings = Settings(redis_url=url, redis_socket_timeout=0.5)
    queue = JobQueue(settings, connect(url, settings), url)
    with pytest.raises(QueueUnavailable) as error:
        queue.submit(PAYLOAD, interactive=True)
    assert f"127.0.0.1:{port}" in str(error.value) and "hunter2" not in str(error.value)
    assert "unreachable" in str(error.value)
    assert redacted(url) == f"redis://:***@127.0.0.1:{port}/0"


def test_a_worker_whose_key_expired_no_longer_counts_as_listening(queue, redis_db):
    # A killed worker stays in the queue's worker set until another worker cleans up; its own key expires.
    registered = f"rq:workers:{queue.batch.name}"
    redis_db.sadd(registered, "rq:worker:gpt4roi-jobs-test-alive", "rq:worker:gpt4roi-jobs-test-killed")
    redis_db.hset("rq:worker:gpt4roi-jobs-test-alive", "state", "idle")
    try:
        assert queue.batch_workers() == 1
        redis_db.delete("rq:worker:gpt4roi-jobs-test-alive")
        assert queue.batch_workers() == 0
    finally:
        redis_db.delete(registered, "rq:worker:gpt4roi-jobs-test-alive")
