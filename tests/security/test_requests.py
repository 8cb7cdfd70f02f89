"""Requests as an attacker would send them, over real HTTP to the real API (and its worker and Redis where
the attack goes through them): every one gets a 4xx that says why, nothing is lost, nothing runs that the
backend did not write."""

from __future__ import annotations

import copy
import json
import signal
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rq import Queue, SimpleWorker
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

CAPTURED_WEBHOOK = capture("09")["request"]["json"]


def webhook(annotation_id: int, caption: str = "a red square") -> dict[str, Any]:
    body = copy.deepcopy(CAPTURED_WEBHOOK)
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


LEAKED = "token-abc123 in /srv/models/secret-7b"


class _BrokenModelJob(Job):
    """A prediction job that fails inside the worker the way a broken model or disk does: with an exception
    whose message names paths and a token."""

    @property
    def func(self) -> Any:
        return _broken_model


def _broken_model(payload: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError(f"cannot load the weights: {LEAKED}")


def test_a_job_that_fails_in_the_worker_is_answered_with_an_incident_not_its_exception(base_env, fake_ls, redis_db,
                                                                                        tmp_path):
    prefix = f"{KEY_PREFIX}-broken"
    env = backend_env(base_env, DATA_DIR=str(tmp_path / "data"), REDIS_KEY_PREFIX=prefix)
    server = start_api(env, tmp_path / "api.log")
    answers: list[Any] = []
    asking = threading.Thread(target=lambda: answers.append(
        server.client.post("/predict", json=interactive_body(f"{fake_ls.url}/img/red.png"))))
    try:
        asking.start()
        queue = Queue(f"{prefix}-interactive", connection=redis_db, serializer=JSONSerializer)
        wait_until(lambda: queue.count, 30, "the prediction job to be queued")
        _work_once(queue, redis_db)
        asking.join(60)
        [answer] = answers
        detail = answer.json()["detail"]
        assert answer.status_code == 500
        assert "the worker failed on this job" in detail and "incident " in detail
        assert "abc123" not in detail and "/srv/" not in detail and "RuntimeError" not in detail
        incident = detail.split("incident ", 1)[1].split(";")[0]
        logged = wait_until(lambda: incident in server.process.tail(200) and server.process.tail(200), 10,
                            "the incident in the API's log")
        assert LEAKED in logged, "the details stay available to the operator, under the incident id"
    finally:
        server.stop()


def _work_once(queue: Queue, connection: redis.Redis) -> None:
    """Run what `queue` holds with a worker whose jobs break (in this process, restoring the signal handlers
    that an RQ worker replaces)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        SimpleWorker([queue], connection=connection, serializer=JSONSerializer, job_class=_BrokenModelJob,
                     name=f"{KEY_PREFIX}-broken-worker").work(burst=True, logging_level="ERROR")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


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
json_scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))


def _nested(depth: int, leaf: Any, as_object: bool) -> Any:
    for _ in range(depth):
        leaf = {"n": leaf} if as_object else [leaf]
    return leaf


# Nesting from a few levels to far past MAX_JSON_DEPTH (refused with a 400, never a 500); deeper than the
# test itself can encode is sent raw in tests/security/test_boundaries.py.
nested_values = st.builds(_nested, st.integers(2, 600), json_scalars, st.booleans())
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25) | nested_values


def predict_bodies() -> st.SearchStrategy[Any]:
    """Anything a client could send: Label Studio's own requests with generated boxes and images (these reach
    the queue and the worker), bodies of the right shape with generated contents, and arbitrary JSON."""
    task = st.fixed_dictionaries({"id": st.integers(-5, 10**9) | st.text(max_size=5),
                                  "data": st.dictionaries(st.sampled_from(["image", "x"]),
                                                          st.text(max_size=60) | json_values, max_size=2)},
                                 optional={"annotations": json_values, "predictions": json_values})
    structured = st.fixed_dictionaries(
        {"tasks": st.lists(task, max_size=4) | json_values},
        optional={"label_config": st.just(CAPTURED_CONFIG) | st.text(max_size=80), "project": json_values,
                  "params": st.fixed_dictionaries({"context": json_values | st.fixed_dictionaries(
                      {"result": st.lists(json_values, max_size=3)})})})
    return drawn_bodies() | batch_bodies() | structured | json_values


# Where generated tasks point: images the stand-in Label Studio serves (with its token), one it does not
# have, and references the fetch policy refuses; beside generated text.
IMAGES = ("/data/upload/1/red.png", "/data/upload/1/blue.png", "/data/upload/1/missing.png",
          "/data/upload/../../etc/passwd", "http://127.0.0.1:1/x.png", "file:///etc/passwd", "s3://bucket/x.png",
          "/data/upload/1/été.png", "/data/upload/2/red.png", "http://bücher.invalid/x.png")
# Label Studio's requests, parsed once: examples are copies of them.
DRAWN = interactive_body("")
DRAWN_REGION = DRAWN["params"]["context"]["result"][0]
BATCH = batch_body([])
BATCH_TASK = batch_task(0, "", None)


def rectangles() -> st.SearchStrategy[dict[str, Any]]:
    """A rectangle as Label Studio sends it: mostly a box inside the image, sometimes with a field replaced
    by any JSON, another control's name or type, or a label the config does not have."""
    box = st.tuples(st.floats(0, 95), st.floats(0, 95), st.floats(0.5, 60), st.floats(0.5, 60))
    junk = st.just({}) | st.dictionaries(st.sampled_from(["x", "y", "width", "height", "rotation",
                                                          "rectanglelabels"]), json_scalars, max_size=2)
    labels = st.lists(st.sampled_from(["Object", "Text"]) | st.text(max_size=8), max_size=2)
    control = st.just(("bbox", "rectanglelabels")) | st.sampled_from(
        [("bbox", "rectangle"), ("caption", "textarea"), ("nope", "rectanglelabels")])
    return st.builds(_rectangle, st.text(min_size=1, max_size=8), box, labels, junk, control,
                     st.just({}) | st.dictionaries(st.sampled_from(["original_width", "original_height"]),
                                                   json_scalars, max_size=2))


def _rectangle(region_id: str, box: tuple[float, float, float, float], labels: list[str], junk: dict[str, Any],
               control: tuple[str, str], sizes: dict[str, Any]) -> dict[str, Any]:
    x, y, width, height = box
    value = {"x": x, "y": y, "width": width, "height": height, "rotation": 0, "rectanglelabels": labels, **junk}
    from_name, kind = control
    return {**copy.deepcopy(DRAWN_REGION), "id": region_id, "from_name": from_name, "type": kind, "value": value,
            **sizes}


def images() -> st.SearchStrategy[Any]:
    # Generated text is mostly non-ASCII; in an upload path or a URL it reaches the worker's fetch.
    return (st.sampled_from(IMAGES) | st.text(max_size=40)
            | st.builds("/data/upload/1/{}.png".format, st.text(max_size=12))
            | st.builds("http://127.0.0.1:1/{}.png".format, st.text(max_size=12)))


def drawn_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """Label Studio's interactive request (a drawn box) with generated regions and image."""
    return st.builds(_drawn, images(), st.lists(rectangles(), min_size=1, max_size=3),
                     st.sampled_from([DRAWN["project"], None]) | json_values)


def _drawn(image: Any, regions: list[dict[str, Any]], project: Any) -> dict[str, Any]:
    body = copy.deepcopy(DRAWN)
    body["tasks"][0]["data"]["image"] = image
    body["params"]["context"]["result"] = regions
    body["project"] = project
    return body


def batch_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """Label Studio's batch request with generated tasks whose boxes come from predictions or annotations."""
    task = st.builds(_task, st.integers(1, 10**6), images(), st.sampled_from(["predictions", "annotations"]),
                     st.lists(rectangles(), max_size=2))
    return st.builds(lambda tasks: {**BATCH, "tasks": tasks}, st.lists(task, min_size=1, max_size=3))


def _task(task_id: int, image: Any, source: str, regions: list[dict[str, Any]]) -> dict[str, Any]:
    task = copy.deepcopy(BATCH_TASK)
    task["id"] = task_id
    task["data"]["image"] = image
    task[source] = [{"id": task_id, "result": regions}]
    return task


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
def fuzzed(base_env, worker, tmp_path_factory):
    """An API for generated bodies, served by the session's worker (so a body that reaches the queue is
    answered, not timed out), and what it acknowledged: annotation id → whether the last acknowledged event
    about it left samples stored."""
    folder = tmp_path_factory.mktemp("fuzzed")
    # The session's key prefix, which its worker listens on; the default INTERACTIVE_TIMEOUT (30 s) is far
    # beyond a job of the tiny model, so a 504 would mean a job that never ended.
    env = backend_env(base_env, DATA_DIR=str(folder / "data"), BATCH_PREDICT_DEADLINE="5", LOG_LEVEL="ERROR")
    server = start_api(env, folder / "api.log")
    yield server, {}, folder / "data"
    server.stop()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(body=predict_bodies())
def test_generated_predict_bodies_never_get_a_5xx(fuzzed, body):
    server, _, _ = fuzzed
    answer = server.client.post("/predict", content=json.dumps(body).encode(),
                                headers={"Content-Type": "application/json"})
    assert answer.status_code < 500, answer.text
    assert isinstance(answer.json(), dict)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
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
