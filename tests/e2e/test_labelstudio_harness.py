"""The Label Studio harness works against a real Label Studio 1.23.2 server.

Every shipped labeling config becomes a project that stores imported tasks and per-region annotations,
and every client call an ML-backend test needs (connect, retrieve predictions, interactive request,
annotation events, training) reaches a backend through Label Studio. The backend here is a stub that
speaks the protocol with fixed answers; the GPT4RoI backend is tested on top of the same harness.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from .labelstudio import CONFIG_DIR, ImageServer, LabelStudioClient, region_result

pytestmark = pytest.mark.e2e

CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.xml"))
IMAGE_SIZE = (64, 48)


def write_image(server: ImageServer, name: str, color: tuple[int, int, int]) -> str:
    """Write a plain PNG below the image server's folder and return its URL."""
    Image.new("RGB", IMAGE_SIZE, color).save(server.root / name)
    return server.url(name)


@pytest.fixture(scope="module")
def image_urls(image_server: ImageServer) -> list[str]:
    return [write_image(image_server, f"plain-{i}.png", color)
            for i, color in enumerate([(200, 30, 30), (30, 200, 30)])]


@pytest.mark.parametrize("config", CONFIGS)
def test_project_from_config_stores_imported_tasks(ls_client: LabelStudioClient, image_urls: list[str],
                                                   config: str):
    project = ls_client.create_project_from_config(config, title=f"harness {config}")
    controls = {c.name for c in LabelInterface((CONFIG_DIR / config).read_text()).controls}
    assert set(project["parsed_label_config"]) == controls

    task_ids = ls_client.import_tasks(project["id"], [{"data": {"image": url}} for url in image_urls])

    stored = ls_client.list_tasks(project["id"])
    assert [t["id"] for t in stored] == task_ids
    assert [t["data"]["image"] for t in stored] == image_urls
    for url in image_urls:
        answer = httpx.get(url, timeout=5)
        assert answer.status_code == 200
        assert answer.content.startswith(b"\x89PNG")


@pytest.mark.parametrize("config", CONFIGS)
def test_project_from_config_keeps_a_per_region_annotation(ls_client: LabelStudioClient,
                                                           image_urls: list[str], config: str):
    project = ls_client.create_project_from_config(config, title=f"annotated {config}")
    (task_id,) = ls_client.import_tasks(project["id"], [{"data": {"image": image_urls[0]}}])
    result = region_result(project["label_config"], "reg1", (10.0, 20.0, 30.0, 40.0), IMAGE_SIZE,
                           caption="a red square", pick=1)

    created = ls_client.create_annotation(task_id, result)

    (stored,) = ls_client.list_annotations(task_id)
    assert stored["id"] == created["id"]
    assert sorted((r["from_name"], r["id"]) for r in stored["result"]) == sorted(
        (r["from_name"], r["id"]) for r in result)
    assert [r["value"] for r in stored["result"]] == [r["value"] for r in result]


class StubBackend:
    """An ML backend on 127.0.0.1 with fixed answers that records every request Label Studio sends."""

    model_version = "stub-0001"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, body: Any, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                backend.record("GET", self.path, None)
                if self.path == "/health":
                    self._reply({"status": "UP", "model_class": "StubBackend"})
                elif self.path == "/versions":
                    self._reply({"versions": [backend.model_version]})
                else:
                    self._reply({"detail": "not found"}, 404)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                backend.record("POST", self.path, body)
                if self.path == "/setup":
                    self._reply({"model_version": backend.model_version})
                elif self.path == "/predict":
                    self._reply({"results": [backend.predict(task, body) for task in body["tasks"]]})
                elif self.path == "/webhook":
                    self._reply({"status": "ok"}, 201)
                else:
                    self._reply({"detail": "not found"}, 404)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def record(self, method: str, path: str, body: Any) -> None:
        with self._lock:
            self.requests.append((method, path, body))

    def predict(self, task: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
        """One region per task in batch mode; in interactive mode, the drawn region and its captions."""
        context = (request.get("params") or {}).get("context")
        if context and context.get("result"):
            drawn = context["result"][0]
            value = drawn["value"]
            filled = region_result(request["label_config"], drawn["id"],
                                   (value["x"], value["y"], value["width"], value["height"]),
                                   (drawn["original_width"], drawn["original_height"]), caption="drawn")
            result = [drawn, *filled[1:]]
        else:
            result = region_result(request["label_config"], f"t{task['id']}r1", (10.0, 20.0, 30.0, 40.0),
                                   IMAGE_SIZE, caption=f"stub caption {task['id']}")
        return {"model_version": self.model_version, "score": 0.5, "result": result}

    def webhook_actions(self) -> list[str]:
        with self._lock:
            return [body["action"] for method, path, body in self.requests if path == "/webhook"]

    def wait_for_webhook(self, action: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while action not in self.webhook_actions():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {action} webhook within {timeout_s} s; got {self.webhook_actions()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def stub_backend() -> Iterator[StubBackend]:
    backend = StubBackend()
    try:
        yield backend
    finally:
        backend.stop()


def test_client_drives_an_ml_backend_through_label_studio(ls_client: LabelStudioClient,
                                                          image_urls: list[str], stub_backend: StubBackend):
    project = ls_client.create_project_from_config("demo_shapes.xml", title="stub backend")
    task_ids = ls_client.import_tasks(project["id"], [{"data": {"image": url}} for url in image_urls])

    ml = ls_client.connect_ml_backend(project["id"], stub_backend.url, title="stub", is_interactive=True)
    assert ml["state"] == "CO", ml
    assert ml["model_version"] == StubBackend.model_version
    assert [w["url"] for w in ls_client.list_webhooks(project["id"])] == [f"{stub_backend.url}/webhook"]
    assert [b["id"] for b in ls_client.list_ml_backends(project["id"])] == [ml["id"]]

    answer = ls_client.retrieve_predictions(project["id"])
    assert answer["processed_items"] == len(task_ids), answer
    for task_id in task_ids:
        (prediction,) = ls_client.wait_for_predictions(task_id, timeout_s=10)
        assert prediction["model_version"] == StubBackend.model_version
        assert {r["id"] for r in prediction["result"]} == {f"t{task_id}r1"}
    assert ls_client.next_task(project["id"])["predictions"], "the label stream shows no prediction"

    drawn = region_result(project["label_config"], "Drawn01", (5.0, 5.0, 50.0, 50.0), IMAGE_SIZE)[0]
    interactive = ls_client.interactive_annotating(ml["id"], task_ids[0], {"result": [drawn]})
    assert "errors" not in interactive, interactive
    assert interactive["data"]["result"][0] == drawn
    assert {r["from_name"] for r in interactive["data"]["result"]} == {"bbox", "caption", "color", "size",
                                                                       "texture"}
    assert len(ls_client.list_predictions(task_id=task_ids[0])) == 1, "interactive answers are not stored"

    result = region_result(project["label_config"], "Corr01", (10.0, 20.0, 30.0, 40.0), IMAGE_SIZE,
                           caption="a green circle")
    annotation = ls_client.create_annotation(task_ids[0], result)
    stub_backend.wait_for_webhook("ANNOTATION_CREATED")
    ls_client.update_annotation(annotation["id"], result[:1])
    stub_backend.wait_for_webhook("ANNOTATION_UPDATED")
    ls_client.delete_annotation(annotation["id"])
    stub_backend.wait_for_webhook("ANNOTATIONS_DELETED")
    assert ls_client.list_annotations(task_ids[0]) == []

    ls_client.train(ml["id"])
    stub_backend.wait_for_webhook("START_TRAINING")


def test_image_server_refuses_urls_for_missing_files(image_server: ImageServer):
    with pytest.raises(FileNotFoundError, match=r"no-such\.png"):
        image_server.url("no-such.png")
    answer = httpx.get(f"{image_server.base_url}/no-such.png", timeout=5)
    assert answer.status_code == 404
