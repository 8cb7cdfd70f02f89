"""Pre-annotating a whole project: one queued job per task, predictions pushed to Label Studio, reruns skip."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from backend import prelabel
from backend.jobs import JobQueue, connect
from backend.prelabel import run_prelabel
from backend.settings import Settings
from tests.support import REPO, capture
from tests.support.fake_labelstudio import LS_TOKEN
from tests.support.model_factory import MODEL_VERSION
from tests.support.processes import backend_env, start_worker
from tests.support.redis_server import KEY_PREFIX, REDIS_URL
from tests.support.requests import CAPTURED_CONFIG, batch_task, check_prediction

pytestmark = pytest.mark.usefixtures("worker", "redis_db")


def project_tasks(fake_ls, first_id: int) -> list[dict]:
    """Two tasks with detector boxes, one without boxes, one already predicted by the current version."""
    tasks = [batch_task(first_id, f"{fake_ls.url}/img/red.png", "predictions"),
             batch_task(first_id + 1, "/data/upload/1/blue.png", "annotations"),
             batch_task(first_id + 2, f"{fake_ls.url}/img/blue.png", None),
             batch_task(first_id + 3, f"{fake_ls.url}/img/red.png", "predictions")]
    done = copy.deepcopy(capture("07")["request"]["json"]["tasks"][0]["predictions"][0])
    tasks[3]["predictions"] = [{**done, "model_version": MODEL_VERSION}]
    return tasks


def settings_for(fake_ls, base_env) -> Settings:
    return Settings(redis_url=REDIS_URL, key_prefix=KEY_PREFIX, label_studio_url=fake_ls.url,
                    label_studio_api_key=LS_TOKEN, max_new_tokens=6, model_dir=Path(base_env["MODEL_DIR"]))


def test_prelabel_pushes_what_is_missing_and_a_rerun_skips_it(fake_ls, base_env):
    project = 601
    fake_ls.add_project(project, CAPTURED_CONFIG, project_tasks(fake_ls, 6000))
    settings = settings_for(fake_ls, base_env)
    queue = JobQueue(settings, connect(REDIS_URL, settings), REDIS_URL)

    summary = run_prelabel(settings, project, timeout=120, queue=queue, progress=False)
    assert (summary.tasks, summary.already_predicted, summary.without_boxes) == (4, 1, 1)
    assert (summary.enqueued, summary.pushed, summary.pending, summary.failed) == (2, 2, 0, [])
    pushed = fake_ls.predictions_for(project)
    assert sorted(p["task"] for p in pushed) == [6000, 6001]
    for prediction in pushed:
        check_prediction(prediction)
    assert "pushed: 2" in summary.describe()

    again = run_prelabel(settings, project, timeout=60, queue=queue, progress=False)
    assert (again.already_predicted, again.enqueued, again.pushed) == (3, 0, 0)
    assert len(fake_ls.predictions_for(project)) == 2


def test_prelabel_command_line(fake_ls, base_env):
    project = 602
    fake_ls.add_project(project, CAPTURED_CONFIG, project_tasks(fake_ls, 6100)[:1])
    done = subprocess.run([sys.executable, "-m", "backend", "prelabel", "--project", str(project), "--timeout", "120"],
                          cwd=REPO, env=backend_env(base_env), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "enqueued: 1, pushed: 1" in done.stdout
    (prediction,) = fake_ls.predictions_for(project)
    assert prediction["task"] == 6100
    check_prediction(prediction)


def test_prelabel_reports_tasks_it_cannot_use(fake_ls, base_env):
    project = 603
    tasks = project_tasks(fake_ls, 6200)[:1]
    tasks[0]["data"] = {"picture": "x.png"}
    fake_ls.add_project(project, CAPTURED_CONFIG, tasks)
    summary = run_prelabel(settings_for(fake_ls, base_env), project, timeout=30, progress=False)
    assert summary.enqueued == 0 and len(summary.failed) == 1 and "has no image" in summary.failed[0]


def test_sort_by_score_makes_the_pushed_version_the_projects_prelabeling_version(fake_ls, base_env):
    # Label Studio's Prediction score column shows the chosen version's scores only.
    project = 603
    fake_ls.add_project(project, CAPTURED_CONFIG, project_tasks(fake_ls, 6300))
    settings = settings_for(fake_ls, base_env)
    queue = JobQueue(settings, connect(REDIS_URL, settings), REDIS_URL)

    unsorted = run_prelabel(settings, project, wait=False, queue=queue, progress=False, sort_by_score=True)
    assert unsorted.version_chosen is False and "still running" in unsorted.describe()
    assert fake_ls.projects[project].get("model_version", "") == ""

    summary = run_prelabel(settings, project, timeout=120, queue=queue, progress=False, sort_by_score=True)
    assert summary.pending == 0 and summary.version_chosen
    assert fake_ls.projects[project]["model_version"] == MODEL_VERSION
    assert f"prelabeling version of the project: {MODEL_VERSION}" in summary.describe()


def test_prelabel_stops_waiting_and_says_why_when_no_worker_takes_its_jobs(fake_ls, base_env, monkeypatch):
    # As with a `serve` whose Redis is embedded while prelabel reaches another: jobs nobody will ever take.
    monkeypatch.setattr(prelabel, "NO_WORKER_GRACE_S", 2.0)
    project = 604
    fake_ls.add_project(project, CAPTURED_CONFIG, project_tasks(fake_ls, 6400)[:2])
    settings = dataclasses.replace(settings_for(fake_ls, base_env), key_prefix=f"{KEY_PREFIX}-nobody")
    started = time.monotonic()
    summary = run_prelabel(settings, project, progress=False)
    assert time.monotonic() - started < 30
    assert (summary.enqueued, summary.pushed, summary.pending) == (2, 0, 2)
    assert "no worker has listened on the batch queue" in summary.stalled
    assert "python -m backend worker" in summary.describe()
    assert fake_ls.predictions_for(project) == []


def test_a_rerun_after_its_predictions_were_deleted_counts_its_new_jobs_not_the_old_ones(fake_ls, base_env):
    # The same tasks give the same job ids: the jobs of the first run must not answer for the second.
    project = 605
    tasks = project_tasks(fake_ls, 6500)[:2]
    fake_ls.add_project(project, CAPTURED_CONFIG, tasks)
    settings = settings_for(fake_ls, base_env)
    assert run_prelabel(settings, project, timeout=120, progress=False).pushed == 2

    fake_ls.add_project(project, CAPTURED_CONFIG, tasks)  # someone deleted the predictions in Label Studio
    again = run_prelabel(settings, project, timeout=120, progress=False)
    assert (again.enqueued, again.pushed, again.pending, again.failed) == (2, 2, 0, [])
    # Counted as pushed once pushed, not before.
    assert sorted(p["task"] for p in fake_ls.predictions_for(project)) == [6500, 6501]


@pytest.mark.parametrize("how", [signal.SIGSTOP, signal.SIGKILL], ids=["frozen", "killed"])
def test_prelabel_names_the_tasks_whose_jobs_never_end_and_exits_with_1(fake_ls, base_env, tmp_path, how):
    # The only worker freezes, or is killed, in the middle of a job: no worker is left to notice, so the job
    # never ends. Once no job ended for longer than a job may run (BATCH_JOB_TIMEOUT, plus the heartbeat
    # grace), prelabel stops waiting, says which tasks were left and exits with 1.
    project = 606 if how == signal.SIGSTOP else 607
    first = project * 10
    tasks = [batch_task(first + i, f"{fake_ls.url}/slow/red.png?delay=30", "predictions") for i in range(2)]
    fake_ls.add_project(project, CAPTURED_CONFIG, tasks)
    prefix = f"{KEY_PREFIX}-stuck-{uuid.uuid4().hex[:6]}"
    env = backend_env(base_env, REDIS_KEY_PREFIX=prefix, BATCH_JOB_TIMEOUT="4", WORKER_HEARTBEAT_TTL="2",
                      JOB_RETRIES="0")
    settings = Settings.from_env(env)
    queue = JobQueue(settings, connect(REDIS_URL, settings), REDIS_URL)
    worker = start_worker(env, tmp_path / "worker.log", f"{prefix}-worker")
    try:
        started = time.monotonic()
        run = subprocess.Popen([sys.executable, "-m", "backend", "prelabel", "--project", str(project)], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not queue.running()[queue.batch.name]:
            assert time.monotonic() - started < 60 and run.poll() is None, worker.tail()
            time.sleep(0.1)
        worker.popen.send_signal(how)
        out, err = run.communicate(timeout=120)
        elapsed = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            worker.popen.send_signal(signal.SIGCONT)
        worker.stop(signal.SIGKILL)
    assert run.returncode == 1, out + err[-2000:]
    assert "stopped waiting: no job ended for 11 s" in out, out
    assert f"the jobs of tasks {first}, {first + 1} never ended" in out, out
    assert "still running: 2" in out and elapsed < 60, (elapsed, out)
    assert fake_ls.predictions_for(project) == []
