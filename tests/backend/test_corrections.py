"""The corrections store: webhooks in, region samples, proposals, training records and statistics out."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rq import Queue
from rq.serializers import JSONSerializer

from backend.acceptance import acceptance_by_version, compare_fields, normalized_edit_distance
from backend.annotations import AnnotationError, parse_annotation_regions
from backend.confirmation import confirm
from backend.corrections import CorrectionsStore
from backend.jobs import JobQueue, connect
from backend.labelconfig import FillPlan, build_prediction, regions_from_task
from backend.labelstudio_backend import GPT4RoIBackend
from backend.metrics import Metrics
from backend.payloads import make_payload
from backend.runs import FinetuneRuns, RunStatus
from backend.settings import Settings
from backend.store import DB_FILE, SQLiteDatabase
from backend.training_data import IMAGE_CACHE_DIR, is_held_out, local_images, split_held_out, training_examples
from model.engine import LABEL
from tests.support import REPO, capture, free_port
from tests.support.hitl import DEMO_CONFIG, annotation_event, make_tasks, task_json
from tests.support.redis_server import KEY_PREFIX, REDIS_URL


def event(prefix: str) -> dict[str, Any]:
    """A captured webhook body (a fresh copy)."""
    return copy.deepcopy(capture(prefix)["request"]["json"])


def annotation(annotation_id: int, task_id: int, caption: str, **changes: Any) -> dict[str, Any]:
    """The captured ANNOTATION_CREATED with another annotation id, task id and caption."""
    body = event("09")
    body["annotation"].update({"id": annotation_id, "task": task_id, **changes})
    body["task"]["id"] = task_id
    for item in body["annotation"]["result"]:
        if item["type"] == "textarea":
            item["value"]["text"] = [caption]
    return body


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings with their own database (each test runs on SQLite and on PostgreSQL), DATA_DIR and local
    images; Redis unreachable unless a test says otherwise."""
    return Settings.from_env({}, data_dir=tmp_path / "data", model_dir=tmp_path / "models",
                             database_url=database_url,
                             local_files_document_root=str(tmp_path / "images"),
                             redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_socket_timeout=0.5,
                             key_prefix=KEY_PREFIX)


def fresh_query(settings: Settings, sql: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Rows from a connection of its own, opened for this query alone (as another process would)."""
    if settings.database_url:
        import psycopg

        with psycopg.connect(settings.database_url) as fresh:
            return fresh.execute(sql.replace("?", "%s"), parameters).fetchall()
    with contextlib.closing(sqlite3.connect(Path(settings.data_dir) / DB_FILE)) as fresh:
        return fresh.execute(sql, parameters).fetchall()


def store_of(settings: Settings) -> CorrectionsStore:
    return CorrectionsStore.for_settings(settings)


def fit(settings: Settings, body: dict[str, Any]) -> dict[str, Any]:
    """What `/webhook` does with an event: `GPT4RoIBackend.fit`."""
    backend = GPT4RoIBackend(settings, JobQueue(settings, connect(settings.effective_redis_url, settings)))
    return backend.fit(body["action"], body)


# ---------------------------------------------------------------------- webhooks → samples
def test_an_annotation_becomes_one_sample_per_region(settings):
    summary = store_of(settings).record_event(event("09"))

    assert summary == {"action": "ANNOTATION_CREATED", "samples": 1}
    [region] = store_of(settings).regions()
    assert (region.annotation_id, region.task_id, region.region_id) == (1, "1", "Reg001")
    assert region.image == "http://127.0.0.1:8081/img1.png"
    assert region.caption == "a red square"
    assert region.choices == {"attrs": ["occluded"]}
    assert region.label == "Object"
    assert region.box == pytest.approx((0.09375, 0.20833, 0.40625, 0.625))
    assert (region.region.original_width, region.region.original_height) == (64, 48)
    assert region.plan is not None and region.plan.captions == ("caption",)
    assert region.predicted is None


def test_an_updated_annotation_replaces_its_samples_and_counts_as_new(settings):
    store_of(settings).record_event(event("09"))
    first = store_of(settings).regions()[0].seq
    store_of(settings).record_event(event("10"))

    [region] = store_of(settings).regions()
    assert region.caption == "a red square, edited"
    assert region.seq > first
    assert store_of(settings).count_regions(since_seq=first) == 1


def test_deleted_annotations_lose_their_samples(settings):
    store_of(settings).record_event(event("09"))
    store_of(settings).record_event(annotation(7, 3, "a blue circle"))
    assert store_of(settings).record_event(event("13"))["deleted"] == 0  # annotation 2 never had samples

    deleted = event("13")
    deleted["annotations"] = [{"id": 1}]
    assert store_of(settings).record_event(deleted)["deleted"] == 1
    assert [r.annotation_id for r in store_of(settings).regions()] == [7]
    assert store_of(settings).annotation_ids() == {7}


def test_cancelled_and_empty_annotations_store_nothing(settings):
    assert store_of(settings).record_event(event("12"))["samples"] == 0
    cancelled = event("09")
    cancelled["annotation"]["was_cancelled"] = True
    assert store_of(settings).record_event(cancelled)["samples"] == 0
    assert store_of(settings).regions() == []

    store_of(settings).record_event(event("09"))
    skipped_later = event("10")
    skipped_later["annotation"]["was_cancelled"] = True
    store_of(settings).record_event(skipped_later)
    assert store_of(settings).regions() == []


def test_every_event_is_kept_verbatim_whatever_its_action(settings):
    prefixes = ["08", "09", "10", "12", "13", "14"]
    for prefix in prefixes:
        store_of(settings).record_event(event(prefix))
    store_of(settings).record_event({"action": "SOMETHING_NEW", "extra": [1, 2]})

    stored = store_of(settings).events()
    assert [e["action"] for e in stored] == [event(p)["action"] for p in prefixes] + ["SOMETHING_NEW"]
    assert stored[1]["annotation"] == event("09")["annotation"] and stored[1]["task"] == event("09")["task"]
    # Everything but the project's share token and task-data credentials.
    assert stored[1]["project"] == {**event("09")["project"], "token": "***"}


def test_a_scene_annotation_keeps_label_caption_and_every_choice(settings, tmp_path):
    [task] = make_tasks(tmp_path / "images", "b", 1, 1, seed=3)
    store_of(settings).record_event(annotation_event(task, 5, DEMO_CONFIG))

    regions = {r.region_id: r for r in store_of(settings).regions()}
    assert len(regions) == len(task.objects)
    for index, obj in enumerate(task.objects):
        region = regions[task.region_id(index)]
        assert region.label == obj.shape
        assert region.caption == obj.caption
        assert region.choices == {"color": [obj.color], "size": [obj.size], "texture": [obj.texture]}
        x1, y1, x2, y2 = obj.box
        assert region.box == pytest.approx((x1 / task.width, y1 / task.height, x2 / task.width, y2 / task.height))


# ---------------------------------------------------------------------- what the model proposed
def worker_answer(plan: FillPlan, task_json_: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A job payload for a task and an answer a worker could give (distributions that pick a clear winner)."""
    regions = regions_from_task(plan, task_json_)
    payload = make_payload(task_id=task_json_["id"], project="1", image=task_json_["data"]["image"], plan=plan,
                           regions=regions, label_config=DEMO_CONFIG, model_version="v-test", keep_drawn_label=True,
                           max_new_tokens=8)
    answers = []
    for region in regions:
        answers.append({
            "id": region.id, "caption": f"a small red solid circle {region.id}",
            "choices": {c.name: {v: (0.9 if i == 1 else 0.1 / (len(c.candidates) - 1))
                                 for i, v in enumerate(c.candidates)} for c in plan.choices},
            "label": {v: (0.7 if v == "star" else 0.3 / (len(plan.labels) - 1)) for v in plan.labels},
        })
    return payload, {"model_version": "v-test", "image_size": [100, 100], "regions": answers}


def test_the_workers_proposal_is_attached_to_the_corrected_region(settings, tmp_path):
    plan = FillPlan.from_label_config(DEMO_CONFIG)
    [task] = make_tasks(tmp_path / "images", "b", 1, 1, seed=4)
    payload, output = worker_answer(plan, task_json(task))
    assert store_of(settings).record_job_output(payload, output) == len(task.objects)
    store_of(settings).record_event(annotation_event(task, 9, DEMO_CONFIG))

    prediction = build_prediction(plan, regions_from_task(plan, task_json(task)), output["regions"], "v-test")
    sent = parse_annotation_regions(prediction["result"], plan)
    for region in store_of(settings).regions():
        assert region.predicted_version == "v-test"
        # Exactly what Label Studio was sent for that region.
        assert region.predicted == {k: sent[region.region_id][k] for k in ("caption", "choices", "label")}
        assert region.predicted["label"] == "star"
        assert region.predicted["choices"]["color"] == [plan.choices[0].candidates[1]]


def test_a_prediction_carried_by_the_annotation_wins_over_the_table(settings):
    store_of(settings).record_predictions(1, "old", {"Reg001": {"caption": "x", "choices": {}, "label": "Text"}})
    body = event("09")
    body["annotation"]["prediction"] = {"model_version": "shown", "result": copy.deepcopy(
        body["annotation"]["result"])}
    body["annotation"]["prediction"]["result"][1]["value"]["text"] = ["a red box"]
    store_of(settings).record_event(body)

    [region] = store_of(settings).regions()
    assert region.predicted_version == "shown"
    assert region.predicted == {"caption": "a red box", "choices": {"attrs": ["occluded"]}, "label": "Object"}


def test_the_newest_recorded_proposal_of_a_region_is_used(settings):
    store_of(settings).record_predictions(1, "v1", {"Reg001": {"caption": "old", "choices": {}, "label": None}})
    time.sleep(0.01)
    store_of(settings).record_predictions(1, "v2", {"Reg001": {"caption": "new", "choices": {}, "label": None}})
    store_of(settings).record_event(event("09"))
    [region] = store_of(settings).regions()
    assert (region.predicted_version, region.predicted["caption"]) == ("v2", "new")


def test_malformed_proposals_are_refused_with_a_reason(settings):
    with pytest.raises(AnnotationError, match="choices must map control names to lists"):
        store_of(settings).record_predictions(1, "v", {"r": {"caption": "x", "choices": {"color": "red"}}})


# ---------------------------------------------------------------------- export for training
def test_corrections_become_training_examples_with_cached_images(settings, tmp_path):
    tasks = make_tasks(tmp_path / "images", "b", 1, 2, seed=5)
    for i, task in enumerate(tasks):
        store_of(settings).record_event(annotation_event(task, 20 + i, DEMO_CONFIG))
    regions = store_of(settings).regions()

    images, failed = local_images(settings, [(r.image, r.task_id) for r in regions])
    assert failed == {}
    for task in tasks:
        path, width, height = images[task.reference]
        source = task.image_path(tmp_path / "images")
        assert path.name == hashlib.sha256(source.read_bytes()).hexdigest() + ".png"
        assert path.parent == Path(settings.data_dir) / IMAGE_CACHE_DIR
        assert (width, height) == (task.width, task.height)
        source.unlink()  # the cache answers from now on
    again, failed = local_images(settings, [(r.image, r.task_id) for r in regions])
    assert again == images and failed == {}

    examples = training_examples(regions, images)
    fields = (None, "color", "size", "texture", LABEL)
    assert len(examples) == len(fields) * len(regions)
    by_region: dict[str, dict[str | None, str]] = {}
    for example in examples:
        by_region.setdefault(example.meta["region_id"], {})[example.attribute] = example.answer
    for task in tasks:
        for index, obj in enumerate(task.objects):
            answers = by_region[task.region_id(index)]
            assert set(answers) == set(fields)
            assert answers[None] == obj.caption
            assert answers[LABEL] == obj.shape
            assert answers["texture"] == obj.texture
    for example in examples:
        task = next(t for t in tasks if t.task_id == int(example.meta["task_id"]))
        obj = task.objects[int(example.meta["region_id"].rsplit("r", 1)[1]) - 1]
        assert example.box == pytest.approx(obj.box, abs=1e-6)
        assert example.image == str(images[task.reference][0])


def test_an_unreachable_image_is_reported_not_raised(settings, tmp_path):
    [task] = make_tasks(tmp_path / "images", "b", 1, 1, seed=6)
    missing = "/data/local-files/?d=b/nope.png"
    images, failed = local_images(settings, [(task.reference, "1"), (missing, "2")])
    assert set(images) == {task.reference}
    assert "no such file" in failed[missing]


def test_the_held_out_slice_is_a_stable_hash_of_the_task(settings, tmp_path):
    tasks = make_tasks(tmp_path / "images", "b", 1, 12, seed=7)
    for i, task in enumerate(tasks):
        store_of(settings).record_event(annotation_event(task, 40 + i, DEMO_CONFIG))
    regions = store_of(settings).regions()
    train, held = split_held_out(regions, 0.3)
    assert held and train
    assert {r.task_id for r in train}.isdisjoint({r.task_id for r in held})
    assert split_held_out(list(reversed(regions)), 0.3)[1] == list(reversed(held))
    assert all(is_held_out(r.task_id, 0.3) for r in held)
    # Two tasks and a tiny share still hold one task out, so a comparison is always possible.
    two = [r for r in regions if r.task_id in {"1", "2"}]
    assert len({r.task_id for r in split_held_out(two, 0.001)[1]}) == 1
    assert split_held_out(regions, 0.0)[1] == []


# ---------------------------------------------------------------------- fine-tune triggers
def finetune_jobs(redis_db) -> list[Any]:
    queue = Queue(f"{KEY_PREFIX}-finetune", connection=redis_db, serializer=JSONSerializer)
    return queue.get_jobs()


@pytest.mark.usefixtures("redis_db")
def test_start_training_queues_one_finetune_job(settings, redis_db):
    settings = Settings.from_env({}, data_dir=settings.data_dir, redis_url=REDIS_URL, key_prefix=KEY_PREFIX)
    first = fit(settings, event("11"))
    second = fit(settings, event("15"))

    assert first["finetune"].startswith(f"queued {KEY_PREFIX}-finetune-")
    assert second["finetune"] == "already queued"
    [job] = finetune_jobs(redis_db)
    assert job.func_name == "backend.finetune.run_job"
    assert list(job.args) == [{"trigger": "START_TRAINING", "min_new": 1}]
    assert [e["action"] for e in store_of(settings).events()] == ["START_TRAINING", "START_TRAINING"]


@pytest.mark.usefixtures("redis_db")
def test_every_n_new_corrections_queue_a_finetune(settings, redis_db):
    settings = Settings.from_env({}, data_dir=settings.data_dir, redis_url=REDIS_URL, key_prefix=KEY_PREFIX,
                                 finetune_every_n=3)
    for annotation_id in (1, 2):
        assert "finetune" not in fit(settings, annotation(annotation_id, annotation_id, "a"))
    assert finetune_jobs(redis_db) == []
    third = fit(settings, annotation(3, 3, "c"))
    assert third["finetune"].startswith("queued")
    [job] = finetune_jobs(redis_db)
    assert list(job.args) == [{"trigger": "every 3 corrections", "min_new": 3}]

    # A run that failed on these corrections is not retried on them: the next trigger needs 3 fresh ones.
    job.delete()
    runs = FinetuneRuns.for_settings(settings)
    run = runs.start("every 3 corrections", "v")
    runs.finish(run, RunStatus.FAILED, "boom", watermark=store_of(settings).max_seq())
    for annotation_id in (4, 5):
        assert "finetune" not in fit(settings, annotation(annotation_id, annotation_id, "d"))
    assert fit(settings, annotation(6, 6, "e"))["finetune"].startswith("queued")
    assert runs.new_regions() == 6  # the failed run trained nothing: all six are still new


def test_a_redis_outage_does_not_lose_the_event(settings):
    started = time.perf_counter()
    summary = fit(settings, event("11"))
    assert summary["finetune"].startswith("not queued:")
    assert time.perf_counter() - started < 5
    assert [e["action"] for e in store_of(settings).events()] == ["START_TRAINING"]


def test_concurrent_webhooks_are_all_stored_once_and_committed_before_each_call_returns(settings):
    errors: list[BaseException] = []

    def send(offset: int) -> None:
        try:
            for k in range(10):
                store_of(settings).record_event(annotation(offset + k, offset + k, f"caption {offset + k}"))
                # Another connection (another process, after a crash) already sees it.
                found = fresh_query(settings, "SELECT caption FROM samples WHERE annotation_id = ?", (offset + k,))
                assert found == [(f"caption {offset + k}",)]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(1000 * (i + 1),)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store_of(settings).annotation_ids()) == 160
    assert store_of(settings).count_regions() == 160
    assert len(store_of(settings).events()) == 160


def test_a_malformed_annotation_stores_nothing_not_even_the_event(settings):
    broken = annotation(5, 5, "broken")
    broken["annotation"]["id"] = "not a number"
    with pytest.raises(AnnotationError, match="no integer 'id'"):
        store_of(settings).record_event(broken)
    assert store_of(settings).events() == [] and store_of(settings).annotation_ids() == set()


@pytest.mark.usefixtures("redis_db")
def test_the_webhook_route_answers_after_the_commit(api, base_env):
    body = annotation(987_654, 4321, "stored before the answer")
    started = time.perf_counter()
    response = api.client.post("/webhook", json=body)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200 and response.json()["samples"] == 1
    assert elapsed < 1.0
    store = CorrectionsStore(SQLiteDatabase(Path(base_env["DATA_DIR"]) / DB_FILE))
    [region] = [r for r in store.regions() if r.annotation_id == 987_654]
    assert region.caption == "stored before the answer"


def test_a_malformed_annotation_is_refused_with_its_reason(api):
    body = annotation(987_655, 4322, "never stored")
    body["annotation"]["result"] = "not a list"
    response = api.client.post("/webhook", json=body)
    assert response.status_code == 422
    assert response.json()["detail"] == "an annotation's 'result' must be a list of result items"


# ---------------------------------------------------------------------- statistics and report
def test_normalized_edit_distance():
    assert normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert normalized_edit_distance("", "") == 0.0
    assert normalized_edit_distance("abc", "") == 1.0
    assert normalized_edit_distance("a red circle", "a red circle") == 0.0


def test_only_proposed_fields_are_compared():
    final = {"caption": "a red  circle", "choices": {"color": ["red"], "size": ["small"]}, "label": "circle"}
    assert compare_fields({"caption": "a red circle", "choices": {"color": ["red"]}, "label": None}, final) == {
        "caption": True, "color": True}
    assert compare_fields({"caption": None, "choices": {"size": ["large"]}, "label": "star"}, final) == {
        "label": False, "size": False}
    assert compare_fields({"caption": "x", "choices": {}, "label": None}, {"caption": None}) == {"caption": False}


def seed_versions(settings: Settings, confirmed: tuple[int, ...] = (1, 2, 3)) -> None:
    """Three annotations: v1 proposed one right and one wrong region, v2 one right region; Label Studio
    confirmed those in `confirmed` (as a fine-tune asking it leaves them), and both versions are registered."""
    for annotation_id, task_id, version, caption in ((1, 1, "v1", "a red square"), (2, 2, "v1", "a blue star"),
                                                     (3, 3, "v2", "a red square")):
        proposed = {"caption": caption, "choices": {"attrs": ["occluded"]}, "label": "Object"}
        store_of(settings).record_predictions(task_id, version, {"Reg001": proposed})
        store_of(settings).record_event(annotation(annotation_id, task_id, "a red square"))
    mark_confirmed(settings, *confirmed)
    for version in ("v1", "v2"):
        (Path(settings.model_dir) / version).mkdir(parents=True, exist_ok=True)
        (Path(settings.model_dir) / version / "config.json").write_text("{}")


def mark_confirmed(settings: Settings, *annotation_ids: int) -> None:
    store_of(settings).database.write(lambda db: db.executemany(
        "UPDATE annotations SET confirmation = 'confirmed', confirmed_at = ? WHERE annotation_id = ?",
        [(time.time(), i) for i in annotation_ids]))


def test_acceptance_per_version_and_its_prometheus_metrics(settings):
    seed_versions(settings)
    stats = acceptance_by_version(store_of(settings).regions())
    assert stats["v1"].regions == 2 and stats["v1"].acceptance_rate == 0.5
    assert stats["v1"].field_accuracy == {"attrs": 1.0, "caption": 0.5, "label": 1.0}
    wrong = normalized_edit_distance("a blue star", "a red square")
    assert stats["v1"].caption_edit_distance == pytest.approx(wrong / 2)
    assert stats["v2"].acceptance_rate == 1.0

    queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    text = Metrics(queue, version=lambda: "v2", settings=settings).render()[0].decode()
    assert 'gpt4roi_acceptance_ratio{version="v1"} 0.5' in text
    assert 'gpt4roi_field_accuracy{field="caption",version="v1"} 0.5' in text
    assert 'gpt4roi_predicted_regions{version="v2"} 1.0' in text
    assert "gpt4roi_corrected_regions 3.0" in text
    assert "gpt4roi_corrections_new 3.0" in text


def test_statistics_count_confirmed_corrections_and_show_the_others_apart(settings, tmp_path):
    """Fails while `report` and `/metrics` counted every stored correction, Label Studio's word or not."""
    seed_versions(settings, confirmed=(1, 3))  # the wrong proposal's annotation is not confirmed (yet)
    queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    metrics = Metrics(queue, version=lambda: "v2", settings=settings)
    text = metrics.render()[0].decode()
    assert 'gpt4roi_acceptance_ratio{version="v1"} 1.0' in text
    assert 'gpt4roi_predicted_regions{version="v1"} 1.0' in text
    assert "gpt4roi_unconfirmed_regions 1.0" in text and "gpt4roi_corrected_regions 3.0" in text

    mark_confirmed(settings, 2)  # a later answer is seen at the next scrape
    assert 'gpt4roi_acceptance_ratio{version="v1"} 0.5' in metrics.render()[0].decode()

    store_of(settings).database.write(lambda db: db.execute(
        "UPDATE annotations SET confirmation = 'missing' WHERE annotation_id = 2"))
    env = {"DATA_DIR": str(settings.data_dir), "MODEL_DIR": str(settings.model_dir), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO), "DATABASE_URL": settings.database_url}
    done = subprocess.run([sys.executable, "-m", "backend", "report", "--png", str(tmp_path / "plot.png")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    apart, _, counted = done.stdout.partition("confirmed corrections:")
    assert "not confirmed by Label Studio, so not counted below (1 regions)" in apart
    v1_apart = next(line for line in apart.splitlines() if line.startswith("v1 "))
    v1 = next(line for line in counted.splitlines() if line.startswith("v1 "))
    assert v1_apart.split()[1] == "1" and "0.0%" in v1_apart
    assert v1.split()[1] == "1" and "100.0%" in v1


def test_strings_from_webhooks_are_bounded_in_metrics_and_tables(settings, tmp_path):
    """Fails while a version or control name from a webhook became a Prometheus label and a table cell as
    sent: any number of series per scrape, terminal escapes in `report`."""
    from backend.acceptance import AcceptanceStats
    from backend.metrics import MAX_FIELD_LABELS, field_labels

    for i in range(50):
        version = f"imported-\x1b[2J{i}-" + "x" * 500
        store_of(settings).record_predictions(100 + i, version, {"Reg001": {"caption": "a red square"}})
        store_of(settings).record_event(annotation(100 + i, 100 + i, "a red square"))
    mark_confirmed(settings, *range(100, 150))
    queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    text = Metrics(queue, version=lambda: "v2", settings=settings).render()[0].decode()
    assert 'gpt4roi_predicted_regions{version="other"} 50.0' in text
    assert "imported-" not in text

    many = AcceptanceStats(fields={f"control\x07{i}" + "y" * 300: [1, 100 - i] for i in range(100)})
    labels = field_labels(many)
    assert len(labels) == MAX_FIELD_LABELS
    assert all(len(label) <= 40 and "\x07" not in label for label, _ in labels)

    env = {"DATA_DIR": str(settings.data_dir), "MODEL_DIR": str(settings.model_dir), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO), "DATABASE_URL": settings.database_url}
    done = subprocess.run([sys.executable, "-m", "backend", "report", "--png", str(tmp_path / "plot.png")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "imported-?[2J0-" in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) < 200


def test_report_prints_a_table_and_writes_a_plot(settings, tmp_path):
    seed_versions(settings)
    png = tmp_path / "plot.png"
    env = {"DATA_DIR": str(settings.data_dir), "MODEL_DIR": str(settings.model_dir), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO), "DATABASE_URL": settings.database_url}
    done = subprocess.run([sys.executable, "-m", "backend", "report", "--png", str(png)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "corrected regions stored: 3" in lines[0]
    v1 = next(line for line in lines if line.startswith("v1 "))
    assert "50.0%" in v1 and v1.split()[1] == "2"
    with Image.open(io.BytesIO(png.read_bytes())) as image:
        assert image.format == "PNG" and image.width > 300


# ---------------------------------------------------------------------- order, deletions, retention
def test_an_older_delivery_never_overwrites_a_newer_annotation(settings):
    newer = annotation(1, 1, "the annotator's last word", updated_at="2026-11-20T10:00:05.000000Z")
    older = annotation(1, 1, "a replayed first draft", updated_at="2026-11-20T10:00:01.000000Z")
    store_of(settings).record_event(newer)
    summary = store_of(settings).record_event(older)
    assert summary["samples"] == 0 and "older" in summary["ignored"][0]
    assert [r.caption for r in store_of(settings).regions()] == ["the annotator's last word"]
    # A cancellation is a newer word too: the earlier result does not come back.
    cancelled = annotation(1, 1, "x", updated_at="2026-11-20T10:00:09.000000Z", was_cancelled=True)
    store_of(settings).record_event(cancelled)
    store_of(settings).record_event(newer)
    assert store_of(settings).regions() == []


def test_a_deleted_annotation_stays_deleted(settings):
    store_of(settings).record_event(annotation(5, 5, "kept for now"))
    deleted = event("13")
    deleted["annotations"] = [{"id": 5}]
    assert store_of(settings).record_event(deleted)["deleted"] == 1

    class LabelStudioWithoutIt:
        def annotation(self, annotation_id: int) -> None:
            return None  # a 404: the deletion is Label Studio's (tests/security/test_confirmation.py)

    confirm(settings, [], client=LabelStudioWithoutIt())
    replayed = store_of(settings).record_event(annotation(5, 5, "kept for now",
                                                          updated_at="2030-01-01T00:00:00Z"))
    assert replayed["samples"] == 0 and "deleted earlier" in replayed["ignored"][0]
    assert store_of(settings).annotation_ids() == set()


def test_events_and_proposals_are_kept_for_their_retention_only(settings, monkeypatch):
    store = CorrectionsStore(store_of(settings).database, event_retention_days=1, proposal_retention_days=2)
    day = 86_400.0
    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    store.record_predictions(1, "v1", {"r1": {"caption": "old", "choices": {}, "label": None}})
    store.record_event(event("14"))
    clock[0] += 1.5 * day
    store.record_event(event("11"))
    assert [e["action"] for e in store.events()] == ["START_TRAINING"]  # the first event is past a day
    assert store.database.read().execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 1
    clock[0] += day
    store.record_event(event("11"))
    assert store.database.read().execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 0


def test_old_events_are_pruned_at_most_once_a_minute_however_many_stores_write(settings, monkeypatch):
    # The API makes a store per webhook: pruning on each would cost every webhook two more statements.
    day = 86_400.0
    clock = [2_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])

    def kept_after_one_more_event(seconds_later: float) -> int:
        clock[0] += seconds_later
        CorrectionsStore(store_of(settings).database, event_retention_days=1).record_event(event("11"))
        return len(store_of(settings).events())

    assert kept_after_one_more_event(0) == 1  # pruned now, nothing old yet
    assert kept_after_one_more_event(day - 30) == 2  # pruned again; the first is not a day old
    assert kept_after_one_more_event(40) == 3  # the first is past its day, but the last prune was 40 s ago
    assert kept_after_one_more_event(30) == 3  # a minute on: the first goes, the fourth comes


@pytest.mark.parametrize("order", ["newer first", "older first"])
def test_a_bulk_event_naming_one_annotation_twice_keeps_the_newer(settings, order):
    newer = annotation(8, 3, "the newer word", updated_at="2026-11-20T10:00:05Z")
    older = annotation(8, 3, "the older word", updated_at="2026-11-20T10:00:01Z")
    items = [newer["annotation"], older["annotation"]]
    bulk = {**newer, "action": "ANNOTATIONS_CREATED", "annotations": items[::-1] if order == "older first" else items}
    del bulk["annotation"]
    summary = store_of(settings).record_event(bulk)
    assert summary["samples"] == (2 if order == "older first" else 1)
    assert [r.caption for r in store_of(settings).regions()] == ["the newer word"]


# ---------------------------------------------------------------------- corrections of other shapes
OCR_CONFIG = (
    '<View><Image name="image" value="$ocr"/>'
    '<Labels name="label" toName="image"><Label value="Text"/><Label value="Handwriting"/></Labels>'
    '<Rectangle name="bbox" toName="image"/><Polygon name="poly" toName="image"/>'
    '<KeyPointLabels name="kp" toName="image"><Label value="Corner"/></KeyPointLabels>'
    '<TextArea name="transcription" toName="image" perRegion="true"/>'
    '<Choices name="quality" toName="image"><Choice value="sharp"/><Choice value="blurry"/></Choices></View>')


def shapes_event(annotation_id: int) -> dict[str, Any]:
    """An annotation of the OCR-like config: a polygon labelled by the separate Labels control with its
    transcription, a keypoint, and the whole image's Choices."""
    common = {"to_name": "image", "original_width": 200, "original_height": 100, "image_rotation": 0}
    points = {"points": [[10, 20], [40, 20], [30, 60]], "closed": True}
    result = [
        {**common, "id": "poly1", "from_name": "poly", "type": "polygon", "value": points},
        {**common, "id": "poly1", "from_name": "label", "type": "labels", "value": {**points, "labels": ["Text"]}},
        {**common, "id": "poly1", "from_name": "transcription", "type": "textarea",
         "value": {**points, "text": ["STOP"]}},
        {**common, "id": "kp1", "from_name": "kp", "type": "keypointlabels",
         "value": {"x": 50, "y": 50, "width": 0.5, "keypointlabels": ["Corner"]}},
        {"id": "cls9", "from_name": "quality", "to_name": "image", "type": "choices",
         "value": {"choices": ["blurry"]}},
    ]
    return {"action": "ANNOTATION_CREATED",
            "project": {"id": 3, "label_config": OCR_CONFIG},
            "task": {"id": 77, "data": {"ocr": "http://127.0.0.1:8081/sign.png"}},
            "annotation": {"id": annotation_id, "task": 77, "result": result, "was_cancelled": False}}


def test_polygon_keypoint_and_whole_image_corrections_are_stored_with_their_enclosing_box(settings):
    summary = store_of(settings).record_event(shapes_event(41))

    assert summary == {"action": "ANNOTATION_CREATED", "samples": 3}
    regions = {r.region_id: r for r in store_of(settings).regions()}
    polygon, keypoint, whole = regions["poly1"], regions["kp1"], regions["image"]
    assert polygon.box == pytest.approx((0.10, 0.20, 0.40, 0.60))
    assert (polygon.caption, polygon.label) == ("STOP", "Text")
    assert polygon.region.type == "polygon" and polygon.region.geometry()["points"][2] == [30, 60]
    # The keypoint's box: 10% of the shorter side (100 px) around the point, on a 200 x 100 image.
    assert keypoint.box == pytest.approx((0.475, 0.45, 0.525, 0.55))
    assert keypoint.label == "Corner"
    assert whole.box == (0.0, 0.0, 1.0, 1.0) and whole.choices == {"quality": ["blurry"]}


def test_rectangles_of_a_separately_labelled_tool_keep_their_label(settings):
    body = shapes_event(42)
    rect = {"x": 5, "y": 5, "width": 20, "height": 10, "rotation": 0}
    body["annotation"]["result"] = [
        {"id": "b1", "from_name": "bbox", "to_name": "image", "type": "rectangle", "value": rect},
        {"id": "b1", "from_name": "label", "to_name": "image", "type": "labels",
         "value": {**rect, "labels": ["Handwriting"]}},
    ]
    assert store_of(settings).record_event(body)["samples"] == 1
    [region] = store_of(settings).regions()
    assert region.label == "Handwriting" and region.box == pytest.approx((0.05, 0.05, 0.25, 0.15))


def test_shapes_are_read_without_a_labeling_config_too():
    fields = parse_annotation_regions(shapes_event(43)["annotation"]["result"], None)
    assert fields["poly1"]["region"].box() == pytest.approx((0.10, 0.20, 0.40, 0.60))
    assert fields["kp1"]["region"].labels == ("Corner",)
