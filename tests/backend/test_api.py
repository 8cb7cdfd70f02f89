"""The ML backend over real HTTP, as Label Studio 1.23 calls it, with a real Redis and a real model worker.

Request bodies are the captured Label Studio requests, with image URLs pointing at the stand-in server.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.corrections import CorrectionsStore
from backend.settings import Settings
from backend.store import Database
from tests.support import REPO, capture, config_xml, wait_until
from tests.support.model_factory import MODEL_VERSION
from tests.support.processes import backend_env, start_api
from tests.support.redis_server import KEY_PREFIX
from tests.support.requests import CAPTURED_CONFIG, batch_body, batch_task, check_prediction, interactive_body


# ---------------------------------------------------------------------- connect
class TestConnect:
    def test_health_is_constant_json(self, api):
        response = api.client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "UP", "model_class": "GPT4RoIBackend"}

    def test_setup_answers_the_current_version_to_the_captured_request(self, api):
        response = api.client.post("/setup", json=capture("02")["request"]["json"])
        assert response.status_code == 200
        assert response.json() == {"model_version": MODEL_VERSION}

    def test_setup_refuses_a_config_it_cannot_fill(self, api):
        body = {**capture("02")["request"]["json"], "schema": '<View><Text name="t" value="$t"/></View>'}
        response = api.client.post("/setup", json=body)
        assert response.status_code == 422 and "no <Image>" in response.json()["detail"]

    def test_versions(self, api):
        assert api.client.get("/versions").json() == {"versions": [MODEL_VERSION], "current_version": MODEL_VERSION,
                                                      "engines": {MODEL_VERSION: "gpt4roi"}}

    def test_api_process_never_imports_torch(self, base_env):
        script = (
            "import sys\n"
            "from fastapi.testclient import TestClient\n"
            "from backend.app import create_app\n"
            "client = TestClient(create_app())\n"
            "assert client.get('/health').status_code == 200\n"
            "assert client.post('/setup', json={'project': '1.2'}).status_code == 200\n"
            "declared = {'Content-Type': 'application/json'}\n"
            "assert client.post('/predict', content=b'{', headers=declared).status_code == 400\n"
            "import os\n"
            "signed = {'X-Webhook-Secret': os.environ['WEBHOOK_SECRET']}\n"
            "assert client.post('/webhook', json={'action': 'PROJECT_UPDATED'}, headers=signed).status_code == 200\n"
            "assert client.get('/metrics').status_code == 200\n"
            "import backend.prelabel, backend.__main__\n"
            "heavy = {'torch', 'torchvision', 'transformers', 'peft'}\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
            "assert not loaded, loaded\n"
        )
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=backend_env(base_env),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]

    @pytest.mark.usefixtures("worker", "redis_db")
    def test_running_api_process_has_no_torch_loaded(self, api, fake_ls):
        assert api.client.post("/predict", json=interactive_body(f"{fake_ls.url}/img/red.png")).status_code == 200
        mapped = {m.path for m in psutil.Process(api.process.popen.pid).memory_maps()}
        assert not [path for path in mapped if "/torch/" in path or "libtorch" in path]


# ---------------------------------------------------------------------- predictions
@pytest.mark.usefixtures("worker", "redis_db")
class TestInteractive:
    def test_drawn_box_without_label_gets_caption_choices_and_label(self, api, fake_ls):
        body = interactive_body(f"{fake_ls.url}/img/red.png", labels=[])
        response = api.client.post("/predict", json=body)
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["results"]
        check_prediction(prediction)
        rect, caption, attrs = prediction["result"]
        assert [i["id"] for i in prediction["result"]] == ["Drawn01"] * 3
        assert (rect["type"], caption["type"], attrs["type"]) == ("rectanglelabels", "textarea", "choices")
        assert rect["value"]["rectanglelabels"][0] in {"Object", "Text"} and 0 < rect["score"] <= 1
        assert isinstance(caption["value"]["text"][0], str)
        assert set(attrs["value"]["choices"]) <= {"occluded", "truncated", "clear"}
        drawn = body["params"]["context"]["result"][0]["value"]
        for item in (caption, attrs):
            assert {k: item["value"][k] for k in ("x", "y", "width", "height")} == {
                k: drawn[k] for k in ("x", "y", "width", "height")}

    def test_annotators_label_is_sent_back_unchanged(self, api, fake_ls):
        body = interactive_body(f"{fake_ls.url}/img/red.png")
        (prediction,) = api.client.post("/predict", json=body).json()["results"]
        check_prediction(prediction)
        assert prediction["result"][0] == body["params"]["context"]["result"][0]

    def test_uploaded_image_is_fetched_with_the_token(self, api, fake_ls):
        response = api.client.post("/predict", json=interactive_body("/data/upload/1/blue.png"))
        assert response.status_code == 200, response.text
        check_prediction(response.json()["results"][0])

    def test_context_without_rectangles_gives_an_empty_prediction(self, api, fake_ls):
        body = interactive_body(f"{fake_ls.url}/img/red.png")
        body["params"]["context"]["result"] = []
        assert api.client.post("/predict", json=body).json() == {
            "results": [{"result": [], "score": 0.0, "model_version": MODEL_VERSION}]}

    def test_identical_requests_share_one_job(self, api, fake_ls, redis_db):
        body = interactive_body(f"{fake_ls.url}/img/blue.png", labels=[])
        first = api.client.post("/predict", json=body).json()
        second = api.client.post("/predict", json=body).json()
        assert first == second
        assert len(list(redis_db.scan_iter("rq:results:*"))) == 1

    @pytest.mark.parametrize("image, message", [
        ("{ls}/img/corrupt.png", "not a decodable image"),
        ("{ls}/img/missing.png", "HTTP 404"),
        ("http://localhost:{port}/img/red.png", "not in ALLOWED_IMAGE_HOSTS"),
        ("ftp://example.com/a.png", "unsupported image reference"),
    ])
    def test_unusable_images_are_a_client_error_with_the_reason(self, api, fake_ls, image, message):
        port = fake_ls.url.rsplit(":", 1)[1]
        response = api.client.post("/predict", json=interactive_body(image.format(ls=fake_ls.url, port=port)))
        assert response.status_code == 422
        assert message in response.json()["detail"]
        assert api.client.get("/health").status_code == 200


@pytest.mark.usefixtures("worker", "redis_db")
class TestBatch:
    def test_one_prediction_per_task_in_order(self, api, fake_ls):
        tasks = [batch_task(11, f"{fake_ls.url}/img/red.png", "predictions"),
                 batch_task(12, f"{fake_ls.url}/img/blue.png", None),
                 batch_task(13, "/data/upload/1/blue.png", "annotations")]
        response = api.client.post("/predict", json=batch_body(tasks))
        assert response.status_code == 200, response.text
        first, empty, third = response.json()["results"]
        check_prediction(first)
        check_prediction(third)
        assert empty == {"result": [], "score": 0.0, "model_version": MODEL_VERSION}
        assert sorted({i["id"] for i in first["result"]}) == ["t2r1", "t2r2"]
        assert {i["id"] for i in third["result"]} == {"Reg001"}
        assert len(first["result"]) == 6 and len(third["result"]) == 3

    def test_task_open_without_context_uses_the_tasks_boxes(self, api, fake_ls):
        body = copy.deepcopy(capture("07")["request"]["json"])
        body["tasks"][0]["data"]["image"] = f"{fake_ls.url}/img/blue.png"
        (prediction,) = api.client.post("/predict", json=body).json()["results"]
        check_prediction(prediction)
        assert {i["id"] for i in prediction["result"]} == {"t2r1", "t2r2"}

    def test_shipped_demo_config(self, api, fake_ls):
        config = config_xml("demo_shapes.xml")
        task = batch_task(21, f"{fake_ls.url}/img/red.png", None)
        task["predictions"] = [{"model_version": "detector", "result": [
            {"id": "d1", "type": "rectanglelabels", "from_name": "bbox", "to_name": "image", "original_width": 96,
             "original_height": 64, "value": {"x": 10, "y": 18, "width": 42, "height": 50, "rotation": 0,
                                              "rectanglelabels": ["square"]}}]}]
        (prediction,) = api.client.post("/predict", json=batch_body([task], config)).json()["results"]
        check_prediction(prediction, config)
        assert [i["from_name"] for i in prediction["result"]] == ["bbox", "caption", "color", "size", "texture"]

    def test_one_broken_image_does_not_sink_the_batch(self, api, fake_ls):
        tasks = [batch_task(31, f"{fake_ls.url}/img/corrupt.png", "predictions"),
                 batch_task(32, f"{fake_ls.url}/img/red.png", "predictions")]
        broken, good = api.client.post("/predict", json=batch_body(tasks)).json()["results"]
        assert "result" not in broken and "not a decodable image" in broken["detail"]
        check_prediction(good)

    def test_a_batch_of_only_broken_images_is_a_client_error(self, api, fake_ls):
        tasks = [batch_task(41, f"{fake_ls.url}/img/corrupt.png", "predictions")]
        response = api.client.post("/predict", json=batch_body(tasks))
        assert response.status_code == 422 and "task 41" in response.json()["detail"]


# ---------------------------------------------------------------------- bad input
def interactive_two_tasks() -> dict[str, Any]:
    body = interactive_body("http://x/a.png")
    body["tasks"] = body["tasks"] * 2
    return body


def with_bad_region() -> dict[str, Any]:
    body = interactive_body("http://x/a.png")
    body["params"]["context"]["result"][0]["value"]["width"] = "wide"
    return body


BAD_REQUESTS = [
    (b"not json", 400, "not valid JSON"),
    (b"", 400, "empty body"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"tasks": [{"id": 1, "data": {"image": NaN}}]}', 400, "NaN is not a JSON value"),
    ({}, 400, "no 'tasks'"),
    ({"tasks": []}, 400, "non-empty list"),
    ({"tasks": "all"}, 400, "non-empty list"),
    ({"tasks": [7], "label_config": CAPTURED_CONFIG}, 422, "not a Label Studio task"),
    ({"tasks": [{"id": 1}], "label_config": CAPTURED_CONFIG}, 422, "not a Label Studio task"),
    ({"tasks": [{"id": 1, "data": {}}]}, 422, "no labeling config"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": "<View><Text name='t' value='$t'/></View>"}, 422,
     "no <Image>"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": "<View><Image name='i' value='$i'/></View>"}, 422,
     "no region tool"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": "<View"}, 422, "cannot be parsed"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": CAPTURED_CONFIG, "params": "x"}, 400, "'params'"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": CAPTURED_CONFIG, "params": {"context": [1]}}, 400,
     "params.context"),
    (interactive_two_tasks(), 400, "one task"),
    (with_bad_region(), 422, "numeric x, y, width and height"),
    ({**interactive_body("x"), "tasks": [{"id": 2, "data": {"picture": "a.png"}}]}, 422, "has no image"),
]


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS)
def test_malformed_predict_requests_get_a_4xx_with_the_reason(api, body, status, message):
    if isinstance(body, bytes):
        response = api.client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    else:
        response = api.client.post("/predict", json=body)
    assert response.status_code == status, response.text
    assert response.json()["status"] == status
    assert message in response.json()["detail"]
    assert api.client.get("/health").status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
task_like = st.fixed_dictionaries({"id": json_values, "data": st.dictionaries(st.sampled_from(["image", "x"]),
                                                                              json_values, max_size=2)})
predict_bodies = st.fixed_dictionaries(
    {},
    optional={"tasks": st.lists(task_like | json_values, max_size=3) | json_values,
              "label_config": st.just(CAPTURED_CONFIG) | json_values,
              "params": st.fixed_dictionaries({}, optional={"context": json_values}) | json_values,
              "project": json_values},
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=predict_bodies | json_values)
def test_arbitrary_json_never_breaks_the_server(api, body):
    # As Label Studio sends it: a JSON body, declared as such (httpx sends json=None as no body at all).
    response = api.client.post("/predict", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 400, 422), response.text
    if response.status_code != 200:
        assert response.json()["detail"]
    else:
        results = response.json()["results"]
        assert len(results) == len(body["tasks"])


def test_unknown_routes_and_methods_answer_json(api):
    missing = api.client.get("/nope")
    assert missing.status_code == 404 and missing.json()["status"] == 404
    wrong = api.client.get("/predict")
    assert wrong.status_code == 405 and wrong.json()["status"] == 405


# ---------------------------------------------------------------------- webhooks and metrics
WEBHOOK_CAPTURES = ["08", "09", "10", "11", "12", "13", "14", "15"]


def test_every_captured_webhook_is_acknowledged_and_stored(api, base_env):
    store = CorrectionsStore.for_settings(Settings.from_env({}, data_dir=Path(base_env["DATA_DIR"])))
    before = len(store.events())
    for prefix in WEBHOOK_CAPTURES:
        body = capture(prefix)["request"]["json"]
        started = time.perf_counter()
        response = api.client.post("/webhook", json=body)
        assert response.status_code == 200, response.text
        assert time.perf_counter() - started < 1.0
        assert response.json()["action"] == body["action"]
    actions = [e["action"] for e in store.events()[before:]]
    assert actions == [capture(p)["request"]["json"]["action"] for p in WEBHOOK_CAPTURES]


def test_legacy_train_route_is_recorded_like_start_training(api, base_env):
    response = api.client.post("/train", json=capture("11")["request"]["json"])
    assert response.status_code == 200
    assert response.json()["action"] == "START_TRAINING"
    store = CorrectionsStore.for_settings(Settings.from_env({}, data_dir=Path(base_env["DATA_DIR"])))
    assert store.events()[-1]["action"] == "START_TRAINING"


@pytest.mark.parametrize("body, message", [(b"[]", "JSON object"), (b'{"project": {}}', "no 'action'"),
                                           (b"{", "not valid JSON")])
def test_malformed_webhooks_are_refused(api, body, message):
    response = api.client.post("/webhook", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and message in response.json()["detail"]


@pytest.mark.usefixtures("worker", "redis_db")
def test_metrics_show_queues_latencies_and_version(api, fake_ls):
    api.client.post("/predict", json=interactive_body(f"{fake_ls.url}/img/red.png", labels=["Text"]))
    text = api.client.get("/metrics").text
    assert f'gpt4roi_queue_depth{{queue="{KEY_PREFIX}-interactive"}} 0.0' in text
    assert f'gpt4roi_queue_depth{{queue="{KEY_PREFIX}-batch"}}' in text
    assert "gpt4roi_queue_up 1.0" in text
    assert f'gpt4roi_model_info{{version="{MODEL_VERSION}"}} 1.0' in text
    wait_count = 'gpt4roi_job_wait_seconds_count{kind="interactive"}'
    count = next(line for line in text.splitlines() if line.startswith(wait_count))
    assert float(count.split()[-1]) >= 1
    assert 'gpt4roi_http_requests_total{route="/predict",status="200"}' in text


# ---------------------------------------------------------------------- auth, deadlines, hand-off
def test_basic_auth_everywhere_but_the_webhook_which_checks_its_secret(base_env, tmp_path):
    env = backend_env(base_env, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="pw", WEBHOOK_SECRET="s3cret")
    server = start_api(env, tmp_path / "api.log")
    try:
        anonymous = httpx.Client(base_url=server.url, timeout=30)
        # Health checks hold no credentials: they learn that the API is up, and nothing else.
        health = anonymous.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert server.client.get("/health").json()["model_class"] == "GPT4RoIBackend"
        assert anonymous.post("/setup", json={}).status_code == 401
        assert anonymous.post("/predict", json={}).json()["detail"].startswith("Basic auth required")
        assert server.client.get("/health").status_code == 200
        event = capture("09")["request"]["json"]
        assert anonymous.post("/webhook", json=event).status_code == 401
        assert anonymous.post("/webhook", json=event, headers={"X-Webhook-Secret": "wrong"}).status_code == 401
        accepted = anonymous.post("/webhook", json=event, headers={"X-Webhook-Secret": "s3cret"})
        assert accepted.status_code == 200 and accepted.json()["action"] == "ANNOTATION_CREATED"
        anonymous.close()
    finally:
        server.stop()


def test_an_unsigned_webhook_has_the_secret_header_added_to_label_studios_webhook(base_env, fake_ls, tmp_path):
    # Label Studio may have been down when the API started, or the webhook added since: until the header is
    # there, its events are refused, so the first unsigned one has the API add it.
    # Only connected projects' webhooks get it (tests/security/test_webhook_secret.py).
    env = backend_env(base_env, DATA_DIR=str(tmp_path / "data"))
    Database.for_settings(Settings.from_env(env)).write(lambda db: db.execute(
        "INSERT INTO connected_projects (project_id, label_studio_url, connected_at) VALUES (1, ?, 0)",
        (fake_ls.url,)))
    server = start_api(env, tmp_path / "api.log")
    hook = {"id": 9000 + len(fake_ls.webhooks), "project": 1, "url": f"{server.url}/webhook", "headers": {}}
    fake_ls.webhooks.append(hook)
    try:
        unsigned = httpx.post(f"{server.url}/webhook", json=capture("09")["request"]["json"], timeout=30)
        assert unsigned.status_code == 401
        wait_until(lambda: hook["headers"].get("X-Webhook-Secret") == base_env["WEBHOOK_SECRET"], 30,
                   "the secret header in Label Studio's webhook")
    finally:
        fake_ls.webhooks.remove(hook)
        server.stop()


@pytest.mark.usefixtures("worker", "redis_db")
def test_interactive_deadline_gives_504_and_the_server_stays_up(base_env, fake_ls, tmp_path):
    server = start_api(backend_env(base_env, INTERACTIVE_TIMEOUT="1"), tmp_path / "api.log")
    try:
        started = time.perf_counter()
        response = server.client.post("/predict", json=interactive_body(f"{fake_ls.url}/slow/red.png?delay=2.5"))
        assert response.status_code == 504
        assert "INTERACTIVE_TIMEOUT=1s" in response.json()["detail"]
        assert time.perf_counter() - started < 3
        assert server.client.get("/health").status_code == 200
    finally:
        server.stop()


@pytest.mark.usefixtures("worker", "redis_db")
def test_batch_past_its_deadline_is_pushed_to_label_studio_once_per_task(base_env, fake_ls, tmp_path):
    project = 501
    tasks = [batch_task(5000 + i, f"{fake_ls.url}/slow/red.png?delay=0.5&n={i}", "predictions") for i in range(3)]
    fake_ls.add_project(project, CAPTURED_CONFIG, tasks)
    server = start_api(backend_env(base_env, BATCH_PREDICT_DEADLINE="0.2"), tmp_path / "api.log")
    try:
        response = server.client.post("/predict", json=batch_body(tasks))
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 3
        pending = [t["id"] for t, r in zip(tasks, results, strict=True) if "result" not in r]
        returned = [t["id"] for t, r in zip(tasks, results, strict=True) if "result" in r]
        assert pending, "the deadline was meant to pass before the jobs finished"
        wait_until(lambda: len(fake_ls.predictions_for(project)) >= len(pending), 60, "pushed predictions")
        time.sleep(1.0)
        pushed = fake_ls.predictions_for(project)
        assert sorted(p["task"] for p in pushed) == sorted(pending)
        assert not set(returned) & {p["task"] for p in pushed}
        for prediction in pushed:
            check_prediction(prediction)
    finally:
        server.stop()


def test_settings_reach_the_api_process(base_env, tmp_path):
    env = backend_env(base_env, MAX_IMAGE_PIXELS="not-a-number")
    done = subprocess.run([sys.executable, "-m", "backend", "serve-api"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "MAX_IMAGE_PIXELS='not-a-number' is not valid" in done.stderr

