"""The webhook secret is kept to the projects connected to this backend, and replaced without refusing a
delivery: installed only into connected projects' webhooks, events of other projects refused, and
`python -m backend rotate-secret` reaching every replica and Label Studio with a grace window for the old
secret. Real API processes, a stand-in Label Studio over real HTTP."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend.connect import install_webhook_secret
from backend.settings import Settings
from backend.store import Database
from backend.webhooks import SECRET_HEADER, accepted_secrets
from tests.support import REPO, WEBHOOK_SECRET, capture
from tests.support.fake_labelstudio import LS_TOKEN, FakeLabelStudio
from tests.support.processes import backend_env, start_api

BACKEND_URL = "http://127.0.0.1:9"  # where Label Studio reaches the backend (never called here)


def remember_connected(settings: Settings, *projects: int) -> None:
    """What `connect --project ID` records once a project is connected."""
    Database.for_settings(settings).write(lambda db: db.executemany(
        "INSERT INTO connected_projects (project_id, label_studio_url, connected_at) VALUES (?, ?, ?)",
        [(project, settings.label_studio_url, time.time()) for project in projects]))


def hook(fake_ls: FakeLabelStudio, hook_id: int, project: int | None) -> dict[str, Any]:
    record = {"id": hook_id, "project": project, "url": f"{BACKEND_URL}/webhook", "headers": {},
              "send_payload": True}
    fake_ls.webhooks.append(record)
    return record


@pytest.fixture
def hooks(fake_ls: FakeLabelStudio):
    made: list[dict[str, Any]] = []
    yield lambda hook_id, project: made.append(hook(fake_ls, hook_id, project)) or made[-1]
    for record in made:
        fake_ls.webhooks.remove(record)


def test_the_secret_goes_only_into_the_webhooks_of_connected_projects(tmp_path, fake_ls, hooks, database_url):
    """Fails while every webhook to the backend's URL got it: any organization member could create one, and
    read the secret back from Label Studio's webhooks API."""
    settings = Settings.from_env({}, data_dir=tmp_path / "data", model_dir=tmp_path / "models",
                                 database_url=database_url, label_studio_url=fake_ls.url,
                                 label_studio_api_key=LS_TOKEN, backend_url=BACKEND_URL, webhook_secret="kept")
    remember_connected(settings, 31)
    connected, other, organization = hooks(7001, 31), hooks(7002, 32), hooks(7003, None)

    steps = install_webhook_secret(settings)

    assert connected["headers"] == {SECRET_HEADER: "kept"}
    assert other["headers"] == {} and organization["headers"] == {}
    assert "left without the secret" in " ".join(step.describe() for step in steps)


@pytest.fixture
def replica_env(base_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """One DATA_DIR (one database) shared by the replicas, project 1 connected."""
    env = backend_env(base_env, DATA_DIR=str(tmp_path / "data"), BACKEND_URL=BACKEND_URL)
    remember_connected(Settings.from_env(env), 1)
    return env


def test_events_of_projects_not_connected_are_refused(replica_env, tmp_path):
    """Fails while any event carrying the secret was stored, whichever project it named."""
    api = start_api(replica_env, tmp_path / "api.log")
    try:
        ours = capture("09")["request"]["json"]
        assert api.client.post("/webhook", json=ours).status_code == 200
        theirs = copy.deepcopy(ours)
        theirs["project"]["id"] = 2
        refused = api.client.post("/webhook", json=theirs)
        assert refused.status_code == 403 and "project 2 is not connected" in refused.json()["detail"]
        nameless = {k: v for k, v in ours.items() if k != "project"}
        assert api.client.post("/webhook", json=nameless).status_code == 403
    finally:
        api.stop()


def test_rotating_the_secret_reaches_every_replica_and_label_studio_without_refusing_a_delivery(
        replica_env, fake_ls, hooks, tmp_path):
    """Fails before `rotate-secret` existed."""
    label_studios = hooks(7101, 1)
    replicas = [start_api(replica_env, tmp_path / f"api{i}.log") for i in range(2)]
    event = capture("14")["request"]["json"]
    answers: list[tuple[str, int]] = []
    stop = threading.Event()

    def deliver() -> None:
        # Label Studio sends what its webhook holds now; a delivery signed a moment ago may still be under way.
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                for replica in replicas:
                    for secret in {label_studios["headers"].get(SECRET_HEADER, WEBHOOK_SECRET), WEBHOOK_SECRET}:
                        status = client.post(f"{replica.url}/webhook", json=event,
                                             headers={SECRET_HEADER: secret}).status_code
                        answers.append((secret, status))
                time.sleep(0.05)

    sender = threading.Thread(target=deliver)
    try:
        wait_for_installed = time.monotonic() + 30
        while label_studios["headers"].get(SECRET_HEADER) != WEBHOOK_SECRET:  # the API installs it at start
            assert time.monotonic() < wait_for_installed, label_studios
            time.sleep(0.1)
        sender.start()
        rotated = subprocess.run([sys.executable, "-m", "backend", "rotate-secret", "--grace", "30"], cwd=REPO,
                                 env=replica_env, capture_output=True, text=True, timeout=120)
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        new = label_studios["headers"][SECRET_HEADER]
        assert new != WEBHOOK_SECRET
        time.sleep(0.5)
        stop.set()
        sender.join(30)

        assert answers and {status for _, status in answers} == {200}, [a for a in answers if a[1] != 200][:5]
        assert any(secret == new for secret, _ in answers)
        for replica in replicas:
            for secret, status in ((new, 200), (WEBHOOK_SECRET, 200), ("wrong", 401)):
                assert httpx.post(f"{replica.url}/webhook", json=event, headers={SECRET_HEADER: secret},
                                  timeout=30).status_code == status
        # Once the grace window is over only the new secret is accepted.
        settings = Settings.from_env(replica_env)
        assert accepted_secrets(settings) == (new, WEBHOOK_SECRET)
        assert accepted_secrets(settings, now=time.time() + 31) == (new,)
    finally:
        stop.set()
        if sender.is_alive():
            sender.join(30)
        for replica in replicas:
            replica.stop()
