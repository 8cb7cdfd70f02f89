"""Jobs answered together: a worker takes the jobs waiting in a queue with the one it dequeued and answers
them in one model call, and every job still ends on its own (its result, its error, its retries).

The workers here are real `python -m backend worker --burst` processes on the session's Redis, under a
key prefix of their own, started once their jobs are waiting so the batches they form are known.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from backend.describe import Description, describe, describe_many, load_engine
from backend.images import ImageError
from backend.jobs import JobQueue, connect
from backend.labelconfig import FillPlan, Region
from backend.payloads import make_payload
from backend.settings import Settings
from backend.worker import ImageCache, Predictor
from tests.support import REPO
from tests.support.fake_labelstudio import FakeLabelStudio
from tests.support.images import png_bytes, scene
from tests.support.model_factory import MODEL_VERSION
from tests.support.processes import backend_env
from tests.support.redis_server import KEY_PREFIX
from tests.support.requests import CAPTURED_CONFIG, check_prediction

pytestmark = pytest.mark.slow

PLAN = FillPlan.from_label_config(CAPTURED_CONFIG)
COLOURS = [(220, 30, 30), (20, 40, 220), (30, 160, 60), (240, 200, 20), (140, 40, 160), (20, 20, 20)]


@pytest.fixture(scope="module")
def images(fake_ls: FakeLabelStudio) -> list[str]:
    """Six different public images on the stand-in Label Studio."""
    names = []
    for index, colour in enumerate(COLOURS):
        name = f"batching-{index}.png"
        fake_ls.files[name] = png_bytes(scene(colour=colour, box=(8 + 6 * index, 6, 60, 40 + 3 * index)))
        names.append(f"{fake_ls.url}/img/{name}")
    return names


def regions(count: int, offset: int = 0) -> list[Region]:
    return [Region(id=f"r{offset}-{i}", x=5.0 + 10 * i, y=8.0 + 5 * offset, width=30.0, height=40.0,
                   labels=()) for i in range(count)]


def payload(image: str, task_id: int, count: int = 2, **changes: Any) -> dict[str, Any]:
    made = make_payload(task_id=task_id, project="1", image=image, plan=PLAN, regions=regions(count, task_id % 7),
                        label_config=CAPTURED_CONFIG, model_version=MODEL_VERSION, keep_drawn_label=True,
                        max_new_tokens=6)
    return {**made, **changes}


def same_answers(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Equal captions and labels; distributions equal up to float summation order."""
    assert [r["id"] for r in got] == [r["id"] for r in expected]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["caption"] == theirs["caption"]
        for control, distribution in theirs["choices"].items():
            assert mine["choices"][control] == pytest.approx(distribution, abs=1e-5)
        if theirs["label"] is None:
            assert mine["label"] is None
        else:
            assert mine["label"] == pytest.approx(theirs["label"], abs=1e-5)


@pytest.fixture
def lone_predictor(model_dir: Path, fake_ls: FakeLabelStudio) -> Predictor:
    """The one-job path, in this process, on the session's model."""
    host = fake_ls.url.split("://", 1)[1]
    return Predictor(Settings(model_dir=str(model_dir), device="cpu", allowed_image_hosts=(host,)))


@pytest.fixture
def prefix(redis_db: redis.Redis) -> Iterator[str]:
    """A key prefix nobody else's worker listens on."""
    yield f"{KEY_PREFIX}-batching-{uuid.uuid4().hex[:6]}"


def settings_for(prefix: str, env: dict[str, str]) -> Settings:
    return Settings.from_env({**env, "REDIS_KEY_PREFIX": prefix})


def run_burst_worker(env: dict[str, str], tmp_path: Path, name: str) -> str:
    """Run a worker until its queues are empty; returns its log."""
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        done = subprocess.run([sys.executable, "-m", "backend", "worker", "--burst", "--name", name], cwd=REPO,
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=240)
    text = log.read_text(errors="replace")
    assert done.returncode == 0, text[-3000:]
    return text


def outcome(queue: JobQueue, job_id: str) -> tuple[Job, Result | None]:
    job = Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
    return job, Result.fetch_latest(job, serializer=JSONSerializer)


# ---------------------------------------------------------------------- in this process
def test_several_images_described_together_answer_as_each_alone(tiny_checkpoint: Path):
    engine = load_engine(tiny_checkpoint, "cpu")
    items = [Description(scene(colour=colour), PLAN, regions(1 + i % 3, i), keep_drawn_label=i % 2 == 0)
             for i, colour in enumerate(COLOURS)]
    together = describe_many(engine, items, max_new_tokens=6)
    assert len(together) == len(items)
    for item, answers in zip(items, together, strict=True):
        same_answers(answers, describe(engine, item.image, item.plan, item.regions, item.keep_drawn_label, 6))


def test_a_payload_that_cannot_be_used_gets_its_own_error_and_the_others_their_answers(lone_predictor, images,
                                                                                       fake_ls):
    payloads = [payload(images[0], 1), payload(f"{fake_ls.url}/img/corrupt.png", 2), {"v": 99},
                payload(images[1], 3, count=3)]
    outputs = lone_predictor.run_many(payloads)
    assert outputs[1]["error"]["kind"] == "image"
    assert outputs[2]["error"]["kind"] == "input"
    for index in (0, 3):
        same_answers(outputs[index]["regions"], lone_predictor.run(payloads[index])["regions"])
        assert outputs[index]["batch"] == {"jobs": 2, "regions": 5}


def test_a_batchs_images_are_fetched_several_at_a_time_and_each_once():
    class Loader:
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.lock = threading.Lock()
            self.active = self.most = 0

        def load(self, reference: str, task_id: int | None) -> Image.Image:
            with self.lock:
                self.calls.append(reference)
                self.active += 1
                self.most = max(self.most, self.active)
            time.sleep(0.2)
            with self.lock:
                self.active -= 1
            if reference == "bad":
                raise ImageError("no such image")
            return scene()

    loader = Loader()
    cache = ImageCache(loader, 8, 1 << 30)  # type: ignore[arg-type]
    wanted = [("a", 1), ("b", 2), ("a", 3), ("bad", 4), ("c", 5)]
    cache.prefetch(wanted)
    assert sorted(loader.calls) == ["a", "b", "bad", "c"] and loader.most > 1
    images = [cache.get(reference, task_id) for reference, task_id in wanted if reference != "bad"]
    assert images[0] is images[2]
    with pytest.raises(ImageError, match="no such image"):
        cache.get("bad", 4)
    assert len(loader.calls) == 4, "nothing is fetched twice"


# ---------------------------------------------------------------------- real workers
def test_jobs_waiting_together_are_answered_in_one_batch_each_with_its_own_result(
        base_env, prefix, images, lone_predictor, fake_ls, tmp_path):
    env = backend_env(base_env, REDIS_KEY_PREFIX=prefix, BATCH_MAX_REGIONS="64")
    settings = settings_for(prefix, env)
    queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    good = [payload(images[i], 10 + i, count=1 + i % 3) for i in range(4)]
    bad = {"corrupt": payload(f"{fake_ls.url}/img/corrupt.png", 20),
           "missing": payload(f"{fake_ls.url}/img/no-such-image.png", 21),
           "malformed": {**payload(images[0], 22), "v": 99}}
    good_ids = [queue.submit(p, interactive=False) for p in good]
    bad_ids = {name: queue.submit(p, interactive=False) for name, p in bad.items()}

    run_burst_worker(env, tmp_path, f"{prefix}-w")

    for job_id, sent in zip(good_ids, good, strict=True):
        job, result = outcome(queue, job_id)
        assert job.get_status() == JobStatus.FINISHED
        value = result.return_value
        same_answers(value["regions"], lone_predictor.run(sent)["regions"])
        assert value["batch"] == {"jobs": 4, "regions": sum(len(p["regions"]) for p in good)}
    for name, kind in {"corrupt": "image", "missing": "image", "malformed": "input"}.items():
        job, result = outcome(queue, bad_ids[name])
        assert job.get_status() == JobStatus.FINISHED, name
        assert result.return_value["error"]["kind"] == kind, name


def test_a_batch_holds_at_most_the_region_budget(base_env, prefix, images, tmp_path):
    env = backend_env(base_env, REDIS_KEY_PREFIX=prefix, BATCH_MAX_REGIONS="5")
    settings = settings_for(prefix, env)
    queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    ids = [queue.submit(payload(images[i % len(images)], 30 + i, count=2), interactive=False) for i in range(7)]

    run_burst_worker(env, tmp_path, f"{prefix}-w")

    sizes = [outcome(queue, job_id)[1].return_value["batch"] for job_id in ids]
    assert sizes == [{"jobs": 2, "regions": 4}] * 6 + [{"jobs": 1, "regions": 2}]


def test_one_job_at_a_time_when_the_budget_is_one_region(base_env, prefix, images, tmp_path):
    env = backend_env(base_env, REDIS_KEY_PREFIX=prefix, BATCH_MAX_REGIONS="1")
    settings = settings_for(prefix, env)
    queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    ids = [queue.submit(payload(images[i], 40 + i, count=1), interactive=False) for i in range(3)]

    run_burst_worker(env, tmp_path, f"{prefix}-w")

    assert [outcome(queue, job_id)[1].return_value["batch"]["jobs"] for job_id in ids] == [1, 1, 1]


def test_interactive_jobs_go_first_and_queues_are_never_mixed_in_a_batch(base_env, prefix, images, tmp_path):
    env = backend_env(base_env, REDIS_KEY_PREFIX=prefix, BATCH_MAX_REGIONS="64")
    settings = settings_for(prefix, env)
    queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    batch_ids = [queue.submit(payload(images[i], 50 + i, count=2), interactive=False) for i in range(4)]
    drawn_ids = [queue.submit(payload(images[4 + i], 60 + i, count=1), interactive=True) for i in range(2)]

    run_burst_worker(env, tmp_path, f"{prefix}-w")

    drawn = [outcome(queue, job_id) for job_id in drawn_ids]
    batch = [outcome(queue, job_id) for job_id in batch_ids]
    assert [result.return_value["batch"]["jobs"] for _, result in drawn] == [2, 2]
    assert [result.return_value["batch"]["jobs"] for _, result in batch] == [4, 4, 4, 4]
    assert max(job.ended_at for job, _ in drawn) <= min(job.started_at for job, _ in batch)


def test_a_job_that_fails_in_a_batch_is_retried_alone_and_the_others_are_untouched(
        base_env, prefix, images, fake_ls, tmp_path):
    # Prelabel jobs push their predictions to Label Studio; the push of the second task fails once. Batches
    # hold three jobs: the failed job comes back behind the others, and still runs alone.
    env = backend_env(base_env, REDIS_KEY_PREFIX=prefix, BATCH_MAX_REGIONS="3", JOB_RETRIES="2")
    settings = settings_for(prefix, env)
    queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    tasks = [9000 + i for i in range(7)]
    fake_ls.add_project(901, CAPTURED_CONFIG,
                        [{"id": t, "data": {"image": images[i % 6]}} for i, t in enumerate(tasks)])
    fake_ls.failing_pushes[9001] = 1
    ids = [queue.submit(payload(images[i % 6], t, count=1), interactive=False, push=True) for i, t in enumerate(tasks)]

    run_burst_worker(env, tmp_path, f"{prefix}-w")

    results = [outcome(queue, job_id) for job_id in ids]
    assert all(job.get_status() == JobStatus.FINISHED for job, _ in results)
    assert all(result.return_value["pushed"] for _, result in results)
    # 9000-9002 together (9001 fails), 9003-9005 together, then 9006 and the retried 9001 each alone.
    assert [result.return_value["batch"]["jobs"] for _, result in results] == [3, 1, 3, 3, 3, 3, 1]
    assert results[1][0].retries_left == 1
    pushed = sorted(p["task"] for p in fake_ls.predictions_for(901))
    assert pushed == tasks, "each task's prediction is stored exactly once"


# ---------------------------------------------------------------------- pushes of a batch
def prelabel_project(fake_ls: FakeLabelStudio, images: list[str], project: int, count: int) -> list[int]:
    """A project of `count` tasks on the stand-in Label Studio; returns their ids."""
    tasks = [project * 10 + i for i in range(count)]
    fake_ls.add_project(project, CAPTURED_CONFIG,
                        [{"id": t, "data": {"image": images[i % 6]}} for i, t in enumerate(tasks)])
    return tasks


def bulk_requests(fake_ls: FakeLabelStudio, project: int) -> int:
    return sum(1 for method, path, _ in fake_ls.requests
               if method == "POST" and path.startswith(f"/api/projects/{project}/import/predictions"))


def test_the_predictions_of_a_batch_are_pushed_in_one_request(base_env, prefix, images, fake_ls, tmp_path):
    # One request per batch instead of one per task: a Label Studio on a small machine stores eight
    # predictions in one import about as fast as one prediction alone.
    env = backend_env(base_env, REDIS_KEY_PREFIX=prefix, BATCH_MAX_REGIONS="64")
    settings = settings_for(prefix, env)
    queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    tasks = prelabel_project(fake_ls, images, 911, 5)
    ids = [queue.submit(payload(images[i % 6], t, count=1, project="911"), interactive=False, push=True)
           for i, t in enumerate(tasks)]

    run_burst_worker(env, tmp_path, f"{prefix}-w")

    for job_id in ids:
        job, result = outcome(queue, job_id)
        assert job.get_status() == JobStatus.FINISHED
        assert result.return_value["pushed"] is True and result.return_value["batch"]["jobs"] == 5
        assert result.return_value["timing"]["push_ms"] > 0
    assert bulk_requests(fake_ls, 911) == 1
    stored = fake_ls.predictions_for(911)
    assert sorted(p["task"] for p in stored) == tasks, "each task's prediction is stored exactly once"
    for prediction in stored:
        check_prediction(prediction)


def test_a_batch_push_that_fails_falls_back_to_one_push_per_job_and_only_a_failing_task_fails(
        base_env, prefix, images, fake_ls, tmp_path):
    # Label Studio answers 503 for anything holding task 9211: the batch's request, then its own push. The
    # other jobs push on their own; 9211's job fails (no retries here) and says why.
    env = backend_env(base_env, REDIS_KEY_PREFIX=prefix, BATCH_MAX_REGIONS="64", JOB_RETRIES="0")
    settings = settings_for(prefix, env)
    queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    tasks = prelabel_project(fake_ls, images, 921, 4)
    fake_ls.failing_pushes[9211] = 2
    ids = [queue.submit(payload(images[i % 6], t, count=1, project="921"), interactive=False, push=True)
           for i, t in enumerate(tasks)]

    run_burst_worker(env, tmp_path, f"{prefix}-w")

    results = [outcome(queue, job_id) for job_id in ids]
    assert results[1][0].get_status() == JobStatus.FAILED
    assert "503" in results[1][0].exc_info
    assert all(job.get_status() == JobStatus.FINISHED and result.return_value["pushed"]
               for index, (job, result) in enumerate(results) if index != 1)
    assert bulk_requests(fake_ls, 921) == 1
    assert sorted(p["task"] for p in fake_ls.predictions_for(921)) == [9210, 9212, 9213]


def test_a_label_studio_without_the_import_route_gets_one_push_per_task(base_env, prefix, images, fake_ls,
                                                                        tmp_path, monkeypatch):
    # Asked once (404), then never again by this worker.
    monkeypatch.setattr(fake_ls, "bulk_predictions", False)
    env = backend_env(base_env, REDIS_KEY_PREFIX=prefix, BATCH_MAX_REGIONS="4")
    settings = settings_for(prefix, env)
    queue = JobQueue(settings, connect(settings.effective_redis_url, settings))
    tasks = prelabel_project(fake_ls, images, 931, 8)
    ids = [queue.submit(payload(images[i % 6], t, count=1, project="931"), interactive=False, push=True)
           for i, t in enumerate(tasks)]

    run_burst_worker(env, tmp_path, f"{prefix}-w")

    assert all(outcome(queue, job_id)[1].return_value["pushed"] for job_id in ids)
    assert [outcome(queue, job_id)[1].return_value["batch"]["jobs"] for job_id in ids] == [4] * 8
    assert bulk_requests(fake_ls, 931) == 1
    assert sorted(p["task"] for p in fake_ls.predictions_for(931)) == tasks
