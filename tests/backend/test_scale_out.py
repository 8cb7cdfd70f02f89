"""Several API replicas and workers on one Redis and one PostgreSQL: nothing acknowledged is lost when a
replica dies, a fine-tune started on either side trains on everything, and a promotion reaches every worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from backend import registry
from backend.corrections import CorrectionsStore
from backend.runs import FinetuneRuns
from backend.settings import Settings
from backend.store import PostgresDatabase
from backend.webhooks import SECRET_HEADER
from tests.support import REPO, WEBHOOK_SECRET, free_port, wait_until
from tests.support.hitl import DEMO_CONFIG, annotation_event, make_tasks, task_json
from tests.support.postgres import fresh_database
from tests.support.processes import Api, Process, backend_env, start_api, start_worker
from tests.support.redis_server import KEY_PREFIX, REDIS_URL

pytestmark = pytest.mark.slow

BASE = "tiny-0"
SENDERS = 20
TASKS = 60


@pytest.fixture
def database_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture
def shared_env(tmp_path: Path, tiny_checkpoint: Path, database_url: str, redis_db: redis.Redis) -> dict[str, str]:
    """What every machine of the deployment shares: Redis, PostgreSQL, the model folder (a shared volume) and
    the webhook secret. Each process gets its own DATA_DIR: nothing may depend on a replica's local disk."""
    models = tmp_path / "models"
    settings = Settings.from_env({}, model_dir=models, data_dir=tmp_path / "setup", database_url=database_url)
    registry.import_checkpoint(settings, tiny_checkpoint, BASE, symlink=True)
    return {
        # Queues of their own: the session's other workers must not take these jobs.
        "REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": f"{KEY_PREFIX}-scale", "DATABASE_URL": database_url,
        "MODEL_DIR": str(models), "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path / "images"),
        "WEBHOOK_SECRET": WEBHOOK_SECRET, "DEVICE": "cpu", "MAX_NEW_TOKENS": "4", "LOG_LEVEL": "INFO",
        # One job per batch, so that concurrent requests spread over both workers.
        "BATCH_MAX_REGIONS": "1", "WORKER_HEARTBEAT_TTL": "3", "WORKER_MAINTENANCE_INTERVAL": "1",
        "FINETUNE_STEPS": "2", "FINETUNE_LEARNING_RATE": "1e-2", "FINETUNE_EVAL_FRACTION": "0.3",
        "FINETUNE_DEVICE": "cpu", "TRAIN_ON_UNCONFIRMED": "true",
    }


def send_webhooks(apis: list[Api], bodies: list[dict[str, Any]], kill_after: int) -> set[int]:
    """`SENDERS` threads post `bodies` round-robin over the replicas, as a load balancer spreads them; the
    second replica is SIGKILLed after `kill_after` acknowledgements, and a sender whose replica is gone sends
    again to the other one (as Label Studio's retry through the balancer would). Returns the acknowledged
    annotation ids."""
    acknowledged: set[int] = set()
    lock = threading.Lock()
    killed = threading.Event()
    clients = [httpx.Client(base_url=api.url, timeout=30, headers={SECRET_HEADER: WEBHOOK_SECRET}) for api in apis]

    def send(index: int) -> None:
        body = bodies[index]
        for attempt in range(2 * len(clients)):
            client = clients[(index + attempt) % len(clients)]
            try:
                response = client.post("/webhook", json=body)
            except httpx.TransportError:
                continue
            if response.status_code == 200:
                with lock:
                    acknowledged.add(body["annotation"]["id"])
                    if len(acknowledged) >= kill_after and not killed.is_set():
                        killed.set()
                        os.kill(apis[1].process.popen.pid, signal.SIGKILL)
                return
            pytest.fail(f"webhook answered {response.status_code}: {response.text}")

    try:
        with ThreadPoolExecutor(SENDERS) as pool:
            list(pool.map(send, range(len(bodies))))
    finally:
        for client in clients:
            client.close()
    assert killed.is_set(), "the replica was never killed"
    return acknowledged


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def loaded(worker: Process, version: str) -> bool:
    return f"model {version} loaded" in worker.log.read_text(errors="replace")


def test_replicas_lose_nothing_and_every_worker_follows_a_promotion(shared_env, database_url, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    env_of = {name: backend_env(shared_env, DATA_DIR=str(tmp_path / f"data-{name}"))
              for name in ("api-a", "api-b", "worker-1", "worker-2", "finetune")}
    apis = [start_api(env_of[name], logs / f"{name}.log") for name in ("api-a", "api-b")]
    workers = [start_worker(env_of[name], logs / f"{name}.log", f"{KEY_PREFIX}-{name}")
               for name in ("worker-1", "worker-2")]
    try:
        tasks = make_tasks(tmp_path / "images", "s", 1, TASKS, seed=5)
        bodies = [annotation_event(task, 500 + i, DEMO_CONFIG) for i, task in enumerate(tasks)]

        acknowledged = send_webhooks(apis, bodies, kill_after=TASKS // 3)

        # Every acknowledged webhook is in the shared store, whichever replica took it (one of them is dead).
        assert apis[1].process.popen.wait(timeout=10) == -signal.SIGKILL
        store = CorrectionsStore(PostgresDatabase(database_url))
        assert acknowledged == store.annotation_ids() == {500 + i for i in range(TASKS)}
        regions = store.count_regions()
        assert regions == sum(len(task.objects) for task in tasks)

        # A fine-tune started on a machine that took none of the webhooks trains on all of them.
        cli(env_of["finetune"], "backend/finetune.py", "--trigger", "test")
        [run] = FinetuneRuns(store.database).runs()
        data = run.details["data"]
        assert data["new_regions"] + data["fresh_eval_regions"] == regions, run.details
        assert run.candidate and run.status == "awaiting review", run.describe()

        # A person promotes it through the surviving replica's machine; both workers answer with it next.
        cli(env_of["api-a"], "-m", "backend", "promote", run.candidate)
        client = apis[0].client

        def predict(task_index: int) -> str:
            body = {"tasks": [task_json(tasks[task_index])], "label_config": DEMO_CONFIG, "project": "1.1"}
            response = client.post("/predict", json=body, timeout=120)
            assert response.status_code == 200, response.text
            [prediction] = response.json()["results"]
            return prediction["model_version"]

        with ThreadPoolExecutor(4) as pool:
            def both_loaded() -> bool:
                versions = list(pool.map(predict, range(4)))
                assert set(versions) == {run.candidate}, versions
                return all(loaded(worker, run.candidate) for worker in workers)

            wait_until(both_loaded, 180, "both workers to load the promoted version", interval=0.1)
        history = registry.history(Settings.from_env(env_of["worker-2"]))
        assert history[-1]["version"] == run.candidate and history[-1]["previous"] == BASE
        assert json.loads(Path(registry.checkpoint_path(Settings.from_env(env_of["worker-1"]), run.candidate),
                               "version.json").read_text())["parent"] == BASE
        store.database.close()
    finally:
        for process in [*workers, *(api.process for api in apis)]:
            process.stop()
        for api in apis:
            api.client.close()


def test_an_unreachable_database_is_a_503_that_names_it(tmp_path, model_dir, redis_db):
    env = backend_env({"REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": KEY_PREFIX, "MODEL_DIR": str(model_dir),
                       "DATA_DIR": str(tmp_path / "data"), "WEBHOOK_SECRET": WEBHOOK_SECRET, "LOG_LEVEL": "WARNING",
                       "DATABASE_URL": f"postgresql://backend:s3cret@127.0.0.1:{free_port()}/corrections"})
    api = start_api(env, tmp_path / "api.log")
    try:
        body = annotation_event(make_tasks(tmp_path / "images", "s", 1, 1, seed=5)[0], 1, DEMO_CONFIG)
        response = api.client.post("/webhook", json=body, headers={SECRET_HEADER: WEBHOOK_SECRET})
        assert response.status_code == 503
        assert "(DATABASE_URL) does not answer" in response.json()["detail"]
        assert "s3cret" not in response.text
        assert api.client.get("/health").status_code == 200
    finally:
        api.stop()
