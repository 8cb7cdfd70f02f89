"""The GPT4RoI backend serves a stock Label Studio 1.23.2 end to end.

Label Studio runs as a team runs it: legacy tokens disabled for the organization, the backend holding only
a personal access token. Our API and a worker serve the shipped demo model; `python -m backend connect`
registers it in a project built from ``labelstudio_config/demo_shapes.xml``, adds the webhook secret and
selects its model version. Most tasks' images are uploaded into Label Studio (so the worker downloads them
with the token), one comes from an image server; their boxes come from a detector's predictions. The
demo model knows these scenes' world, so its answers are checked for being right, not only well formed.
"""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.confirmation import Confirmation, confirm
from backend.corrections import CorrectionsStore
from backend.images import ImageLoader
from backend.labelstudio import LabelStudioClient as BackendClient
from backend.labelstudio import LabelStudioError
from backend.settings import Settings
from model.demo import demo_version_name, ensure_demo_checkpoint
from model.demo.synthetic import HELD_OUT_SHAPE, ObjectSpec, image_seed, make_image
from tests.support import REPO, WEBHOOK_SECRET
from tests.support.processes import Api, Process, backend_env, start_api, start_worker
from tests.support.redis_server import REDIS_URL

from .labelstudio import CONFIG_DIR, ImageServer, LabelStudioClient, LabelStudioServer, region_result

pytestmark = pytest.mark.e2e

CONFIG_NAME = "demo_shapes.xml"
PER_REGION = {"caption": "textarea", "color": "choices", "size": "choices", "texture": "choices"}
PREDICTION_TIMEOUT_S = 120.0
UPLOADED = 3  # scenes uploaded into Label Studio; one more is served by the image server


@dataclass(frozen=True)
class Scene:
    """A synthetic scene as a Label Studio task: its id, the object its one box frames, that box's id."""

    task_id: int
    obj: ObjectSpec
    width: int
    height: int
    region_id: str

    def box_item(self) -> dict[str, Any]:
        """The detector's box, as Label Studio stores a rectanglelabels region (no label yet)."""
        x1, y1, x2, y2 = self.obj.box
        return {"id": self.region_id, "from_name": "bbox", "to_name": "image", "type": "rectanglelabels",
                "original_width": self.width, "original_height": self.height, "image_rotation": 0,
                "value": {"x": 100 * x1 / self.width, "y": 100 * y1 / self.height,
                          "width": 100 * (x2 - x1) / self.width, "height": 100 * (y2 - y1) / self.height,
                          "rotation": 0, "rectanglelabels": ["square"]}}


@dataclass
class ConnectedProject:
    """A Label Studio project our backend is connected to, with scenes whose truth is known."""

    project: dict[str, Any]
    label_config: str
    scenes: list[Scene]
    model_version: str
    connect_output: str
    env: dict[str, str]

    @property
    def task_ids(self) -> list[int]:
        return [s.task_id for s in self.scenes]

    def scene(self, task_id: int) -> Scene:
        return next(s for s in self.scenes if s.task_id == task_id)


def scenes(count: int, first_seed: int = 0) -> Iterator[tuple[bytes, ObjectSpec, tuple[int, int]]]:
    """PNG bytes of unseen scenes, each with its largest object that is not the held-back shape (other
    `first_seed`s give other scenes)."""
    seed = first_seed
    while count:
        image, objects = make_image(image_seed(4242, seed), exclude_shapes=[HELD_OUT_SHAPE])
        seed += 1
        obj = max(objects, key=lambda o: (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        count -= 1
        yield buffer.getvalue(), obj, image.size


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MODEL_DIR whose current version is the shipped demo model."""
    root = tmp_path_factory.mktemp("demo-models")
    version = demo_version_name()
    (root / version).symlink_to(ensure_demo_checkpoint(), target_is_directory=True)
    (root / "current").write_text(version + "\n")
    return root


@contextlib.contextmanager
def running_backend(env: dict[str, str], logs: Path) -> Iterator[tuple[Api, dict[str, str]]]:
    """Our API and one worker on `env` (its own REDIS_KEY_PREFIX), stopped on exit; yields the API and the
    environment that reaches it (PORT, HOST, BACKEND_URL), for `python -m backend` commands."""
    worker: Process = start_worker(env, logs / "worker.log", f"{env['REDIS_KEY_PREFIX']}-worker")
    try:
        api = start_api(env, logs / "api.log")
    except BaseException:
        worker.stop()
        raise
    try:
        yield api, {**env, "PORT": str(urlsplit(api.url).port), "HOST": "127.0.0.1", "BACKEND_URL": api.url}
    finally:
        api.stop()
        worker.stop()


@pytest.fixture(scope="module")
def our_backend(labelstudio: LabelStudioServer, image_server: ImageServer, demo_models: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, dict[str, str]]]:
    """Our API and one worker with the demo model, holding the user's personal access token."""
    env = backend_env({
        "REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": f"gpt4roi-e2e-{secrets.token_hex(4)}",
        "MODEL_DIR": str(demo_models), "DATA_DIR": str(tmp_path_factory.mktemp("backend-data")),
        "LABEL_STUDIO_URL": labelstudio.url, "LABEL_STUDIO_API_KEY": labelstudio.token,
        "ALLOWED_IMAGE_HOSTS": urlsplit(image_server.base_url).netloc,
        "WEBHOOK_SECRET": WEBHOOK_SECRET, "DEVICE": "cpu", "WORKER_HEARTBEAT_TTL": "5",
        "WORKER_MAINTENANCE_INTERVAL": "2", "INTERACTIVE_TIMEOUT": "90", "BATCH_PREDICT_DEADLINE": "90",
        "FINETUNE_STEPS": "1", "FINETUNE_DEVICE": "cpu", "LOG_LEVEL": "INFO",
    })
    with running_backend(env, tmp_path_factory.mktemp("backend-logs")) as running:
        yield running


def run_backend(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m backend ARGS` with the backend's environment."""
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def connected(ls_client: LabelStudioClient, image_server: ImageServer,
              our_backend: tuple[Api, dict[str, str]]) -> ConnectedProject:
    """The demo project: three uploaded scenes and one served one, a detector box each, our backend connected
    with `python -m backend connect`."""
    _, env = our_backend
    label_config = (CONFIG_DIR / CONFIG_NAME).read_text(encoding="utf-8")
    project = ls_client.create_project_from_config(CONFIG_NAME, title="gpt4roi end to end")
    made = list(scenes(UPLOADED + 1))
    task_ids = ls_client.upload_images(project["id"], {f"scene-{i}.png": data
                                                        for i, (data, _, _) in enumerate(made[:UPLOADED])})
    served = "e2e-served-scene.png"
    (image_server.root / served).write_bytes(made[UPLOADED][0])
    task_ids += ls_client.import_tasks(project["id"], [{"data": {"image": image_server.url(served)}}])
    result = [Scene(task_id, obj, size[0], size[1], f"Box{i:03d}")
              for i, (task_id, (_, obj, size)) in enumerate(zip(task_ids, made, strict=True))]
    for scene in result:
        ls_client.request("POST", "/api/predictions/", json_body={
            "task": scene.task_id, "model_version": "detector", "score": 0.9, "result": [scene.box_item()]})
    # As after importing a detector's predictions: they are what the label stream shows.
    ls_client.update_project(project["id"], model_version="detector")

    done = run_backend(env, "connect", "--project", str(project["id"]))
    assert done.returncode == 0, done.stdout + done.stderr
    version = demo_version_name()
    return ConnectedProject(project=project, label_config=label_config, scenes=result, model_version=version,
                            connect_output=done.stdout, env=env)


def assert_valid(prediction: dict[str, Any], label_config: str) -> None:
    """Label Studio's own validation of a prediction finds nothing wrong."""
    interface = LabelInterface(label_config)
    assert interface.validate_prediction({k: prediction[k] for k in ("model_version", "score", "result")},
                                         return_errors=True) == [], prediction


def prediction_of(ls_client: LabelStudioClient, task_id: int, version: str,
                  timeout_s: float = PREDICTION_TIMEOUT_S) -> dict[str, Any]:
    """The task's one stored prediction of `version`, once it is there (pushes may arrive later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ours = [p for p in ls_client.list_predictions(task_id=task_id) if p["model_version"] == version]
        if ours:
            assert len(ours) == 1, ours
            return ours[0]
        assert time.monotonic() < deadline, f"task {task_id} has no prediction of {version} after {timeout_s} s"
        time.sleep(0.5)


def assert_scored(prediction: dict[str, Any]) -> None:
    """Label Studio kept every proposed field's own score and the task score, the product of them (the
    probability that the annotator keeps it all, which the Data Manager sorts by)."""
    fields = [item for item in prediction["result"] if item["type"] in ("textarea", "choices")]
    assert fields and all(0.0 <= item["score"] <= 1.0 for item in fields), prediction["result"]
    assert 0.0 <= prediction["score"] <= min(item["score"] for item in fields) + 1e-6, prediction


def assert_right_region(result: list[dict[str, Any]], scene: Scene, label_config: str) -> None:
    """The region has its rectangle, a caption naming the object's colour, and the right colour ticked."""
    items = {item["from_name"]: item for item in result if item["id"] == scene.region_id}
    assert set(items) == {"bbox", *PER_REGION}, f"region {scene.region_id} has items {sorted(items)}: {result}"
    controls = {control.name: control for control in LabelInterface(label_config).controls}
    for name, kind in PER_REGION.items():
        item = items[name]
        for key in ("x", "y", "width", "height"):
            assert item["value"][key] == pytest.approx(items["bbox"]["value"][key]), (name, key)
        if kind == "choices":
            (choice,) = item["value"]["choices"]
            assert choice in controls[name].labels, item
    assert items["color"]["value"]["choices"] == [scene.obj.color], (scene.obj, items["color"])
    (caption,) = items["caption"]["value"]["text"]
    assert scene.obj.color in caption.split(), (scene.obj, caption)


# ---------------------------------------------------------------------- connect
def test_connect_registers_hooks_up_and_versions_the_project(connected: ConnectedProject,
                                                             ls_client: LabelStudioClient):
    output = connected.connect_output
    assert "[done] ML backend" in output and "[done] webhook" in output, output
    [backend] = ls_client.list_ml_backends(connected.project["id"])
    assert backend["state"] == "CO" and backend["is_interactive"] is True and backend["title"] == "gpt4roi"
    [hook] = ls_client.list_webhooks(connected.project["id"])
    assert hook["headers"] == {"X-Webhook-Secret": WEBHOOK_SECRET}
    # The detector's imported predictions had made "detector" the prelabeling version; now it is our live
    # model, which Label Studio knows to serve the backend's current version.
    assert "'detector' → the live model 'gpt4roi'" in output, output
    assert ls_client.get_project(connected.project["id"])["model_version"] == "gpt4roi"
    assert backend["model_version"] == connected.model_version


def test_connect_again_changes_nothing_and_check_reports(connected: ConnectedProject, ls_client: LabelStudioClient):
    again = run_backend(connected.env, "connect", "--project", str(connected.project["id"]))
    assert again.returncode == 0 and "connected: nothing to change" in again.stdout, again.stdout + again.stderr
    assert "[done]" not in again.stdout
    assert len(ls_client.list_ml_backends(connected.project["id"])) == 1
    assert len(ls_client.list_webhooks(connected.project["id"])) == 1
    checked = run_backend(connected.env, "connect", "--project", str(connected.project["id"]), "--check")
    assert checked.returncode == 0 and "[ok]" in checked.stdout, checked.stdout


# ---------------------------------------------------------------------- predictions
def test_retrieve_predictions_fills_every_task_rightly_uploaded_images_included(connected: ConnectedProject,
                                                                                ls_client: LabelStudioClient):
    answer = ls_client.retrieve_predictions(connected.project["id"])
    assert answer["processed_items"] == len(connected.task_ids), answer
    for scene in connected.scenes:
        predictions = ls_client.wait_for_predictions(scene.task_id, count=2, timeout_s=PREDICTION_TIMEOUT_S)
        ours = [p for p in predictions if p["model_version"] == connected.model_version]
        assert len(ours) == 1 and len(predictions) == 2, predictions
        (prediction,) = ours
        assert {item["id"] for item in prediction["result"]} == {scene.region_id}
        assert_right_region(prediction["result"], scene, connected.label_config)
        assert_valid(prediction, connected.label_config)
        assert_scored(prediction)


def test_the_data_manager_sorts_tasks_least_certain_first_after_prelabel_sort_by_score(
        connected: ConnectedProject, ls_client: LabelStudioClient):
    # Label Studio's "Prediction score" column averages the predictions of the project's chosen version
    # only: while the project follows the live model it stays empty; `prelabel --sort-by-score` chooses
    # the version it pushed.
    ls_client.retrieve_predictions(connected.project["id"])
    ours = sorted(prediction_of(ls_client, scene.task_id, connected.model_version)["score"]
                  for scene in connected.scenes)
    view = ls_client.request("POST", "/api/dm/views/", json_body={
        "project": connected.project["id"], "data": {"ordering": ["tasks:predictions_score"]}})

    def listed() -> list[Any]:
        tasks = ls_client.request("GET", "/api/tasks", params={"view": view["id"], "page_size": 100})["tasks"]
        return [task["predictions_score"] for task in tasks]

    assert listed() == [None] * len(ours)
    done = run_backend(connected.env, "prelabel", "--project", str(connected.project["id"]), "--sort-by-score")
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"prelabeling version of the project: {connected.model_version}" in done.stdout
        assert listed() == pytest.approx(ours, abs=1e-6)
    finally:
        ls_client.update_project(connected.project["id"], model_version="gpt4roi")


def test_a_rectangle_drawn_on_an_uploaded_image_comes_back_rightly(connected: ConnectedProject,
                                                                   ls_client: LabelStudioClient):
    scene = connected.scenes[0]
    [backend] = ls_client.list_ml_backends(connected.project["id"])
    drawn = {**scene.box_item(), "id": "Drawn01"}
    answer = ls_client.interactive_annotating(backend["id"], scene.task_id, {"result": [drawn]})
    assert "errors" not in answer, answer
    data = answer["data"]
    assert data["model_version"] == connected.model_version, data
    assert_right_region(data["result"], Scene(scene.task_id, scene.obj, scene.width, scene.height, "Drawn01"),
                        connected.label_config)


def test_the_label_stream_asks_the_backend_for_a_task_imported_after_connect(connected: ConnectedProject,
                                                                               ls_client: LabelStudioClient,
                                                                               image_server: ImageServer):
    # A project of its own, so that its label stream has one task to give: the one imported below.
    project = ls_client.create_project_from_config(CONFIG_NAME, title="gpt4roi label stream")
    done = run_backend(connected.env, "connect", "--project", str(project["id"]))
    assert done.returncode == 0, done.stdout + done.stderr
    [(data, obj, size)] = scenes(1, first_seed=1000)
    (image_server.root / "e2e-stream-scene.png").write_bytes(data)
    probe = Scene(0, obj, size[0], size[1], "Stream01")
    [task_id] = ls_client.import_tasks(project["id"], [{
        "data": {"image": image_server.url("e2e-stream-scene.png")},
        "predictions": [{"model_version": "detector", "score": 0.9, "result": [probe.box_item()]}]}])
    assert all(p["model_version"] == "detector" for p in ls_client.list_predictions(task_id=task_id))

    # The prelabeling version is the live model: Label Studio asks the backend now, for this task.
    task = ls_client.next_task(project["id"])
    assert task["id"] == task_id
    [shown] = task["predictions"]
    assert shown["model_version"] == connected.model_version, task["predictions"]
    assert_right_region(shown["result"], probe, connected.label_config)
    assert prediction_of(ls_client, task_id, connected.model_version)["id"] == shown["id"]  # stored, too


# ---------------------------------------------------------------------- corrections
def test_corrections_arrive_signed_and_only_confirmed_ones_are_trained_on(connected: ConnectedProject,
                                                                          our_backend: tuple[Api, dict[str, str]],
                                                                          ls_client: LabelStudioClient):
    api, env = our_backend
    settings = Settings.from_env(env)
    store = CorrectionsStore.for_settings(settings)
    genuine = []
    for scene in connected.scenes[:2]:
        result = region_result(connected.label_config, scene.region_id, tuple(
            scene.box_item()["value"][k] for k in ("x", "y", "width", "height")), (scene.width, scene.height),
            caption=scene.obj.caption)
        genuine.append(ls_client.create_annotation(scene.task_id, result)["id"])
    deadline = time.monotonic() + 30
    while not set(genuine) <= store.annotation_ids():
        assert time.monotonic() < deadline, f"Label Studio's webhooks did not arrive: {store.annotation_ids()}"
        time.sleep(0.2)

    # Someone who learnt the secret posts an annotation Label Studio never had.
    forged = json.loads(json.dumps(next(e for e in store.events() if e["action"] == "ANNOTATION_CREATED")))
    forged["annotation"]["id"] = 987_654
    assert api.client.post("/webhook", json=forged).status_code == 200
    states = confirm(settings, store.regions())
    assert {a: states[a] for a in genuine} == dict.fromkeys(genuine, Confirmation.CONFIRMED)
    assert states[987_654] is Confirmation.MISSING

    tuned = run_backend(env, "finetune", "--min-new", "1")
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    versions = run_backend(env, "versions")
    assert "missing 1" in versions.stdout and "1 left out" in versions.stdout, versions.stdout

    # Deletions are Label Studio's word: its own one removes the annotation for good once its API answers
    # 404; a forged one withholds the other annotation only until Label Studio is asked.
    ls_client.delete_annotation(genuine[0])
    while genuine[0] in store.annotation_ids():
        assert time.monotonic() < deadline + 30, "Label Studio's ANNOTATIONS_DELETED did not arrive"
        time.sleep(0.2)
    forged_deletion = {"action": "ANNOTATIONS_DELETED", "project": {"id": connected.project["id"]},
                       "annotations": [{"id": genuine[1]}]}
    assert api.client.post("/webhook", json=forged_deletion).status_code == 200
    assert genuine[1] not in store.annotation_ids()
    confirm(settings, store.regions())
    assert genuine[1] in store.annotation_ids() and genuine[0] not in store.annotation_ids()
    replayed = next(e for e in store.events() if e["action"] == "ANNOTATION_CREATED"
                    and e["annotation"]["id"] == genuine[0])
    assert "deleted earlier" in api.client.post("/webhook", json=replayed).json()["ignored"][0]


def test_a_rotated_secret_reaches_label_studio_and_its_events_keep_coming(connected: ConnectedProject,
                                                                         our_backend: tuple[Api, dict[str, str]],
                                                                         ls_client: LabelStudioClient):
    api, env = our_backend
    store = CorrectionsStore.for_settings(Settings.from_env(env))
    rotated = run_backend(env, "rotate-secret", "--grace", "3600")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    [hook] = [h for h in ls_client.list_webhooks(connected.project["id"]) if h["url"].endswith("/webhook")]
    new = hook["headers"]["X-Webhook-Secret"]
    assert new != WEBHOOK_SECRET and new not in rotated.stdout + rotated.stderr

    scene = connected.scenes[UPLOADED]  # the served scene: the uploaded ones stay as later tests expect
    result = region_result(connected.label_config, scene.region_id, tuple(
        scene.box_item()["value"][k] for k in ("x", "y", "width", "height")), (scene.width, scene.height),
        caption=scene.obj.caption)
    created = ls_client.create_annotation(scene.task_id, result)["id"]
    deadline = time.monotonic() + 30
    while created not in store.annotation_ids():
        assert time.monotonic() < deadline, "Label Studio's webhook signed with the new secret was not accepted"
        time.sleep(0.2)
    event = {"action": "PROJECT_UPDATED", "project": {"id": connected.project["id"]}}
    assert api.client.post("/webhook", json=event).status_code == 200  # the old secret, within the grace window


def live_version(ls_client: LabelStudioClient, project_id: int) -> str:
    """The version Label Studio holds for the project's live model (what it last read from /setup)."""
    [backend] = ls_client.list_ml_backends(project_id)
    return backend["model_version"]


def test_a_promotion_moves_the_projects_prelabeling_version_and_keeps_older_predictions(
        connected: ConnectedProject, ls_client: LabelStudioClient):
    project_id = connected.project["id"]
    scene = connected.scenes[1]
    # A no-op where Retrieve Predictions already ran: Label Studio asks only for tasks without one.
    ls_client.retrieve_predictions(project_id, [scene.task_id])
    older = prediction_of(ls_client, scene.task_id, connected.model_version)

    models = Path(connected.env["MODEL_DIR"])
    promoted = "demo-promoted"
    shutil.copytree(models / connected.model_version, models / promoted, symlinks=False)
    ls_client.update_project(project_id, model_version="detector")  # someone changed it by hand
    done = run_backend(connected.env, "promote", promoted)
    assert done.returncode == 0 and f"prelabels with {promoted}" in done.stdout, done.stdout + done.stderr
    project = ls_client.get_project(project_id)
    assert project["model_version"] == "gpt4roi" and live_version(ls_client, project_id) == promoted

    # The next Retrieve Predictions asks the new version; the older version's prediction stays as history.
    ls_client.retrieve_predictions(project_id, [scene.task_id])
    newer = prediction_of(ls_client, scene.task_id, promoted)
    assert_right_region(newer["result"], scene, connected.label_config)
    kept = prediction_of(ls_client, scene.task_id, connected.model_version, timeout_s=0)
    assert (kept["id"], kept["result"]) == (older["id"], older["result"])
    assert len(ls_client.list_predictions(task_id=scene.task_id)) == 3  # the detector's, the older, the newer

    back = run_backend(connected.env, "rollback", connected.model_version)
    assert back.returncode == 0
    assert live_version(ls_client, project_id) == connected.model_version
    history = {p["model_version"]: p["id"] for p in ls_client.list_predictions(task_id=scene.task_id)}
    assert history == {"detector": history["detector"], connected.model_version: older["id"], promoted: newer["id"]}


# ---------------------------------------------------------------------- the legacy token
def test_a_legacy_token_works_where_an_administrator_enabled_legacy_tokens(connected: ConnectedProject,
                                                                           labelstudio: LabelStudioServer,
                                                                           ls_client: LabelStudioClient,
                                                                           tmp_path: Path):
    settings = Settings(label_studio_url=labelstudio.url, label_studio_api_key=labelstudio.legacy_token)
    # An uploaded scene nobody annotated: its boxes are the detector's (and our earlier prediction's).
    scene = connected.scenes[UPLOADED - 1]
    task = ls_client.get_task(scene.task_id)
    assert task["data"]["image"].startswith("/data/upload/") and not task["annotations"]
    with pytest.raises(LabelStudioError):
        BackendClient(settings).project(connected.project["id"])  # off, as in a stock organization
    labelstudio.set_legacy_tokens(True)
    try:
        assert BackendClient(settings).project(connected.project["id"])["id"] == connected.project["id"]
        image = ImageLoader(settings).load(task["data"]["image"])
        assert image.size == (scene.width, scene.height)

        # A backend holding only the legacy token answers /predict for the uploaded image: its worker
        # downloads it with that token.
        env = {**connected.env, "LABEL_STUDIO_API_KEY": labelstudio.legacy_token,
               "REDIS_KEY_PREFIX": f"gpt4roi-e2e-legacy-{secrets.token_hex(4)}", "DATA_DIR": str(tmp_path / "data")}
        env.pop("BACKEND_URL")
        with running_backend(env, tmp_path) as (api, _):
            answer = api.client.post("/predict", json={
                "tasks": [task], "project": f"{connected.project['id']}.0", "label_config": connected.label_config,
                "params": {"login": None, "password": None, "context": None}})
        assert answer.status_code == 200, answer.text
        [prediction] = answer.json()["results"]
        assert prediction["model_version"] == connected.model_version
        assert {item["id"] for item in prediction["result"]} == {scene.region_id}
        assert_right_region(prediction["result"], scene, connected.label_config)
        assert_valid(prediction, connected.label_config)
    finally:
        labelstudio.set_legacy_tokens(False)
