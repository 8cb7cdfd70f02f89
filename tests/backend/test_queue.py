"""The queue under failure: Redis going away and coming back, workers dying mid-job, the all-in-one server.

These tests start their own `redis-server` on a free port so they can stop it, and their own workers so
they can kill them.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.jobs import JobQueue, connect
from backend.labelconfig import FillPlan, regions_from_context
from backend.payloads import make_payload
from backend.settings import Settings
from tests.support import REPO, capture, free_port, wait_until
from tests.support.model_factory import MODEL_VERSION
from tests.support.processes import Process, backend_env, start_api, start_process
from tests.support.redis_server import KEY_PREFIX
from tests.support.requests import CAPTURED_CONFIG, check_prediction, interactive_body

pytestmark = pytest.mark.slow
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """A private redis-server that a test may stop and start again on the same port."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers, 20, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def private_env(base_env: dict[str, str], private_redis: RedisServer) -> dict[str, str]:
    return backend_env(base_env, REDIS_URL=private_redis.url)


@pytest.fixture(scope="module")
def workers(private_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Process]]:
    """Three workers on the private Redis, started side by side."""
    logs = tmp_path_factory.mktemp("worker-logs")
    names = ["w1", "w2", "w3"]
    started = {name: start_process([sys.executable, "-m", "backend", "worker", "--name", name], private_env,
                                   logs / f"{name}.log") for name in names}
    connection = redis.Redis.from_url(private_env["REDIS_URL"])
    for name, proc in started.items():
        wait_until(lambda n=name, p=proc: (p.alive() and connection.exists(f"rq:worker:{n}"))
                   or (not p.alive() and pytest.fail(p.tail())), 180, f"worker {name}")
    yield started
    for proc in started.values():
        proc.stop()


def slow_payload(image: str) -> dict:
    plan = FillPlan.from_label_config(CAPTURED_CONFIG)
    context = capture("06")["request"]["json"]["params"]["context"]
    return make_payload(task_id=77, project="1", image=image, plan=plan, regions=regions_from_context(plan, context),
                        label_config=CAPTURED_CONFIG, model_version=MODEL_VERSION, keep_drawn_label=True,
                        max_new_tokens=4)


def queue_for(private_redis: RedisServer, retries: int) -> JobQueue:
    settings = Settings(redis_url=private_redis.url, key_prefix=KEY_PREFIX, job_retries=retries)
    return JobQueue(settings, connect(private_redis.url, settings), private_redis.url)


def kill_the_worker_running(job_id: str, queue: JobQueue, workers: dict[str, Process]) -> str:
    """SIGKILL whichever worker picked the job up, once it has; returns its name."""
    def holder() -> str | None:
        job = Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
        return job.worker_name if job.get_status() == JobStatus.STARTED else None

    name = wait_until(holder, 30, "a worker to start the job")
    workers[name].popen.send_signal(signal.SIGKILL)
    workers[name].popen.wait(timeout=10)
    return name


def test_redis_outage_is_a_503_with_a_message_and_predictions_resume_after(
        private_redis, private_env, workers, fake_ls, tmp_path):
    server = start_api(private_env, tmp_path / "api.log")
    body = interactive_body(f"{fake_ls.url}/img/red.png", labels=[])
    try:
        assert server.client.post("/predict", json=body).status_code == 200
        private_redis.stop()
        started = time.perf_counter()
        down = server.client.post("/predict", json=interactive_body(f"{fake_ls.url}/img/blue.png"))
        assert down.status_code == 503
        assert f"Redis at {private_redis.url}" in down.json()["detail"]
        assert "unreachable" in down.json()["detail"]
        assert time.perf_counter() - started < 10
        assert server.client.get("/health").status_code == 200
        assert server.client.post("/setup", json={}).json() == {"model_version": MODEL_VERSION}
        assert "gpt4roi_queue_up 0.0" in server.client.get("/metrics").text
        private_redis.start()

        def recovered() -> bool:
            response = server.client.post("/predict", json=interactive_body(f"{fake_ls.url}/img/blue.png"))
            return response.status_code == 200 and response.json()
        results = wait_until(recovered, 90, "predictions after Redis came back", interval=1.0)["results"]
        check_prediction(results[0])
    finally:
        server.stop()


def test_a_job_whose_worker_dies_is_retried_by_another_worker(private_redis, workers, fake_ls):
    queue = queue_for(private_redis, retries=1)
    job_id = queue.submit(slow_payload(f"{fake_ls.url}/slow/red.png?delay=3&case=retry"), interactive=True)
    killed = kill_the_worker_running(job_id, queue, workers)
    outcome = queue.wait([job_id], 60)[job_id]
    assert outcome.ok, outcome.error
    assert outcome.value["model_version"] == MODEL_VERSION and len(outcome.value["regions"]) == 1
    job = Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
    assert job.worker_name != killed
    assert job.retries_left == 0


def test_a_job_whose_worker_dies_without_retries_left_is_reported_failed(private_redis, workers, fake_ls):
    alive = {name: proc for name, proc in workers.items() if proc.alive()}
    assert len(alive) >= 2, "needs a worker to die and one to notice"
    queue = queue_for(private_redis, retries=0)
    job_id = queue.submit(slow_payload(f"{fake_ls.url}/slow/red.png?delay=3&case=fail"), interactive=True)
    kill_the_worker_running(job_id, queue, alive)
    outcome = queue.wait([job_id], 60)[job_id]
    assert not outcome.ok
    assert "worker running this job died" in outcome.error


def test_all_in_one_server_with_embedded_redis(base_env, fake_ls, tmp_path):
    port = free_port()
    env = backend_env(base_env, DATA_DIR=str(tmp_path / "data"), PORT=str(port), HOST="127.0.0.1")
    env.pop("REDIS_URL")
    proc = start_process([sys.executable, "-m", "backend", "serve"], env, tmp_path / "serve.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        def predicted() -> dict | None:
            if not proc.alive():
                pytest.fail(proc.tail())
            try:
                response = client.post("/predict", json=interactive_body(f"{fake_ls.url}/img/red.png"))
            except httpx.HTTPError:
                return None
            return response.json() if response.status_code == 200 else None

        result = wait_until(predicted, 180, "the all-in-one server to predict", interval=1.0)
        check_prediction(result["results"][0])
        (worker,) = [c for c in psutil.Process(proc.popen.pid).children() if "worker" in c.cmdline()]
        socket_path = worker.environ()["REDIS_URL"].removeprefix("unix://")
        (embedded,) = [p for p in psutil.process_iter(["cmdline"])
                       if any(socket_path in arg for arg in p.info["cmdline"] or [])]
    finally:
        client.close()
        proc.stop()
    # Stopping the server stops its worker and its Redis.
    for leftover in (worker, embedded):
        wait_until(lambda p=leftover: not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, 30,
                   f"{leftover} to exit")


def test_worker_refuses_to_start_without_a_model(base_env, tmp_path):
    env = backend_env(base_env, MODEL_DIR=str(tmp_path / "empty"))
    done = subprocess.run([sys.executable, "-m", "backend", "worker"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "no model in MODEL_DIR" in done.stderr

