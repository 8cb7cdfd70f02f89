"""Requests as an attacker would send them, over real HTTP to the real API (and its worker and Redis where
the attack goes through them): every one gets a 4xx that says why, nothing is lost, nothing runs that the
backend did not write."""

from __future__ import annotations

import copy
import json
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.annotations import int_or_none
from backend.corrections import CorrectionsStore
from backend.settings import Settings
from backend.webhooks import SECRET_FILE, SECRET_HEADER
from tests.support import capture, wait_until
from tests.support.processes import backend_env, start_api
from tests.support.redis_server import KEY_PREFIX
from tests.support.requests import CAPTURED_CONFIG, batch_body, batch_task, interactive_body


def webhook(annotation_id: int, caption: str = "a red square") -> dict[str, Any]:
    body = copy.deepcopy(capture("09")["request"]["json"])
    body["annotation"]["id"] = annotation_id
    body["task"]["id"] = body["annotation"]["task"] = 50_000 + annotation_id
    for item in body["annotation"]["result"]:
        if item["type"] == "textarea":
            item["value"]["text"] = [caption]
    return body


# ---------------------------------------------------------------------- authenticated writes
def test_without_a_configured_secret_one_is_generated_and_required(base_env, tmp_path):
    env = backend_env(base_env, DATA_DIR=str(tmp_path / "data"))
    env.pop("WEBHOOK_SECRET")
    server = start_api(env, tmp_path / "api.log")
    try:
        secret_file = tmp_path / "data" / SECRET_FILE
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        refused = server.client.post("/webhook", json=webhook(1))
        assert refused.status_code == 401 and SECRET_HEADER in refused.json()["detail"]
        accepted = server.client.post("/webhook", json=webhook(1), headers={SECRET_HEADER: secret})
        assert accepted.status_code == 200 and accepted.json()["samples"] == 1
        store = CorrectionsStore.for_settings(Settings(data_dir=tmp_path / "data"))
        assert store.annotation_ids() == {1}, "only the signed event is stored"
    finally:
        server.stop()


def test_unsigned_webhooks_only_when_the_operator_says_so(base_env, tmp_path):
    env = backend_env(base_env, DATA_DIR=str(tmp_path / "data"), ALLOW_UNSIGNED_WEBHOOKS="true")
    env.pop("WEBHOOK_SECRET")
    server = start_api(env, tmp_path / "api.log")
    try:
        assert server.client.post("/webhook", json=webhook(2)).status_code == 200
        assert not (tmp_path / "data" / SECRET_FILE).exists()
    finally:
        server.stop()


def test_the_api_binds_this_machine_only_by_default():
    assert Settings().host == "127.0.0.1"
    assert Settings().effective_backend_url == "http://127.0.0.1:9090"
    assert Settings(host="0.0.0.0", port=9191).effective_backend_url == "http://127.0.0.1:9191"


# ---------------------------------------------------------------------- limits
@pytest.fixture(scope="module")
def limited(base_env, tmp_path_factory):
    """An API with small limits and no worker: nothing queued is ever taken."""
    folder = tmp_path_factory.mktemp("limited")
    env = backend_env(base_env, DATA_DIR=str(folder / "data"), MAX_REQUEST_BYTES="200000",
                      MAX_TASKS_PER_REQUEST="5", MAX_REGIONS_PER_TASK="3", MAX_CHOICES_PER_CONTROL="4",
                      MAX_NAME_LENGTH="40", MAX_QUEUED_JOBS="2", QUEUED_JOB_TTL="2", BATCH_PREDICT_DEADLINE="1",
                      INTERACTIVE_TIMEOUT="1", REDIS_KEY_PREFIX=f"{KEY_PREFIX}-limited")
    server = start_api(env, folder / "api.log")
    yield server, env
    server.stop()


def test_a_body_past_max_request_bytes_is_refused_before_it_is_read(limited):
    limited, _ = limited
    declared = limited.client.post("/predict", content=b"{" + b" " * 300_000 + b"}",
                                   headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and "MAX_REQUEST_BYTES=200000" in declared.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(30):
            yield b" " * 10_000

    streamed = limited.client.post("/webhook", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert limited.client.get("/health").status_code == 200


def test_too_many_tasks_or_regions_get_413(limited, fake_ls):
    limited, _ = limited
    image = f"{fake_ls.url}/img/red.png"
    tasks = [batch_task(i, image, "predictions") for i in range(6)]
    many = limited.client.post("/predict", json=batch_body(tasks))
    assert many.status_code == 413 and "MAX_TASKS_PER_REQUEST=5" in many.json()["detail"]
    drawn = interactive_body(image)
    region = drawn["params"]["context"]["result"][0]
    drawn["params"]["context"]["result"] = [{**copy.deepcopy(region), "id": f"d{i}"} for i in range(4)]
    crowded = limited.client.post("/predict", json=drawn)
    assert crowded.status_code == 413 and "MAX_REGIONS_PER_TASK=3" in crowded.json()["detail"]


def test_labeling_configs_past_their_limits_are_refused(limited):
    limited, _ = limited
    choices = "".join(f'<Choice value="c{i}"/>' for i in range(5))
    wide = CAPTURED_CONFIG.replace('<Choice value="occluded"/>', choices)
    answer = limited.client.post("/setup", json={"project": "1.1", "schema": wide})
    assert answer.status_code == 422 and "MAX_CHOICES_PER_CONTROL=4" in answer.json()["detail"]
    long_name = CAPTURED_CONFIG.replace('name="caption"', f'name="{"x" * 41}"')
    answer = limited.client.post("/setup", json={"project": "1.1", "schema": long_name})
    assert answer.status_code == 422 and "MAX_NAME_LENGTH=40" in answer.json()["detail"]


def test_a_full_queue_answers_429_and_queued_jobs_expire(limited, fake_ls, redis_db):
    limited, env = limited
    connection = redis.Redis.from_url(env["REDIS_URL"])
    prefix = f"{KEY_PREFIX}-limited"
    tasks = [batch_task(i, f"{fake_ls.url}/img/red.png?n={i}", "predictions") for i in range(2)]
    first = limited.client.post("/predict", json=batch_body(tasks))
    assert first.status_code == 200  # two jobs queued (nobody takes them), answered without results
    queued = Queue(f"{prefix}-batch", connection=connection, serializer=JSONSerializer).job_ids
    assert len(queued) == 2
    more = limited.client.post("/predict", json=batch_body([batch_task(9, f"{fake_ls.url}/img/blue.png",
                                                                       "predictions")]))
    assert more.status_code == 429 and "MAX_QUEUED_JOBS=2" in more.json()["detail"]
    # QUEUED_JOB_TTL=2: a job nobody took in time is gone.
    wait_until(lambda: not any(Job.exists(j, connection=connection) for j in queued), 15, "queued jobs to expire")


# ---------------------------------------------------------------------- errors without internals
def test_a_500_names_an_incident_not_the_exception(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from backend.app import create_app
    from backend.labelstudio_backend import GPT4RoIBackend

    def broken(self, *args: Any) -> dict[str, str]:
        raise RuntimeError("internal path /srv/secret/config and a token abc123")

    monkeypatch.setattr(GPT4RoIBackend, "setup", broken)
    settings = Settings(data_dir=tmp_path, model_dir=tmp_path, webhook_secret="x",
                        redis_url=f"redis://127.0.0.1:{_free_port()}/0", redis_socket_timeout=0.2)
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    answer = client.post("/setup", json={})
    assert answer.status_code == 500
    detail = answer.json()["detail"]
    assert detail.startswith("internal error ") and "secret" not in detail and "abc123" not in detail


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------- jobs are the backend's own
@pytest.mark.usefixtures("worker")
def test_a_worker_never_runs_a_function_someone_else_enqueued(redis_db, tmp_path):
    marker = tmp_path / "ran"
    queue = Queue(f"{KEY_PREFIX}-interactive", connection=redis_db, serializer=JSONSerializer)
    job = queue.enqueue_call("os.system", args=(f"touch {marker}",), job_id=f"{KEY_PREFIX}-foreign")
    wait_until(lambda: job.get_status(refresh=True) in ("failed", "finished"), 30, "the worker to take the job")
    assert job.get_status() == "failed"
    assert not marker.exists()
    assert "ForeignJob" in (job.latest_result().exc_string or "")


# ---------------------------------------------------------------------- generated bodies
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25)


def predict_bodies() -> st.SearchStrategy[Any]:
    task = st.fixed_dictionaries({"id": st.integers(-5, 10**9) | st.text(max_size=5),
                                  "data": st.dictionaries(st.sampled_from(["image", "x"]),
                                                          st.text(max_size=60) | json_values, max_size=2)},
                                 optional={"annotations": json_values, "predictions": json_values})
    structured = st.fixed_dictionaries(
        {"tasks": st.lists(task, max_size=4) | json_values},
        optional={"label_config": st.just(CAPTURED_CONFIG) | st.text(max_size=80), "project": json_values,
                  "params": st.fixed_dictionaries({"context": json_values | st.fixed_dictionaries(
                      {"result": st.lists(json_values, max_size=3)})})})
    return structured | json_values


def webhook_bodies() -> st.SearchStrategy[Any]:
    annotation = st.fixed_dictionaries(
        {"id": st.integers(1, 10**6) | json_values, "result": st.lists(json_values, max_size=3) | json_values},
        optional={"updated_at": st.text(max_size=30), "was_cancelled": json_values, "task": json_values})
    structured = st.fixed_dictionaries(
        {"action": st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                                    "START_TRAINING", "SOMETHING"]) | st.text(max_size=10)},
        optional={"annotation": annotation, "annotations": st.lists(json_values, max_size=3),
                  "task": json_values, "project": json_values})
    captured = st.builds(webhook, st.integers(1, 400), st.text(max_size=30))
    return captured | structured | json_values


@pytest.fixture(scope="module")
def fuzzed(base_env, tmp_path_factory):
    """An API for generated bodies, and what it acknowledged: annotation id → whether the last acknowledged
    event about it left samples stored."""
    folder = tmp_path_factory.mktemp("fuzzed")
    env = backend_env(base_env, DATA_DIR=str(folder / "data"), INTERACTIVE_TIMEOUT="2", BATCH_PREDICT_DEADLINE="2",
                      REDIS_KEY_PREFIX=f"{KEY_PREFIX}-fuzz", LOG_LEVEL="ERROR")
    server = start_api(env, folder / "api.log")
    yield server, {}, folder / "data"
    server.stop()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(body=predict_bodies())
def test_generated_predict_bodies_never_get_a_5xx(fuzzed, body):
    server, _, _ = fuzzed
    answer = server.client.post("/predict", content=json.dumps(body).encode(),
                                headers={"Content-Type": "application/json"})
    # 503/504: Redis is fine but no worker listens on this prefix, so jobs that got that far time out.
    assert answer.status_code < 500 or answer.status_code in (503, 504), answer.text
    assert isinstance(answer.json(), dict)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(body=webhook_bodies())
def test_generated_webhook_bodies_never_get_a_5xx(fuzzed, body):
    server, latest, _ = fuzzed
    answer = server.client.post("/webhook", content=json.dumps(body).encode(),
                                headers={"Content-Type": "application/json"})
    assert answer.status_code < 500, answer.text
    if answer.status_code != 200:
        return
    summary = answer.json()
    if summary["action"] in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED") and isinstance(body.get("annotation"), dict):
        annotation_id = int_or_none(body["annotation"].get("id"))
        if annotation_id is not None and not summary.get("ignored"):
            latest[annotation_id] = summary["samples"] > 0
    elif summary["action"] == "ANNOTATIONS_DELETED":
        for item in body.get("annotations") or []:
            if isinstance(item, dict) and int_or_none(item.get("id")) is not None:
                latest[int_or_none(item.get("id"))] = False


def test_every_acknowledged_correction_is_stored(fuzzed):
    _, latest, data = fuzzed
    assert len(latest) > 20, "the generated bodies should include stored corrections"
    stored = CorrectionsStore.for_settings(Settings(data_dir=Path(data))).annotation_ids()
    missing = {a for a, kept in latest.items() if kept and a not in stored}
    assert not missing, f"acknowledged but not stored: {sorted(missing)[:10]}"
